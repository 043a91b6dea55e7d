"""Seconds per image of the compiled sampler against the naive per-token loop (prints figures only).

  python benchmarks/sampler.py [--models=demo,100m] [--steps=28] [--cfg=7.5] [--naive_tokens=4]

Models (random weights; sampling cost does not depend on them):
  demo   the demo preset: hidden 128, 4 layers, FM head 2 x 128, 16 tokens of dim 16 (4 x 4 grid)
  100m   about 100M parameters: hidden 768, 12 layers (12 heads, 4 KV heads), MLP 2048, vocab 16384,
         FM head 4 x 512, 256 tokens of dim 64 (16 x 16 grid)
Both sample one image with classifier-free guidance (a conditional and an unconditional row) from a
32-token prompt. "compiled" is ``sampling.sample_images`` (prefill, then a fori_loop of KV-cached decode
steps and head integrations); its first call includes compilation, reported separately. "naive" is
``sampling.sample_images_naive``: per token the whole (prompt + image) sequence is recomputed without a
cache (one compiled forward over the full fixed-length buffer, later slots masked) and the head's
steps are a Python loop. For the 100M model the naive loop runs --naive_tokens tokens and the per-image
time is extrapolated (its per-token cost is the same at every position, since the buffer length is
fixed); a naive loop that grew the sequence instead would do about (P + T/2) / (P + T) of that work
per token on average, which the output also states.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from nextstep_jax import sampling  # noqa: E402
from nextstep_jax.models import backbone as bb  # noqa: E402
from nextstep_jax.models import fm_head  # noqa: E402
from nextstep_jax.models import nextstep as ns  # noqa: E402

PROMPT_LEN = 32

MODELS = {
    "demo": dict(backbone=bb.BackboneConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                                            num_kv_heads=2, head_dim=32, intermediate_size=384, rope_theta=1e4),
                 head=(2, 128), token_dim=16, grid=(4, 4)),
    "100m": dict(backbone=bb.BackboneConfig(vocab_size=16384, hidden_size=768, num_layers=12, num_heads=12,
                                            num_kv_heads=4, head_dim=64, intermediate_size=2048, rope_theta=1e4),
                 head=(4, 512), token_dim=64, grid=(16, 16)),
}


def build(name: str) -> ns.NextStep:
  """A model of the named size with random weights (numpy-filled, so nothing compiles per init op)."""
  m = MODELS[name]
  c = m["backbone"]
  layers, dim = m["head"]
  cfg = ns.NextStepConfig(backbone=c, head=fm_head.HeadConfig(dim=dim, num_layers=layers, cond_dim=c.hidden_size,
                                                              token_dim=m["token_dim"]), token_dim=m["token_dim"])
  model = nnx.eval_shape(lambda: ns.NextStep(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  state = nnx.state(model, nnx.Param)
  params = jax.tree.map(lambda x: (rng.standard_normal(x.shape, np.float32) * 0.02).astype(np.float32),
                        nnx.to_pure_dict(state))
  # Norm scales at one, so activations stay in a sane range.
  params["backbone"]["final_norm_scale"][:] = 1.0
  params["backbone"]["layers"]["input_norm_scale"][:] = 1.0
  params["backbone"]["layers"]["post_norm_scale"][:] = 1.0
  params["head"]["ln_scale"][:] = 1.0
  nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
  nnx.update(model, state)
  return model


def prompts(vocab: int, rows: int = 1) -> tuple[sampling.Prompt, sampling.Prompt]:
  rng = np.random.default_rng(1)
  cond = rng.integers(20, vocab, size=(rows, PROMPT_LEN)).astype(np.int32)
  neg = np.zeros((rows, 8), np.int32)
  neg[:, 3:] = rng.integers(20, vocab, size=(rows, 5))
  return sampling.Prompt(cond, np.ones_like(cond, bool)), sampling.Prompt(neg, neg != 0)


def bench(name: str, steps: int, cfg: float, naive_tokens: int | None) -> None:
  m = MODELS[name]
  h, w = m["grid"]
  t_img = h * w
  t0 = time.perf_counter()
  model = build(name)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"\n== {name}: {n_params / 1e6:.1f}M parameters, {t_img} tokens ({h}x{w}) of dim {m['token_dim']}, "
        f"{steps} head steps, cfg {cfg} (2 rows), prompt {PROMPT_LEN} tokens (built in "
        f"{time.perf_counter() - t0:.1f} s)")
  cond, neg = prompts(model.config.backbone.vocab_size)
  key = jax.random.key(0)

  t0 = time.perf_counter()
  out = sampling.sample_images(model, cond, neg, h, w, key, cfg=cfg, steps=steps)
  out.block_until_ready()
  first = time.perf_counter() - t0
  runs = []
  for i in range(2):
    t0 = time.perf_counter()
    sampling.sample_images(model, cond, neg, h, w, jax.random.key(i + 1), cfg=cfg, steps=steps).block_until_ready()
    runs.append(time.perf_counter() - t0)
  compiled = min(runs)
  print(f"compiled: {compiled:.3f} s per image ({1e3 * compiled / t_img:.2f} ms per token); first call "
        f"{first:.2f} s (compilation about {first - compiled:.2f} s)")

  n = t_img if naive_tokens is None else min(naive_tokens, t_img)
  sampling.sample_images_naive(model, [cond, neg], h, w, key, cfg=cfg, steps=steps, max_tokens=1)  # compiles
  t0 = time.perf_counter()
  ref = sampling.sample_images_naive(model, [cond, neg], h, w, key, cfg=cfg, steps=steps, max_tokens=n)
  naive_n = time.perf_counter() - t0
  naive = naive_n * t_img / n
  err = float(np.abs(np.asarray(out)[:, :n] - ref).max())
  how = "measured over all tokens" if n == t_img else f"extrapolated from {n} of {t_img} tokens"
  print(f"naive:    {naive:.3f} s per image ({1e3 * naive_n / n:.2f} ms per token; {how})")
  p = PROMPT_LEN
  grow = (p + (t_img + 1) / 2) / (p + t_img)
  print(f"speed-up: {naive / compiled:.1f}x (against a growing-sequence naive loop, about "
        f"{grow * naive / compiled:.1f}x: it would do {grow:.2f} of the work per token)")
  print(f"max |compiled - naive| over the first {n} tokens: {err:.2e}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default="demo,100m")
  ap.add_argument("--steps", type=int, default=28)
  ap.add_argument("--cfg", type=float, default=7.5)
  ap.add_argument("--naive_tokens", type=int, default=4, help="naive tokens timed for the 100m model")
  args = ap.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs visible, "
        f"{jax.device_count()} devices")
  for name in args.models.split(","):
    if name not in MODELS:
      raise SystemExit(f"unknown model {name!r}; known: {sorted(MODELS)}")
    bench(name, args.steps, args.cfg, None if name == "demo" else args.naive_tokens)


if __name__ == "__main__":
  main()
