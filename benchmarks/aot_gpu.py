"""Per-device memory of the stage configs compiled for one 8 x H100 and one 8 x H200 node from this CPU host.

  pip install -r requirements.txt "jax-cuda12-plugin==$(python -c 'import jax; print(jax.__version__)')" \
      nvidia-cudnn-cu12              # the CUDA PJRT plugin (XLA's GPU compiler) and cuDNN; no GPU or driver
  python benchmarks/aot_gpu.py                  # stage1, stage2 and sft as shipped on 8xH100 and 8xH200
  python benchmarks/aot_gpu.py --nodes=h200 --configs=configs/stage2.py
  python benchmarks/aot_gpu.py --nodes=h100 --configs=configs/stage2.py --extra=model.remat=dots
  python benchmarks/aot_gpu.py --from_json=aot_gpu.jsonl        # only print the table

Each row compiles ``Trainer(config, mesh).step_fn`` for the node's compile-only devices
(nextstep_jax/training/aot_gpu.py) in its own process (the compiler's memory is returned between rows) and
appends a JSON line to --json. Each config is compiled as shipped: its global batch split into micro-batches of
``data.micro_batch_per_device`` rows per data-parallel device with the accumulation that follows from the mesh
(pure FSDP over the node's 8 GPUs), cuDNN flash attention (``model.attention=cudnn``). The GPU compiler never
refuses a program that is too large, so the verdict compares the memory-usage report's "Total bytes" per device
with the GPU's memory here; see the module docstring of aot_gpu for what that figure leaves out (jax's default
75% preallocation, the CUDA context and library handles, the cuDNN workspace). Never asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aot_memory import REPO, table  # noqa: E402  (benchmarks/aot_memory.py: the same table)


def load_config(spec: str):
  """'configs/stage2.py' or 'configs/stage2.py:tiny' -> its get_config(arg)."""
  path, _, arg = spec.partition(":")
  path = path if os.path.isabs(path) else os.path.join(REPO, path)
  module_spec = importlib.util.spec_from_file_location("_aot_gpu_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def compile_one(a) -> None:
  """The worker: one compile, one JSON line."""
  sys.path.insert(0, REPO)
  from nextstep_jax import overrides as overrides_lib  # pylint: disable=import-outside-toplevel
  from nextstep_jax.training import aot, aot_gpu  # pylint: disable=import-outside-toplevel
  config = load_config(a.config)
  if a.extra:
    config = config.copy_and_resolve_references()
    overrides_lib.apply_overrides(config, a.extra)
  t0 = time.perf_counter()
  result = aot_gpu.compile_for_node(config, a.node, a.count, rows_per_device=a.rows_per_device,
                                    attention=a.attention, dump_dir=a.dump_dir or None)
  print(aot.format_result(result), flush=True)
  print(f"wall          {time.perf_counter() - t0:.0f} s", flush=True)
  with open(a.json, "a", encoding="utf-8") as out:
    out.write(json.dumps(dict(dataclasses.asdict(result), verdict=result.verdict(), config=a.config,
                              node=result.topology, extra=a.extra)) + "\n")


def run_row(config: str, node: str, count: int, a, json_path: str) -> int:
  cmd = [sys.executable, os.path.abspath(__file__), "--one", f"--config={config}", f"--node={node}",
         f"--count={count}", f"--json={json_path}", f"--attention={a.attention}",
         f"--rows_per_device={a.rows_per_device}"] + [f"--extra={e}" for e in a.extra]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env["JAX_PLATFORMS"] = "cpu"   # the CUDA plugin must not look for a driver
  print("$ " + " ".join(cmd), flush=True)
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in r.stdout.splitlines() if l.strip()]
  print("\n".join(lines[-14:]) if lines and r.returncode == 0 else (r.stdout + r.stderr)[-3000:], flush=True)
  return r.returncode


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default="configs/stage1.py,configs/stage2.py,configs/sft.py")
  p.add_argument("--nodes", default="h100,h200", help="GPU kinds, one node of --count each")
  p.add_argument("--count", type=int, default=8, help="GPUs per node")
  p.add_argument("--attention", default="cudnn")
  p.add_argument("--rows_per_device", type=int, default=0, help="0: the config's global batch")
  p.add_argument("--extra", action="append", default=[], help="config override key=value (repeatable)")
  p.add_argument("--json", default="", help="JSON lines file (default: a temporary file)")
  p.add_argument("--from_json", default="", help="print the table of an existing JSON lines file")
  # The worker's flags.
  p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--config", default="", help=argparse.SUPPRESS)
  p.add_argument("--node", default="h200", help=argparse.SUPPRESS)
  p.add_argument("--dump_dir", default="", help="keep XLA's dump here (with --one)")
  a = p.parse_args()
  if a.one:
    compile_one(a)
    return
  path = a.from_json
  if not path:
    path = a.json or os.path.join(tempfile.mkdtemp(prefix="aot_gpu_"), "aot_gpu.jsonl")
    for node in a.nodes.split(","):
      for config in a.configs.split(","):
        run_row(config, node, a.count, a, path)
  rows = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
  print("\n" + table(rows, place="node", with_extra=True))
  print("\nTotal: the memory-usage report's bytes per device (the buffers XLA allocates). jax's GPU client "
        "preallocates 75% of the memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION), and the CUDA context, "
        "cuBLAS/cuDNN/NCCL take ~1-2 GiB outside it.")


if __name__ == "__main__":
  main()
