"""The naive reference sampler: a Python loop recomputing the full sequence without a cache every
token; it draws the same numbers as the compiled sampler (tests and benchmarks compare them)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nextstep_jax.models import nextstep as ns
from nextstep_jax.sampling.flow import SDE_LAST_STEP, row_noise, scheduled, token_noise
from nextstep_jax.sampling.prompts import PromptLike, as_prompt, stack_groups


# ---------------------------------------------------------------------------------------------
# The naive reference: a Python loop, the full sequence recomputed without a cache every token
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _naive_forward(graphdef, state, x_rld, pos_rl, seg_rl):
  model = nnx.merge(graphdef, state)
  return model.backbone(x_rld, pos_rl, seg_rl)[0]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _naive_velocity(graphdef, state, x_nd, t_n, cond_nd):
  return nnx.merge(graphdef, state).head(x_nd, t_n, cond_nd)


def sample_images_naive(model: ns.NextStep, prompts: Sequence[PromptLike], h: int, w: int, key: jax.Array, *,
                        cfg: float = 7.5, cfg_img: float = 2.0, steps: int = 28, time_shift: float = 1.0,
                        use_norm: bool = True, sde: bool = True, pad_id: int = 0,
                        max_tokens: int | None = None, cfg_schedule: str = "constant",
                        noise_repeat: int = 0) -> np.ndarray:
  """Reference sampler: per image token, the whole (P + h*w)-slot sequence is recomputed without a
  cache (not-yet-sampled slots masked), and the head's integration is a Python loop. Same groups,
  guidance and random draws as ``sample_guided``. ``max_tokens`` stops after that many tokens (for
  timing). Returns (B, n, d) numpy."""
  ps = [as_prompt(p, pad_id=pad_id, name=f"prompt group {g}") for g, p in enumerate(prompts)]
  s = stack_groups(ps)
  groups = len(ps)
  tokens, mask = s["tokens"], s["mask"].astype(bool)
  r, p = tokens.shape
  b, d, n_img = r // groups, model.config.token_dim, h * w
  n = n_img if max_tokens is None else min(max_tokens, n_img)
  graphdef, state = nnx.split(model)

  # Prompt embeddings, image positions written one by one.
  x = np.array(model.backbone.embed(jnp.asarray(tokens)), dtype=np.float32)
  if s["image_tokens"] is not None:
    img = model.prepare_tokens(jnp.asarray(s["image_tokens"]))
    for row, col in zip(*np.nonzero(s["image_index"] >= 0)):
      x[row, col] = np.asarray(model.image_in(img[row, s["image_index"][row, col]]))
  lengths = mask.sum(1)
  pos = np.zeros((r, p + n_img), np.int32)
  seg = np.zeros((r, p + n_img), np.int32)
  for row in range(r):
    pos[row, p - lengths[row]:p] = np.arange(lengths[row])
    pos[row, p:] = lengths[row] + np.arange(n_img)
  seg[:, :p] = mask
  x = np.concatenate([x, np.zeros((r, n_img, x.shape[2]), np.float32)], axis=1)

  # Time grids in float64, rounded to float32.
  shift = float(time_shift)
  shifted = lambda t: (t / (shift - (shift - 1.0) * t)).astype(np.float32)
  grid = shifted(np.linspace(0.0, 1.0 - SDE_LAST_STEP, steps) if sde else np.linspace(0.0, 1.0, steps + 1))

  def velocity(x_bd, t, cond, i):
    v = np.asarray(_naive_velocity(graphdef, state, jnp.asarray(np.tile(x_bd, (groups, 1))),
                                   jnp.full((r,), t, jnp.float32), cond)).reshape(groups, b, d)
    g, gi = (np.float32(scheduled(s_, i, n_img, cfg_schedule)) for s_ in (cfg, cfg_img))
    if groups == 1:
      return v[0]
    if groups == 2:
      return v[1] + g * (v[0] - v[1])
    return v[2] + gi * (v[1] - v[2]) + g * (v[0] - v[1])

  out = np.zeros((b, n, d), np.float32)
  for i in range(n):
    hs = _naive_forward(graphdef, state, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg))
    cond = model.image_out(hs[:, p + i - 1])
    if jnp.ndim(key) == 1:  # one key per image
      x0, zs = row_noise(key, i, d, steps, sde=sde)
    else:
      x0, zs = token_noise(jax.random.fold_in(key, i), b, d, steps, sde=sde, noise_repeat=noise_repeat)
    xt = np.asarray(x0)
    if not sde:
      for k in range(steps):
        xt = xt + (grid[k + 1] - grid[k]) * velocity(xt, grid[k], cond, i)
    else:
      zs = np.asarray(zs)
      for k in range(steps - 1):
        t, dt = grid[k], grid[k + 1] - grid[k]
        xt = xt + ((1 + t) * velocity(xt, t, cond, i) - xt) * dt + np.sqrt(2 * (1 - t) * dt) * zs[k]
      xt = xt + velocity(xt, grid[steps - 1], cond, i) * np.float32(SDE_LAST_STEP)
    if use_norm:
      mu = xt.mean(-1, keepdims=True)
      xt = (xt - mu) / np.sqrt(((xt - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
    out[:, i] = xt
    x[:, p + i] = np.asarray(model.image_in(jnp.asarray(np.tile(xt, (groups, 1)))))
    seg[:, p + i] = 1
  return out
