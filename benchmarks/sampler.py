"""The compiled sampler against this machine's weight-read floor and in-process references (figures only).

  python benchmarks/sampler.py [--runs=demo@4,4.6m@16,126m@16,126m@32] [--steps=28] [--cfg=7.5]
                               [--batches=1,4,16,64] [--repeats=3]

A run is MODEL@SIDE: the model and the side of its token grid (16: a 256² image with the f8 VAE and 2x2
patches, 256 tokens; 32: 512², 1024 tokens). Models (random weights; the cost does not depend on them):
  demo   the demo preset: hidden 128, 4 layers, head 2 x 128, tokens of dim 16 (its images are 4 x 4)
  4.6m   hidden 256, 4 layers (4 heads, 2 KV), MLP 768, vocab 1024, head 2 x 256 (a 1M-parameter head)
  126m   hidden 768, 12 layers (12 heads, 4 KV), MLP 2048, vocab 16384, head 6 x 768 (20.4M parameters)
  1.5b   the Qwen2.5-1.5B backbone, head 6 x 1024, for an accelerator:
         python benchmarks/sampler.py --runs=1.5b@32 --batch_runs=1.5b@32 --batches=1,64 --dtype=bfloat16 \
             --naive_tokens=0
Every image is sampled with classifier-free guidance (a conditional and an unconditional row per image)
from a 46-position prompt pair, with the official SDE head sampler (--steps evaluations per token).

Per run it prints:
- sampler: ``sampling.sample_images`` per image on the weights laid out once (``sampling.sampler_weights``,
  as the sample command does; best of --repeats after a compiling call), per token;
- head: one evaluation inside the token loop (the sampler's layout, ``sampling/layout.py``), against the
  training layout (``flow.sample_token`` over ``FlowHead.__call__``: stacked blocks under a scan), both
  timed over whole tokens in a compiled loop in this process;
- decode: one KV-cached backbone step with the sampler's per-layer weights and cache, against the
  training layout (``Backbone.__call__``: a scan over stacked weights and a stacked cache);
- text: one text token of ``sampling.generate`` (the LM head, the choice, one decode step on the sampler's
  layout) against the same step on the training layout, both driven per token from Python as generate does;
- naive: ``sampling.sample_images_naive`` (the whole sequence recomputed per token, the head's steps a
  Python loop), over --naive_tokens tokens, extrapolated to the image;
- floor: the bytes a token must read (the head's per-evaluation weights x evaluations, the condition's
  projection, the backbone's layer weights, both projectors, and the filled KV cache on average) over
  the read bandwidth of this machine measured at start (the best of a compiled sum over 1 GiB and two
  numpy threads summing its halves), and the sampler's ratio to it;
- batch: images per second with N images (2N rows) per call, for N in --batches (--batch_runs says
  which runs), the ratio to N = 1 and the matmul FLOP/s it reaches, against a dense matmul's
  rate in the run's dtype, measured at start (the compute bound a large batch meets).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from nextstep_jax import sampling  # noqa: E402
from nextstep_jax.models import backbone as bb  # noqa: E402
from nextstep_jax.models import fm_head  # noqa: E402
from nextstep_jax.models import nextstep as ns  # noqa: E402
from nextstep_jax.models import presets  # noqa: E402
from nextstep_jax.sampling import flow, layout  # noqa: E402
from nextstep_jax.sampling import sampler as sampler_lib  # noqa: E402
# The module itself: the package's name ``sampling.generate`` is its function.
generate_lib = importlib.import_module("nextstep_jax.sampling.generate")

PROMPT_LEN, NEG_LEN = 46, 46

MODELS = {
    "demo": dict(backbone=bb.BackboneConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                                            num_kv_heads=2, head_dim=32, intermediate_size=384, rope_theta=1e4),
                 head=(2, 128), token_dim=16),
    "4.6m": dict(backbone=bb.BackboneConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4,
                                            num_kv_heads=2, head_dim=64, intermediate_size=768, rope_theta=1e4),
                 head=(2, 256), token_dim=64),
    "126m": dict(backbone=bb.BackboneConfig(vocab_size=16384, hidden_size=768, num_layers=12, num_heads=12,
                                            num_kv_heads=4, head_dim=64, intermediate_size=2048, rope_theta=1e4),
                 head=(6, 768), token_dim=64),
    # The GPU run's 1B-class model: the Qwen2.5-1.5B backbone with the paper's small head (6 x 1024).
    "1.5b": dict(backbone=bb.BackboneConfig(**presets.BACKBONES["qwen2.5-1.5b"]),
                 head=(presets.HEADS["small"]["num_layers"], presets.HEADS["small"]["dim"]), token_dim=64),
}


def build(name: str, dtype: str = "float32") -> ns.NextStep:
  """A model of the named size with random weights (numpy-filled, so nothing compiles per init op), its
  weights and compute in `dtype`."""
  m = MODELS[name]
  c = dataclasses.replace(m["backbone"], dtype=dtype, param_dtype=dtype)
  layers, dim = m["head"]
  head = fm_head.HeadConfig(dim=dim, num_layers=layers, cond_dim=c.hidden_size, token_dim=m["token_dim"],
                            dtype=dtype, param_dtype=dtype)
  cfg = ns.NextStepConfig(backbone=c, head=head, token_dim=m["token_dim"])
  model = nnx.eval_shape(lambda: ns.NextStep(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  state = nnx.state(model, nnx.Param)
  params = jax.tree.map(lambda x: (rng.standard_normal(x.shape, np.float32) * 0.02).astype(x.dtype),
                        nnx.to_pure_dict(state))
  for scale in (params["backbone"]["final_norm_scale"], params["backbone"]["layers"]["input_norm_scale"],
                params["backbone"]["layers"]["post_norm_scale"], params["head"]["ln_scale"]):
    scale[:] = 1.0  # norm scales at one, so activations stay in a sane range
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  return model


def prompts(vocab: int, rows: int) -> tuple[sampling.Prompt, sampling.Prompt]:
  rng = np.random.default_rng(1)
  cond = rng.integers(20, vocab, size=(rows, PROMPT_LEN)).astype(np.int32)
  neg = np.zeros((rows, NEG_LEN), np.int32)
  neg[:, -8:] = rng.integers(20, vocab, size=(rows, 8))
  return sampling.Prompt(cond, np.ones_like(cond, bool)), sampling.Prompt(neg, neg != 0)


def best_of(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def read_bandwidth() -> float:
  """Bytes per second of the best of: a compiled sum over 1 GiB (4 GiB on an accelerator, in its memory),
  and on the CPU two numpy threads summing its halves."""
  cpu = jax.default_backend() == "cpu"
  x = jnp.ones(2 ** (28 if cpu else 30), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  t_xla = best_of(lambda: total(x), 5)
  if not cpu:
    return x.nbytes / t_xla
  a = np.ones(2 ** 28, np.float32)
  halves = a.reshape(2, -1)

  def two_threads():
    threads = [threading.Thread(target=halves[i].sum) for i in range(2)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()

  t_np = best_of(two_threads, 5)
  return a.nbytes / min(t_xla, t_np)


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def token_bytes(model: ns.NextStep, steps: int, rows: int, mean_slots: float) -> dict[str, float]:
  """The bytes one image token must read, by part."""
  head = model.head
  per_eval = nbytes(layout.head_layout(head))  # input projection, adaLN, blocks, final layer
  c = model.config.backbone
  cache = c.num_layers * rows * mean_slots * c.num_kv_heads * c.head_dim * 2 * jnp.dtype(c.dtype).itemsize
  return {"head": steps * per_eval, "cond": nbytes([head.cond_kernel[...], head.cond_bias[...]]),
          "layers": nbytes(model.backbone.layers.stacked()),
          "projectors": nbytes([model.image_in_kernel[...], model.image_out_kernel[...]]), "cache": cache,
          "per_eval": per_eval}


def flops_per_image(model: ns.NextStep, steps: int, t_img: int) -> float:
  """Matmul FLOPs of one guided image (2 rows): the prompt's prefill, and per token the head's `steps`
  evaluations (its adaLN for every step, the blocks' MLPs, input and output projections), the condition
  and the projectors, and one decode step (layer weights and attention over the filled cache)."""
  c, hc = model.config.backbone, model.config.head
  layers = sum(x.size for x in jax.tree.leaves(model.backbone.layers.stacked()))
  attn = lambda slots: 4 * c.num_layers * slots * c.num_heads * c.head_dim
  d, n, td = hc.dim, hc.num_layers, hc.token_dim
  head = steps * 2 * ((3 * n + 2) * d * d + 2 * n * d * d + 2 * d * td) + 2 * hc.cond_dim * d
  per_token = head + 2 * (layers + td * c.hidden_size + c.hidden_size ** 2) + attn(PROMPT_LEN + t_img / 2)
  prefill = PROMPT_LEN * (2 * layers + attn(PROMPT_LEN / 2))
  return 2 * (prefill + t_img * per_token)


def matmul_rate(dtype: str) -> float:
  """FLOP/s of a compiled 2048 x 2048 matmul in `dtype` (the dense peak the batched sampler works against)."""
  a = jnp.ones((2048, 2048), dtype)
  mm = jax.jit(lambda a: a @ a)
  mm(a).block_until_ready()
  return 2 * 2048 ** 3 / best_of(lambda: mm(a), 5)


def time_head(model: ns.NextStep, steps: int, tokens: int, repeats: int) -> tuple[float, float]:
  """Seconds per head evaluation (sampler layout, training layout) inside a compiled token loop. The
  weights are arguments (closed over, they would be baked into the program as constants)."""
  graphdef, state = nnx.split(model.head)
  d = model.config.token_dim
  cond = jax.random.normal(jax.random.key(2), (2, model.config.backbone.hidden_size), jnp.float32)
  grid = flow.eval_grid(steps, 1.0, True)

  @jax.jit
  def fast(state, cond, key):
    head = nnx.merge(graphdef, state)
    hl, ttable = layout.head_layout(head), head.time_embed(grid)

    def body(i, acc):
      cy = head.cond_embed(cond + 1e-3 * acc[0, 0])
      x0, zs = flow.token_noise(jax.random.fold_in(key, i), 1, d, steps, sde=True)
      return acc + sampler_lib.draw_token(hl, ttable, cy, x0, zs, groups=2, steps=steps, cfg=7.5, cfg_img=1.0,
                                          time_shift=1.0)
    return jax.lax.fori_loop(0, tokens, body, jnp.zeros((1, d)))

  @jax.jit
  def stacked(state, cond, key):
    head = nnx.merge(graphdef, state)

    def body(i, acc):
      return acc + flow.sample_token(head, cond + 1e-3 * acc[0, 0], jax.random.fold_in(key, i), groups=2,
                                     steps=steps, sde=True, cfg=7.5, cfg_img=1.0, time_shift=1.0)
    return jax.lax.fori_loop(0, tokens, body, jnp.zeros((1, d)))

  out = []
  for fn in (fast, stacked):
    fn(state, cond, jax.random.key(0)).block_until_ready()
    out.append(best_of(lambda fn=fn: fn(state, cond, jax.random.key(1)), repeats) / (tokens * steps))
  return out[0], out[1]


def time_decode(model: ns.NextStep, slots: int, n: int, repeats: int) -> tuple[float, float]:
  """Seconds per one-token decode step (2 rows) over a cache of `slots` (sampler layout, training layout);
  the weights are arguments."""
  graphdef, state = nnx.split(model)
  c = model.config.backbone
  x = jax.random.normal(jax.random.key(3), (2, 1, c.hidden_size), jnp.float32).astype(c.dtype)
  start = slots - n - 1

  @jax.jit
  def fast(state, x):
    dec = layout.decoder_layout(nnx.merge(graphdef, state))
    cache = dict(layout.init_cache(c, 2, slots), index=jnp.int32(start))

    def body(i, carry):
      cache, x = carry
      h, cache = layout.decode(c, dec, x, jnp.full((2, 1), start + i), jnp.ones((2, 1), jnp.int32), cache)
      return cache, h
    return jax.lax.fori_loop(0, n, body, (cache, x))[1]

  @jax.jit
  def stacked(state, x):
    backbone = nnx.merge(graphdef, state).backbone
    cache = dict(backbone.init_cache(2, slots), index=jnp.int32(start))

    def body(i, carry):
      cache, x = carry
      h, cache = backbone(x, jnp.full((2, 1), start + i), jnp.ones((2, 1), jnp.int32), cache=cache)
      return cache, h
    return jax.lax.fori_loop(0, n, body, (cache, x))[1]

  out = []
  for fn in (fast, stacked):
    fn(state, x).block_until_ready()
    out.append(best_of(lambda fn=fn: fn(state, x), repeats) / n)
  return out[0], out[1]


def time_text_step(model: ns.NextStep, slots: int, n: int, repeats: int) -> tuple[float, float]:
  """Seconds per text token of ``sampling.generate`` (its compiled step, driven from Python per token as
  generate drives it: the LM head's logits, greedy choice, one decode step of the chosen token on the
  sampler's layout), against the same step on the training layout (``Backbone.__call__`` over the stacked
  weights and a stacked cache, as generate ran before)."""
  graphdef, state = nnx.split(model)
  c = model.config.backbone
  weights = sampling.sampler_weights(model)
  args = (jnp.float32(0.0), jnp.float32(1.0), jnp.int32(c.vocab_size))
  pos, key = jnp.asarray([slots - n - 1], jnp.int32), jax.random.key(4)
  h0 = jax.random.normal(jax.random.key(3), (1, c.hidden_size), jnp.float32).astype(c.dtype)

  @jax.jit
  def stacked(state, cache, h, pos, key, temperature, top_p, vocab_limit):
    backbone = nnx.merge(graphdef, state).backbone
    tok = sampling.sample_logits(backbone.logits(h[:, None])[:, 0], key, temperature, top_p, vocab_limit)
    hs, cache = backbone(backbone.embed(tok[:, None]), pos[:, None], jnp.ones((1, 1), jnp.int32), cache=cache)
    return tok, hs[:, 0], cache

  text_step = generate_lib._text_step_jit  # pylint: disable=protected-access
  steps = {"sampler": (lambda cache, h: text_step(weights, cache, h, pos, key, *args),
                       lambda: layout.init_cache(c, 1, slots)),
           "training": (lambda cache, h: stacked(state, cache, h, pos, key, *args),
                        lambda: model.backbone.init_cache(1, slots))}
  out = []
  for step, fresh in steps.values():
    def tokens(step=step, fresh=fresh):
      cache, h = fresh(), h0
      for _ in range(n):
        _, h, cache = step(cache, h)
      return h
    tokens().block_until_ready()
    out.append(best_of(tokens, repeats) / n)
  return out[0], out[1]


def bench(run: str, args, bandwidth: float) -> None:
  name, side = run.split("@")
  side = int(side)
  t_img, steps = side * side, args.steps
  model = build(name, args.dtype)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  head_params = sum(x.size for x in jax.tree.leaves(nnx.state(model.head, nnx.Param)))
  print(f"\n== {run}: {n_params / 1e6:.1f}M parameters (head {head_params / 1e6:.2f}M), {t_img} tokens "
        f"({side}x{side}) of dim {model.config.token_dim}, {steps} head evaluations per token, cfg {args.cfg}, "
        f"{args.dtype}")
  cond, neg = prompts(model.config.backbone.vocab_size, 1)
  slots = PROMPT_LEN + t_img
  parts = token_bytes(model, steps, 2, PROMPT_LEN + t_img / 2)
  floor_token = sum(v for k, v in parts.items() if k != "per_eval") / bandwidth
  floor_eval = parts["per_eval"] / bandwidth

  weights = sampling.sampler_weights(model)  # laid out once, as the sample command does
  call = lambda key: sampling.sample_images(weights, cond, neg, side, side, key, cfg=args.cfg, steps=steps)
  t0 = time.perf_counter()
  out = jax.block_until_ready(call(jax.random.key(0)))
  first = time.perf_counter() - t0
  repeats = args.repeats if t_img * steps <= 256 * 28 else 1
  per_image = best_of(lambda: call(jax.random.key(1)), repeats)
  per_token = per_image / t_img
  print(f"sampler: {per_image:.3f} s per image, {1e3 * per_token:.2f} ms per token (best of {repeats}; first "
        f"call {first:.1f} s with compilation)")
  print(f"floor:   {1e3 * floor_token:.2f} ms per token = {sum(parts[k] for k in parts if k != 'per_eval') / 1e6:.1f}"
        f" MB (head {parts['head'] / 1e6:.1f} = {steps} x {parts['per_eval'] / 1e6:.2f}, layers "
        f"{parts['layers'] / 1e6:.1f}, projectors {(parts['projectors'] + parts['cond']) / 1e6:.1f}, cache "
        f"{parts['cache'] / 1e6:.1f}) at {bandwidth / 1e9:.1f} GB/s; sampler / floor = {per_token / floor_token:.2f}")

  h_tokens = max(2, min(64, 2048 // steps))
  fast, stacked = time_head(model, steps, h_tokens, args.repeats)
  print(f"head:    {1e3 * fast:.3f} ms per evaluation (training layout {1e3 * stacked:.3f} ms: "
        f"{stacked / fast:.2f}x); floor {1e3 * floor_eval:.3f} ms ({fast / floor_eval:.2f}x)")
  d_fast, d_stacked = time_decode(model, slots, min(32, t_img - 1), args.repeats)
  print(f"decode:  {1e3 * d_fast:.3f} ms per step (training layout {1e3 * d_stacked:.3f} ms: "
        f"{d_stacked / d_fast:.2f}x); in the token: head {steps * fast / per_token:.0%}, decode "
        f"{d_fast / per_token:.0%}")
  t_fast, t_stacked = time_text_step(model, slots, min(16, t_img - 1), args.repeats)
  print(f"text:    {1e3 * t_fast:.3f} ms per text token of sampling.generate (training layout "
        f"{1e3 * t_stacked:.3f} ms: {t_stacked / t_fast:.2f}x)")

  if args.naive_tokens:
    n = min(args.naive_tokens, t_img)
    sampling.sample_images_naive(model, [cond, neg], side, side, jax.random.key(1), cfg=args.cfg, steps=steps,
                                 max_tokens=1)  # compiles
    t0 = time.perf_counter()
    ref = sampling.sample_images_naive(model, [cond, neg], side, side, jax.random.key(0), cfg=args.cfg,
                                       steps=steps, max_tokens=n)
    naive = (time.perf_counter() - t0) / n
    err = float(np.abs(np.asarray(out)[:, :n] - ref).max())
    print(f"naive:   {naive * t_img:.2f} s per image ({1e3 * naive:.1f} ms per token over {n} tokens); sampler "
          f"{naive / per_token:.1f}x faster; max |sampler - naive| {err:.1e}")

  if run in args.batch_runs.split(","):
    rates = {}
    for b in [int(v) for v in args.batches.split(",")]:
      cond_b, neg_b = prompts(model.config.backbone.vocab_size, b)
      keys = jax.random.split(jax.random.key(5), b)
      fn = lambda: sampling.sample_images(weights, cond_b, neg_b, side, side, keys, cfg=args.cfg, steps=steps)
      jax.block_until_ready(fn())
      rates[b] = b / best_of(fn, 2 if b <= 16 else 1)
    work = flops_per_image(model, steps, t_img)
    print("batch:   " + ", ".join(f"{b}: {r:.2f} images/s ({r / rates[1]:.1f}x, {r * work / 1e9:.0f} GFLOP/s)"
                                  for b, r in rates.items()))
    print(f"         {work / 1e9:.2f} GFLOP per image; a 2048^2 matmul runs at {args.peak / 1e9:.0f} GFLOP/s here, "
          f"at which rate a batch would make at most {args.peak / work:.1f} images/s")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--runs", default="demo@4,4.6m@16,126m@16,126m@32")
  ap.add_argument("--steps", type=int, default=28)
  ap.add_argument("--cfg", type=float, default=7.5)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--naive_tokens", type=int, default=2)
  ap.add_argument("--batches", default="1,4,16,64")
  ap.add_argument("--batch_runs", default="demo@4,4.6m@16")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and compute")
  args = ap.parse_args()
  for run in args.runs.split(","):
    if run.split("@")[0] not in MODELS or "@" not in run:
      raise SystemExit(f"unknown run {run!r}; expected MODEL@SIDE with MODEL one of {sorted(MODELS)}")
  bandwidth = read_bandwidth()
  args.peak = matmul_rate(args.dtype)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; {args.dtype} matmul {args.peak / 1e9:.0f} GFLOP/s")
  for run in args.runs.split(","):
    bench(run, args, bandwidth)


if __name__ == "__main__":
  main()
