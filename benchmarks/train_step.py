"""Train-step speed on this host, and compile time against depth (scanned layers keep it flat).

  python benchmarks/train_step.py                       # demo preset and a ~100M model, 4 vs 48 layers
  python benchmarks/train_step.py --steps=5 --tpu_topology=v5p-64   # also the 14B step compiled for TPU

Prints a table: parameters, tokens per step, compile seconds, step seconds (median of --steps after
one warm-up), tokens/s, TFLOP/s per device and MFU (n/a on CPU). The depth rows compile the ~100M
model's step with 4 and with 48 layers and report compile time and XLA's memory figures for each;
``--tpu_topology`` adds the same comparison for the Qwen2.5-14B stage-2 step compiled for that TPU
topology with nextstep_jax.aot (needs libtpu: pip install "jax[tpu]"). Batches are synthetic packed
rows on the latent path (the data pipeline has its own benchmark: benchmarks/data.py).
Never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs.common import base_config  # noqa: E402
from nextstep_jax import overrides as overrides_lib  # noqa: E402
from nextstep_jax.training import trainer as trainer_lib  # noqa: E402
from nextstep_jax.training import flops as flops_lib  # noqa: E402
from nextstep_jax import parallel  # noqa: E402
from nextstep_jax.batch import IGNORE  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """Packed latent-path rows: two documents per row, each text then one image of `per_image` tokens."""
  rng = np.random.default_rng(seed)
  b, seq = int(config.data.batch_size), int(config.data.seq_len)
  m, d = int(config.data.max_row_image_tokens), int(config.image.token_dim)
  vocab = int(config.tokenizer.vocab_size)
  per_image = max(1, min(int(config.data.max_image_tokens), seq // 4, m // 2))
  batch = {k: np.zeros((b, seq), np.int32) for k in ("tokens", "segment_ids", "positions")}
  batch["targets"] = np.full((b, seq), IGNORE, np.int32)
  batch["image_index"] = np.full((b, seq), -1, np.int32)
  batch["fm_mask"] = np.zeros((b, seq), np.float32)
  batch["image_tokens"] = np.zeros((b, m, d), np.float32)
  batch["num_images"] = np.zeros((b,), np.int32)
  half = seq // 2
  for r in range(b):
    slot = 0
    for doc in range(2):
      start = doc * half
      text = half - per_image - 2
      batch["tokens"][r, start:start + half] = rng.integers(10, vocab, half)
      batch["segment_ids"][r, start:start + half] = doc + 1
      batch["positions"][r, start:start + half] = np.arange(half)
      batch["targets"][r, start:start + text] = rng.integers(10, vocab, text)
      img = slice(start + text + 1, start + text + 1 + per_image)
      batch["image_index"][r, img] = np.arange(slot, slot + per_image)
      batch["fm_mask"][r, img] = 1.0
      batch["image_tokens"][r, slot:slot + per_image] = rng.normal(size=(per_image, d))
      batch["num_images"][r] += 1
      slot += per_image
  return batch


def demo_config():
  c = overrides_lib.load_config(os.path.join(REPO, "configs/demo.py"), check=False)
  c = c.copy_and_resolve_references()
  c.data.payload = "image_tokens"
  return c


def config_100m(num_layers: int = 12):
  """About 100M parameters (GPT-2-small-like widths, a 32K vocabulary), 512-token rows."""
  c = base_config("tiny", "small")
  c.model.update(vocab_size=32768, hidden_size=768, num_layers=num_layers, num_heads=12, num_kv_heads=4,
                 head_dim=64, intermediate_size=2048, rope_theta=1e6)
  c.head.update(dim=256, num_layers=3)
  c.tokenizer.vocab_size = 32768
  c.data.seq_len = 512
  c.data.batch_size = 4
  c.data.max_image_tokens = 64
  c.data.max_row_image_tokens = 128
  return c


def _mesh():
  return parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices())


def measure(name: str, config, steps: int) -> dict:
  mesh = _mesh()
  t = trainer_lib.Trainer(config, mesh)
  state = t.init_state(config.seed)
  batches = [parallel.global_batch(synthetic_batch(config, s), mesh) for s in range(2)]
  t0 = time.perf_counter()
  compiled = t.step_fn.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batches[0])  # warm-up
  jax.block_until_ready(metrics["loss"])
  times = []
  for s in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batches[s % 2])
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  tokens = int(config.data.batch_size) * int(config.data.seq_len)
  flops = flops_lib.step_flops(config)
  n = jax.device_count()
  mfu = flops_lib.mfu(flops, step_s, n, jax.devices()[0].device_kind)
  return dict(name=name, params=trainer_lib.count_params(t.abstract_params), tokens=tokens, compile_s=compile_s,
              step_s=step_s, tokens_s=tokens / step_s, tflops=flops_lib.tflops_per_device(flops, step_s, n),
              mfu=mfu, loss=float(metrics["loss"]))


def compile_only(config) -> dict:
  """Compile time and XLA memory figures of the step on this host (nothing runs)."""
  mesh = _mesh()
  t = trainer_lib.Trainer(config, mesh)
  state = parallel.with_shardings(t.abstract_state, t.state_shardings)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=t.batch_sharding)
           for k, v in synthetic_batch(config).items()}
  t0 = time.perf_counter()
  lowered = t.step_fn.lower(state, batch)
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0 - lower_s
  ma = compiled.memory_analysis()
  return dict(params=trainer_lib.count_params(t.abstract_params), lower_s=lower_s, compile_s=compile_s,
              temp_gib=ma.temp_size_in_bytes / 2**30 if ma else float("nan"),
              args_gib=ma.argument_size_in_bytes / 2**30 if ma else float("nan"))


def tpu_depth(topology: str, layers: int) -> dict:
  from nextstep_jax.training import aot  # pylint: disable=import-outside-toplevel
  topo = aot.parse_topology(topology)
  config = overrides_lib.load_config(os.path.join(REPO, "configs/stage2.py"), {"model.num_layers": layers},
                                  check=False)
  config = aot.prepare_config(config, topo)
  r = aot.compile_train_step(config, aot.topology_devices(topo), topology_name=topology,
                             hbm_bytes=topo.spec.hbm_bytes)
  return dict(params=r.params, lower_s=r.lower_s, compile_s=r.compile_s,
              total_gib=(r.total_bytes or 0) / 2**30, temp_gib=(r.temp_bytes or 0) / 2**30, verdict=r.verdict())


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
  p.add_argument("--skip_speed", action="store_true", help="only the compile-time rows")
  p.add_argument("--tpu_topology", default="", help="also compile the 14B step for this TPU topology "
                 "with 4 and 48 layers (e.g. v5p-64; needs libtpu)")
  a = p.parse_args()
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), {os.cpu_count()} CPU cores")
  if not a.skip_speed:
    rows = [measure("demo (tiny)", demo_config(), a.steps), measure("~100M", config_100m(), a.steps)]
    print("\n| model | params | tokens/step | compile s | step s | tokens/s | TFLOP/s/device | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
      mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
      print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['tokens']} | {r['compile_s']:.1f} | "
            f"{r['step_s']:.3f} | {r['tokens_s']:.0f} | {r['tflops']:.4f} | {mfu} |")
  print("\n| depth (scanned layers) | params | lower s | compile s | args GiB | temp GiB |")
  print("|---|---|---|---|---|---|")
  for layers in (4, 48):
    r = compile_only(config_100m(layers))
    print(f"| ~100M widths, {layers} layers (CPU) | {r['params'] / 1e6:.0f}M | {r['lower_s']:.1f} | "
          f"{r['compile_s']:.1f} | {r['args_gib']:.2f} | {r['temp_gib']:.2f} |")
  if a.tpu_topology:
    print(f"\n| 14B stage-2 step on {a.tpu_topology} | params | lower s | compile s | Total GiB | temp GiB | verdict |")
    print("|---|---|---|---|---|---|---|")
    for layers in (4, 48):
      r = tpu_depth(a.tpu_topology, layers)
      print(f"| {layers} layers | {r['params'] / 1e9:.2f}B | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
            f"{r['total_gib']:.2f} | {r['temp_gib']:.2f} | {r['verdict']} |")


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  main()
