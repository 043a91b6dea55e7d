"""Train-step throughput and MFU of a 1B-class NextStep on one NVIDIA GPU.

  pip install -r requirements.txt "jax[cuda12]"
  python benchmarks/gpu_train.py                          # Qwen2.5-1.5B dims, small head, seq 4096
  python benchmarks/gpu_train.py --head=base --remat=dots --rows=2
  python benchmarks/gpu_train.py --tiny                   # the same path at toy sizes, any backend

Builds the real train step (nextstep_jax.training.trainer.Trainer: bf16 compute, fp32 master weights and AdamW,
cuDNN flash attention, chunked CE) on one device, feeds synthetic packed rows on the latent path (half
text, half image tokens), and prints compile time, step time (median after warm-up), tokens/s,
TFLOP/s and MFU against the device's bf16 dense peak (nextstep_jax.training.flops: H100/H200 989 TFLOP/s),
plus the device's peak memory. Without a GPU it says so and exits (use --tiny to exercise the path).
Never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from configs.common import HEADS, base_config  # noqa: E402
from nextstep_jax.training import flops as flops_lib  # noqa: E402
from nextstep_jax import parallel  # noqa: E402
from nextstep_jax.training import trainer as trainer_lib  # noqa: E402
from train_step import synthetic_batch  # noqa: E402  (benchmarks/train_step.py)


def make_config(a):
  if a.tiny:
    c = base_config("tiny", "tiny")
    c.data.seq_len = 256
    c.data.max_image_tokens = 64
    c.data.max_row_image_tokens = 128
  else:
    c = base_config("qwen2.5-1.5b", a.head)
    c.data.seq_len = a.seq
    c.data.max_image_tokens = min(1024, a.seq // 4)
    c.data.max_row_image_tokens = a.seq // 2
    c.loss.ce_chunk = 1024 if a.seq % 1024 == 0 else 0
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = a.remat
  c.model.attention = a.attention
  c.data.batch_size = a.rows
  c.tokenizer.vocab_size = c.model.vocab_size
  c.mesh.axes.update(data=1, fsdp=1, tensor=1)
  return c


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--head", default="small", choices=sorted(HEADS))
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--rows", type=int, default=1, help="rows of --seq tokens per step")
  p.add_argument("--remat", default="full", choices=("none", "full", "dots"))
  p.add_argument("--attention", default="cudnn", help="cudnn on GPU; xla/jax for comparison")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--tiny", action="store_true", help="toy sizes on any backend (checks the script)")
  a = p.parse_args()
  backend = jax.default_backend()
  if backend != "gpu" and not a.tiny:
    print(f"no GPU here (jax backend: {backend}); install jax[cuda12] on a GPU machine, or pass --tiny "
          "to run the same path at toy sizes")
    return
  if a.tiny and backend != "gpu" and a.attention == "cudnn":
    a.attention = "xla"
  config = make_config(a)
  device = jax.devices()[0]
  mesh = parallel.make_mesh(config.mesh, devices=[device])
  trainer = trainer_lib.Trainer(config, mesh)
  n_params = trainer_lib.count_params(trainer.abstract_params)
  print(f"{device.device_kind}: {n_params / 1e9:.3f}B parameters, {a.rows} x {config.data.seq_len} tokens, "
        f"head {config.head.dim}x{config.head.num_layers}, remat={a.remat}, attention={a.attention}")
  state = trainer.init_state(0)
  batches = [parallel.global_batch(synthetic_batch(config, s), mesh) for s in range(2)]
  t0 = time.perf_counter()
  step = trainer.step_fn.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics["loss"])
  times = []
  for s in range(a.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batches[s % 2])
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  tokens = a.rows * int(config.data.seq_len)
  flops = flops_lib.step_flops(config)
  mfu = flops_lib.mfu(flops, step_s, 1, device.device_kind)
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  print(f"compile {compile_s:.1f} s")
  print(f"step    {step_s * 1e3:.1f} ms (median of {a.steps}; min {min(times) * 1e3:.1f} ms)")
  print(f"tokens  {tokens / step_s:,.0f} tokens/s")
  print(f"FLOPs   {flops:.4g} per step, {flops_lib.tflops_per_device(flops, step_s, 1):.4g} TFLOP/s")
  print(f"MFU     {'n/a (no peak known for ' + device.device_kind + ')' if mfu is None else f'{100 * mfu:.1f}%'}")
  if peak is not None:
    print(f"memory  {peak / 2**30:.1f} GiB peak of {stats.get('bytes_limit', 0) / 2**30:.1f} GiB")
  print(f"loss    {float(metrics['loss']):.4f}")


if __name__ == "__main__":
  main()
