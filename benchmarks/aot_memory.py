"""Per-device memory of the stage configs compiled for TPU topologies from this host: the docs' table.

  pip install "jax[tpu]"     # libtpu, matching the installed jax (describes TPU chips on a CPU host)
  python benchmarks/aot_memory.py        # stage1, stage2 and sft as shipped on v5p-64, v5p-256, v6e-64
  python benchmarks/aot_memory.py --topologies=v6e-64 --configs=configs/stage2.py \
      --extra=--config.model.remat=dots
  python benchmarks/aot_memory.py --from_json=aot.jsonl              # only print the table

Each row is one `python -m nextstep_jax.aot` in its own process (the compiler's memory is returned
between rows), appending a JSON line to --json; the table lists bytes per device (the memory-usage
report's "Total bytes"; XLA's temp estimate beside it) against the chip's HBM, compile time, the mesh and
the remat policy, and the verdict. Each config is compiled as shipped: its global batch (384 rows of 16K
tokens for stage1/2, 64 of 8K for SFT) split into micro-batches of data.micro_batch_per_device rows per
data-parallel device, with the accumulation steps that follow from the mesh (the table's "micro x accum"
column); ``--extra=--rows_per_device=1`` compiles one row per device instead. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3


def run_row(config: str, topology: str, extra: list[str], json_path: str, num_slices: int) -> int:
  cmd = [sys.executable, "-m", "nextstep_jax.aot", f"--config={config}", f"--topology={topology}",
         f"--num_slices={num_slices}", f"--json={json_path}"] + extra
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  print("$ " + " ".join(cmd), flush=True)
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in r.stdout.splitlines() if l.strip()]
  print("\n".join(lines[-12:]) if lines else r.stderr[-3000:], flush=True)
  return r.returncode


def table(rows: list[dict], place: str = "topology", with_extra: bool = False) -> str:
  """The docs' markdown table of the JSON rows (also benchmarks/aot_gpu.py's): `place` heads the column of
  the row's topology (a TPU topology here, a GPU node there); `with_extra` appends a row's "extra"
  overrides to its config's name."""
  g = lambda b: "-" if b is None else f"{b / GiB:.1f}"
  out = [f"| config | {place} | mesh | global batch | micro x accum | remat | params | Total GiB/device | "
         "temp GiB (analysis) | HBM GiB | compile s | verdict |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    plan = f"{r.get('micro_batch_per_device', '?')} x {r.get('grad_accum', '?')}"
    name = os.path.basename(r.get("config") or "?")
    if with_extra:
      name += "".join(f" {e}" for e in r.get("extra") or [])
    out.append(f"| {name} | {r['topology']} | {r['mesh']} | "
               f"{r['batch_size']} x {r['seq_len']} | {plan} | {r['remat']} | {r['params'] / 1e9:.2f}B | "
               f"{g(r.get('total_bytes'))} | {g(r.get('temp_bytes'))} | {g(r.get('hbm_bytes'))} | "
               f"{r['compile_s']:.0f} | {r['verdict']} |")
  return "\n".join(out)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default="configs/stage1.py,configs/stage2.py,configs/sft.py")
  p.add_argument("--topologies", default="v5p-64,v5p-256,v6e-64")
  p.add_argument("--num_slices", type=int, default=1)
  p.add_argument("--extra", action="append", default=[], help="extra flag for nextstep_jax.aot (repeatable)")
  p.add_argument("--json", default="", help="JSON lines file (default: a temporary file)")
  p.add_argument("--from_json", default="", help="print the table of an existing JSON lines file")
  a = p.parse_args()
  path = a.from_json
  if not path:
    path = a.json or os.path.join(tempfile.mkdtemp(prefix="aot_memory_"), "aot.jsonl")
    for topology in a.topologies.split(","):
      for config in a.configs.split(","):
        run_row(config, topology, a.extra, path, a.num_slices)
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  print("\n" + table(rows))


if __name__ == "__main__":
  main()
