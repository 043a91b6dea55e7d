"""Peak host memory of importing an official-layout NextStep directory of 8 safetensors shards as a run, and of
exporting it back, in 1 process and in N processes on this machine (jax.distributed over localhost, one CPU
device each: the multi-host path of a pod).

  python benchmarks/interop_memory.py                       # 8 shards (--shard_mb=48 asked: 55 MB written), 1 and 8 processes
  python benchmarks/interop_memory.py --processes=1,4,8 --shard_mb=32
  python benchmarks/interop_memory.py --qwen2                # also the backbone imported as a Qwen2.5 directory

Each process measures its own peak resident memory: once the runtime is up it resets the peak (VmHWM, through
/proc/self/clear_refs) and records its resident size; the figure is the peak over that size at the end, in one
set of processes for the import and in a fresh set for the export (``ru_maxrss`` would not do: Linux carries it
across fork and exec, so a worker would start at its parent's peak). The import writes the checkpoint a piece
at a time (``interop.streamed``: one layer of a stacked param, a band of rows of a vocabulary-sized one, read
from the files and written before the next, the processes sharing the pieces); the export reads the
checkpoint's files one tensor at a time (``interop.stored``) and writes it before reading the next, from
process 0. Measured on a 2-core host (8 shards of 55 MB, four runs): import 81 to 86 MB in 1 process, 59 to 78
MB in each of 8 (a whole-tree orbax save of the params read as global arrays, measured the same way: 800 and
148 MB); export 52 to 74 and 52 to 70 MB. With ``--shard_mb=144 --layers=48`` (1208 MB, 2.75 times the model):
import 95 to 109 MB, export 55 to 67 MB in 1 process. ``--qwen2`` (the backbone as a Qwen2.5 directory, imported
in float32 with a freshly initialised head): 277 to 303 MB in 1 process, 273 to 275 in each of 8 (the head and
projectors, 107 MB, and the scratch of the program that initialises them; before: 2,690 MB in 1 process).
The exported directory is checked against the source bit for bit. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MB = 10 ** 6


def _status(field: str) -> int:
  """A field of /proc/self/status in bytes (VmRSS: resident now; VmHWM: the peak since the last reset)."""
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
  """Resets the peak (VmHWM) to the resident size now and returns that size. ``ru_maxrss`` is no baseline:
  Linux carries it across fork and exec, so a worker would start with its parent's peak."""
  with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
    f.write("5")
  return _status("VmRSS")


def build_source(directory: str, shard_bytes: int, layers: int) -> int:
  """An official-layout directory (config.json + bf16 shards with the release's names) of about 8 shards of
  `shard_bytes`; returns the bytes of its tensors."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from nextstep_jax.interop import hf, safetensors_io  # pylint: disable=import-outside-toplevel
  from nextstep_jax.models import backbone as bb, fm_head, nextstep as ns  # pylint: disable=import-outside-toplevel
  # Sizes whose tensors total about 8 shards; the layer tensors are at most a third of a shard.
  hidden, heads, kv, hd = 1024, 16, 4, 64
  per_layer = 2 * (2 * hidden * heads * hd + 2 * hidden * kv * hd + 3 * hidden * 2816)
  vocab = max(4096, (8 * shard_bytes - layers * per_layer) // (4 * hidden) // 64 * 64)
  cfg = ns.NextStepConfig(backbone=bb.BackboneConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                                                     num_heads=heads, num_kv_heads=kv, head_dim=hd,
                                                     intermediate_size=2816),
                          head=fm_head.HeadConfig(dim=1024, num_layers=4, cond_dim=hidden, token_dim=64),
                          token_dim=64, token_norm=False)
  shapes = hf.checkpoint_shapes(cfg)
  shapes[hf.GEN_POS_EMBED] = (1, 32 * 32, hidden)
  rng = np.random.default_rng(0)
  bf16 = np.dtype(ml_dtypes.bfloat16)

  def tensors():
    for name, shape in shapes.items():
      if name == hf.GEN_POS_EMBED:
        yield name, hf.gen_pos_table(hidden, 32).astype(bf16)
      else:
        yield name, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)

  os.makedirs(directory)
  entries = {k: (s, bf16) for k, s in shapes.items()}
  total = sum(int(np.prod(s)) * 2 for s in shapes.values())
  shard_bytes = max(int(total / 8 * 1.08), max(int(np.prod(s)) * 2 for s in shapes.values()))  # 8 shards
  index = safetensors_io.save_sharded(directory, entries, tensors(), shard_bytes)
  meta = hf.ImageMeta(latent_channels=16, latent_patch_size=2, latent_size=32)
  config = hf.hf_config(cfg, meta, "bfloat16")
  config.pop("token_norm")
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  return int(index["metadata"]["total_size"])


def build_qwen2(src: str, directory: str) -> None:
  """A Qwen2ForCausalLM directory (``model.``-prefixed backbone names, model_type qwen2) of the backbone of the
  official-layout directory `src`, written a tensor at a time."""
  from nextstep_jax.interop import hf, safetensors_io  # pylint: disable=import-outside-toplevel
  tensors = safetensors_io.TensorDir(src)
  keep = [n for n in tensors.names() if n.startswith(("embed_tokens.", "layers.", "norm.")) or n == "lm_head.weight"]
  rename = {n: n if n == "lm_head.weight" else "model." + n for n in keep}
  entries = {rename[n]: (tensors.shape(n), tensors.dtype(n)) for n in keep}
  os.makedirs(directory)
  safetensors_io.save_sharded(directory, entries, ((rename[n], tensors.get(n)) for n in keep),
                              max(os.path.getsize(tensors.file_of(n)) for n in keep))
  c = hf.read_nextstep_config(src)[0].backbone
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(dict(model_type="qwen2", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                   num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                   head_dim=c.head_dim, intermediate_size=c.intermediate_size, rope_theta=c.rope_theta,
                   rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False), f)


def worker(args) -> None:
  from nextstep_jax import parallel  # pylint: disable=import-outside-toplevel
  parallel.maybe_initialize_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from nextstep_jax.interop import runs  # pylint: disable=import-outside-toplevel
  jnp.zeros(8).block_until_ready()  # the runtime up before the baseline
  base = _reset_peak()
  t0 = time.perf_counter()
  if args.worker == "import":
    runs.import_run(args.src, args.work)
  elif args.worker == "qwen2":  # the Qwen2.5 directory in args.back, into a params-only checkpoint in args.work
    from nextstep_jax.interop import hf  # pylint: disable=import-outside-toplevel
    cfg, meta = hf.read_nextstep_config(args.src)
    config = runs.run_config(cfg, meta, args.work, vae_dir=None, vae_factor=8)
    runs.import_to_checkpoint(args.back, args.work, qwen2=True, config=config)
  else:
    runs.export_workdir(args.work, args.back, dtype="bfloat16")
  print(json.dumps({"process": jax.process_index(), "baseline": base, "peak": _status("VmHWM"),
                    "seconds": time.perf_counter() - t0}), flush=True)


def launch(n: int, args, what: str) -> list[dict]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(n):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if n > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i),
                 JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={what}", f"--src={args.src}",
           f"--work={args.work}", f"--back={args.back}"]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=1800)
    if p.returncode:
      raise SystemExit(f"{what} worker failed ({p.returncode}):\n{stderr[-3000:]}")
    out.append(json.loads(stdout.strip().splitlines()[-1]))
  return out


def same_tensors(a: str, b: str) -> bool:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from nextstep_jax.interop import safetensors_io  # pylint: disable=import-outside-toplevel
  x, y = safetensors_io.TensorDir(a), safetensors_io.TensorDir(b)
  if sorted(x.names()) != sorted(y.names()):
    return False
  return all(np.array_equal(x.get(n).view(np.uint16), y.get(n).view(np.uint16)) for n in x.names())


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--processes", default="1,8")
  p.add_argument("--shard_mb", type=int, default=48)
  p.add_argument("--layers", type=int, default=16)
  p.add_argument("--qwen2", action="store_true", help="also import the backbone as a Qwen2.5 directory")
  p.add_argument("--worker", default="")
  p.add_argument("--src", default="")
  p.add_argument("--work", default="")
  p.add_argument("--back", default="")
  args = p.parse_args()
  if args.worker:
    worker(args)
    return
  root = tempfile.mkdtemp(prefix="nextstep_interop_memory_")
  src = os.path.join(root, "official")
  total = build_source(src, args.shard_mb * MB, args.layers)
  shards = len([f for f in os.listdir(src) if f.endswith(".safetensors")])
  shard = total / shards
  print(f"source: {shards} shards, {total / MB:.0f} MB of bf16 tensors ({shard / MB:.1f} MB a shard)", flush=True)
  rows = []
  for n in (int(x) for x in args.processes.split(",")):
    args.src, args.work, args.back = src, os.path.join(root, f"run{n}"), os.path.join(root, f"back{n}")
    for what in ("import", "export"):
      res = launch(n, args, what)
      grow = max(r["peak"] - r["baseline"] for r in res)
      rows.append((n, what, grow, max(r["seconds"] for r in res)))
      print(f"{n} process(es), {what}: peak growth {grow / MB:.0f} MB in the largest process = "
            f"{grow / shard:.2f} shards ({max(r['seconds'] for r in res):.1f} s)", flush=True)
    print(f"  exported == source, bit for bit: {same_tensors(src, args.back)}", flush=True)
    if args.qwen2:
      qwen = os.path.join(root, "qwen2")
      if not os.path.isdir(qwen):
        build_qwen2(src, qwen)
      args.work, args.back = os.path.join(root, f"qwen2_ckpt{n}"), qwen
      res = launch(n, args, "qwen2")
      grow = max(r["peak"] - r["baseline"] for r in res)
      rows.append((n, "qwen2 import", grow, max(r["seconds"] for r in res)))
      print(f"{n} process(es), qwen2 import: peak growth {grow / MB:.0f} MB in the largest process = "
            f"{grow / shard:.2f} shards ({max(r['seconds'] for r in res):.1f} s)", flush=True)
  print()
  print(f"| processes | step | peak growth per process | in shards ({shard / MB:.0f} MB) |")
  print("|---|---|---|---|")
  for n, what, grow, _ in rows:
    print(f"| {n} | {what} | {grow / MB:.0f} MB | {grow / shard:.2f} |")


if __name__ == "__main__":
  main()
