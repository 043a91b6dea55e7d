"""Sampling (SPEC §6): a compiled image sampler, unified text/image generation, and a naive reference.

Image sampling. A prompt ends with the image prefix ``<|image_area|>{h}*{w}<|begin_of_image|>``
(``image_prompt_ids`` builds it). The prompt is prefilled into a fixed-size KV cache; then a
``jax.lax.fori_loop`` runs exactly h*w steps: the condition ``c = image_out(h_last)``, the
flow-matching head integrates one token from noise (t=0) to data (t=1) with Euler (ODE) or
Euler–Maruyama (SDE), the token is optionally layer-normed (``use_norm``), and ``image_in(token)``
is fed back into every row with one KV-cached decode step.

Guidance acts on the head only. Rows come in groups of B (one group per prompt kind), all in one
batch; the head sees the same x and t in every group and the velocities are combined:
  1 group   [cond]                         v = v_c
  2 groups  [cond, negative]               v = v_u + cfg (v_c - v_u)
  3 groups  [image+text, image+negative,   v = v_nn + cfg_img (v_in - v_nn) + cfg (v_it - v_in)
             negative only] (editing)
The sampled token is fed back into every group's rows.

Time grid: t_k = linspace(0, 1, N + 1), shifted by s: t' = t / (s - (s - 1) t).
SDE (after SiT's sampler, "sigma" diffusion w(t) = 1 - t, Mean last step): with the rectified-flow
score s(x, t) = (t v - x) / (1 - t), the drift is v + w s = (1 + t) v - x and the noise sqrt(2 w dt);
the grid is linspace(0, 1 - 0.04, N) shifted, N - 1 Euler–Maruyama steps, then one deterministic
step of the drift to t = 1 (size 0.04 unshifted). Both use N head evaluations per token.

Randomness: token i uses ``k_i = fold_in(key, i)``; ``k_init, k_sde = split(k_i)``; the start noise
is ``normal(k_init, (B, d))`` and SDE step j's noise ``normal(fold_in(k_sde, j), (B, d))``. The
compiled sampler and ``sample_images_naive`` draw the same numbers.

Prompts are left-padded: a ``Prompt`` holds tokens (B, P) and a mask (B, P) (1 on real tokens);
RoPE positions restart at 0 at each row's first real token; padding gets segment id 0, so it is
never attended to. Prompts that carry source images (editing) hold the image tokens (B, M, d) and
an index (B, P) into them, as in the training batch contract (``nextstep_jax/data/batch.py``).

Compilation: one executable per (rows, prompt length, h, w, steps, sde, use_norm, model graph).
cfg, cfg_img, time_shift, the key and the prompt contents are traced values, so prompts padded
to the same bucket never recompile (``trace_count`` counts traces, for tests).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from typing import Any, Protocol, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nextstep_jax.models import nextstep as ns

SDE_LAST_STEP = 0.04
BOT, EOT = "<|begin_of_thinking|>", "<|end_of_thinking|>"

_TRACES: collections.Counter = collections.Counter()


def trace_count(name: str | None = None) -> int:
  """How many times the jitted sampler functions were traced (all, or one by name)."""
  return sum(_TRACES.values()) if name is None else _TRACES[name]


class TokenizerLike(Protocol):
  """What sampling needs from a tokenizer (``nextstep_jax.data.tokenizer.Tokenizer`` has it)."""

  special: dict[str, int]

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def pad_id(self) -> int: ...


def _special(tokenizer: Any, name: str) -> int:
  special = getattr(tokenizer, "special", None)
  if not isinstance(special, dict) or name not in special:
    raise ValueError(f"tokenizer {tokenizer!r} has no special token {name!r} in its `special` map")
  return int(special[name])


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Prompt:
  """A batch of left-padded prompts.

  tokens (B, P) int32; mask (B, P) 1 on real tokens, 0 on the left padding; optional source-image
  tokens image_tokens (B, M, d) with image_index (B, P) (buffer index at image positions, -1
  elsewhere; the token id there is ignored).
  """
  tokens: np.ndarray
  mask: np.ndarray
  image_tokens: np.ndarray | None = None
  image_index: np.ndarray | None = None


PromptLike = Union[Prompt, np.ndarray, jax.Array, tuple]


def as_prompt(p: PromptLike, *, pad_id: int = 0, image_tokens=None, image_index=None,
              name: str = "prompt") -> Prompt:
  """A Prompt from a Prompt, a (tokens, mask) pair, or bare tokens (mask = tokens != pad_id);
  checks shapes and the left padding, naming `name` in errors."""
  if isinstance(p, Prompt):
    if image_tokens is not None or image_index is not None:
      p = dataclasses.replace(p, image_tokens=image_tokens if image_tokens is not None else p.image_tokens,
                              image_index=image_index if image_index is not None else p.image_index)
  elif isinstance(p, tuple):
    if len(p) != 2:
      raise ValueError(f"{name}: a tuple prompt must be (tokens, mask), got {len(p)} items")
    p = Prompt(np.asarray(p[0]), np.asarray(p[1]), image_tokens, image_index)
  else:
    tokens = np.asarray(p)
    p = Prompt(tokens, tokens != pad_id, image_tokens, image_index)
  tokens = np.asarray(p.tokens)
  mask = np.asarray(p.mask).astype(bool)
  if tokens.ndim != 2:
    raise ValueError(f"{name}: tokens must be (B, P), got shape {tokens.shape}")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{name}: tokens must be integers, got {tokens.dtype}")
  if mask.shape != tokens.shape:
    raise ValueError(f"{name}: mask has shape {mask.shape}, tokens {tokens.shape}")
  for r in range(tokens.shape[0]):
    real = np.flatnonzero(mask[r])
    if real.size == 0:
      raise ValueError(f"{name}: row {r} has no real token")
    if real[0] + real.size != tokens.shape[1]:
      raise ValueError(f"{name}: row {r} is not left-padded (real tokens must be contiguous and end "
                       f"at the last position)")
  img, index = p.image_tokens, p.image_index
  if (img is None) != (index is None):
    raise ValueError(f"{name}: image_tokens and image_index go together")
  if img is not None:
    img = np.asarray(img, np.float32)
    index = np.asarray(index)
    if img.ndim != 3 or img.shape[0] != tokens.shape[0]:
      raise ValueError(f"{name}: image_tokens must be (B={tokens.shape[0]}, M, d), got {img.shape}")
    if index.shape != tokens.shape:
      raise ValueError(f"{name}: image_index has shape {index.shape}, tokens {tokens.shape}")
    if index.max(initial=-1) >= img.shape[1]:
      raise ValueError(f"{name}: image_index points past the {img.shape[1]} image tokens")
    if np.any((index >= 0) & ~mask):
      raise ValueError(f"{name}: image_index marks padding positions")
    index = index.astype(np.int32)
  return Prompt(tokens.astype(np.int32), mask, img, index)


def image_prefix_ids(tokenizer: TokenizerLike, h: int, w: int) -> list[int]:
  """``<|image_area|>{h}*{w}<|begin_of_image|>`` (SPEC §1) as ids."""
  return ([_special(tokenizer, "<|image_area|>")] + list(tokenizer.encode(f"{h}*{w}"))
          + [_special(tokenizer, "<|begin_of_image|>")])


def image_prompt_ids(tokenizer: TokenizerLike, text: str, h: int, w: int) -> list[int]:
  """Caption then the image prefix: the prompt of one text-to-image row."""
  return list(tokenizer.encode(text)) + image_prefix_ids(tokenizer, h, w)


def bucket_length(n: int, bucket: int) -> int:
  """n rounded up to a multiple of `bucket` (bucket <= 0: n itself)."""
  return n if bucket <= 0 else -(-n // bucket) * bucket


def pad_prompts(rows: Sequence[Sequence[int]], *, pad_id: int, length: int | None = None,
                bucket: int = 32) -> Prompt:
  """Left-pads id lists to one length (given, or the longest rounded up to `bucket`)."""
  if not rows:
    raise ValueError("pad_prompts needs at least one row")
  longest = max(len(r) for r in rows)
  length = length if length is not None else bucket_length(longest, bucket)
  if longest > length:
    raise ValueError(f"a prompt has {longest} tokens, more than the length {length}")
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for r, ids in enumerate(rows):
    if len(ids):
      tokens[r, length - len(ids):] = ids
      mask[r, length - len(ids):] = True
  return Prompt(tokens, mask)


def image_prompts(tokenizer: TokenizerLike, texts: Sequence[str], h: int, w: int, *,
                  negative: str | Sequence[str] | None = "", bucket: int = 32
                  ) -> tuple[Prompt, Prompt | None]:
  """(conditional, negative) prompts for ``sample_images``: each text (and the negative text, ""
  by default; None for no guidance) followed by the image prefix, left-padded to a bucket."""
  cond = pad_prompts([image_prompt_ids(tokenizer, t, h, w) for t in texts], pad_id=tokenizer.pad_id,
                     bucket=bucket)
  if negative is None:
    return cond, None
  negs = [negative] * len(texts) if isinstance(negative, str) else list(negative)
  if len(negs) != len(texts):
    raise ValueError(f"{len(negs)} negative prompts for {len(texts)} prompts")
  neg = pad_prompts([image_prompt_ids(tokenizer, t, h, w) for t in negs], pad_id=tokenizer.pad_id,
                    bucket=bucket)
  return cond, neg


def _stack_groups(prompts: Sequence[Prompt]) -> dict[str, np.ndarray | None]:
  """Stacks G prompt groups of B rows into (G*B, P) arrays, left-padding all to the longest."""
  b = prompts[0].tokens.shape[0]
  for g, p in enumerate(prompts):
    if p.tokens.shape[0] != b:
      raise ValueError(f"prompt group {g} has {p.tokens.shape[0]} rows, group 0 has {b}")
  length = max(p.tokens.shape[1] for p in prompts)
  with_img = [p for p in prompts if p.image_tokens is not None]
  m = max((p.image_tokens.shape[1] for p in with_img), default=0)
  d = with_img[0].image_tokens.shape[2] if with_img else 0
  for p in with_img:
    if p.image_tokens.shape[2] != d:
      raise ValueError(f"prompt image tokens have dims {p.image_tokens.shape[2]} and {d}")
  toks, masks, imgs, idxs = [], [], [], []
  for p in prompts:
    pad = length - p.tokens.shape[1]
    toks.append(np.pad(p.tokens, ((0, 0), (pad, 0))))
    masks.append(np.pad(p.mask, ((0, 0), (pad, 0))))
    if with_img:
      if p.image_tokens is None:
        imgs.append(np.zeros((b, m, d), np.float32))
        idxs.append(np.full((b, length), -1, np.int32))
      else:
        imgs.append(np.pad(p.image_tokens, ((0, 0), (0, m - p.image_tokens.shape[1]), (0, 0))))
        idxs.append(np.pad(p.image_index, ((0, 0), (pad, 0)), constant_values=-1))
  out = {"tokens": np.concatenate(toks), "mask": np.concatenate(masks).astype(np.int32),
         "image_tokens": np.concatenate(imgs) if with_img else None,
         "image_index": np.concatenate(idxs) if with_img else None}
  return out


# ---------------------------------------------------------------------------------------------
# The flow-matching head's sampler (one image token)
# ---------------------------------------------------------------------------------------------

def shift_time(t: jax.Array, shift: jax.Array | float) -> jax.Array:
  """t' = t / (s - (s - 1) t): s > 1 spends more steps near the noise end."""
  return t / (shift - (shift - 1.0) * t)


def ode_grid(steps: int, shift) -> jax.Array:
  """(steps + 1,) shifted Euler grid from 0 (noise) to 1 (data)."""
  return shift_time(jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32), shift)


def sde_grid(steps: int, shift) -> jax.Array:
  """(steps,) shifted Euler–Maruyama grid from 0 to 1 - SDE_LAST_STEP (then a last step to 1)."""
  return shift_time(jnp.linspace(0.0, 1.0 - SDE_LAST_STEP, steps, dtype=jnp.float32), shift)


def guide(v_gbd: jax.Array, cfg, cfg_img) -> jax.Array:
  """Combines per-group velocities (G, B, d) into one (B, d) (module docstring)."""
  g = v_gbd.shape[0]
  if g == 1:
    return v_gbd[0]
  if g == 2:
    return v_gbd[1] + cfg * (v_gbd[0] - v_gbd[1])
  if g == 3:
    return v_gbd[2] + cfg_img * (v_gbd[1] - v_gbd[2]) + cfg * (v_gbd[0] - v_gbd[1])
  raise ValueError(f"guidance takes 1, 2 or 3 prompt groups, got {g}")


def sample_token(head, cond_rd: jax.Array, key_i: jax.Array, *, groups: int, steps: int, sde: bool,
                 cfg, cfg_img, time_shift) -> jax.Array:
  """One image token per row group member: (B, d) from the conditions of all G*B rows."""
  r = cond_rd.shape[0]
  b = r // groups
  d = head.config.token_dim
  k_init, k_sde = jax.random.split(key_i)
  x0 = jax.random.normal(k_init, (b, d), jnp.float32)

  def velocity(x_bd, t):
    v = head(jnp.tile(x_bd, (groups, 1)), jnp.full((r,), t, jnp.float32), cond_rd)
    return guide(v.reshape(groups, b, d), cfg, cfg_img)

  if not sde:
    grid = ode_grid(steps, time_shift)

    def ode_step(k, x):
      return x + (grid[k + 1] - grid[k]) * velocity(x, grid[k])

    return jax.lax.fori_loop(0, steps, ode_step, x0)

  grid = sde_grid(steps, time_shift)

  def drift(x, t):
    return (1.0 + t) * velocity(x, t) - x

  def em_step(k, x):
    t, dt = grid[k], grid[k + 1] - grid[k]
    z = jax.random.normal(jax.random.fold_in(k_sde, k), x.shape, jnp.float32)
    return x + drift(x, t) * dt + jnp.sqrt(2.0 * (1.0 - t) * dt) * z

  x = jax.lax.fori_loop(0, steps - 1, em_step, x0)
  t_last = grid[steps - 1]
  return x + drift(x, t_last) * (1.0 - t_last)


# ---------------------------------------------------------------------------------------------
# Compiled pieces (pure functions of (graphdef, state, ...))
# ---------------------------------------------------------------------------------------------

def _embed_prompt(model: ns.NextStep, tokens, img_tokens, img_index) -> jax.Array:
  if img_tokens is None:
    return model.backbone.embed(tokens)
  m = img_tokens.shape[1]
  toks = model.prepare_tokens(img_tokens)  # token norm, as in training
  seq = jnp.take_along_axis(toks, jnp.clip(img_index, 0, m - 1)[..., None], axis=1)
  return model.embed_inputs(tokens, seq, img_index >= 0)


def _prefill(model: ns.NextStep, cache, tokens, mask, img_tokens, img_index):
  """Runs left-padded prompts (R, P) into the cache. Returns (h_last (R, D), cache, lengths (R,))."""
  seg = mask.astype(jnp.int32)
  pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  x = _embed_prompt(model, tokens, img_tokens, img_index)
  hs, cache = model.backbone(x, pos, seg, cache=cache)
  return hs[:, -1], cache, jnp.sum(seg, axis=1)


def _image_loop(model: ns.NextStep, cache, h_last, next_pos, key, *, groups: int, num_tokens: int,
                steps: int, sde: bool, use_norm: bool, cfg, cfg_img, time_shift):
  """h*w image tokens, each fed back into every row. Returns (tokens (B, T, d), cache, h_last)."""
  r = h_last.shape[0]
  b, d = r // groups, model.config.token_dim

  def body(i, carry):
    cache, h_last, out = carry
    cond = model.image_out(h_last)
    tok = sample_token(model.head, cond, jax.random.fold_in(key, i), groups=groups, steps=steps, sde=sde,
                       cfg=cfg, cfg_img=cfg_img, time_shift=time_shift)
    if use_norm:
      tok = ns.normalize_tokens(tok)
    out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
    x_in = model.image_in(jnp.tile(tok, (groups, 1)))[:, None]  # (R, 1, D)
    hs, cache = model.backbone(x_in, (next_pos + i)[:, None], jnp.ones((r, 1), jnp.int32), cache=cache)
    return cache, hs[:, 0], out

  out0 = jnp.zeros((b, num_tokens, d), jnp.float32)
  cache, h_last, out = jax.lax.fori_loop(0, num_tokens, body, (cache, h_last, out0))
  return out, cache, h_last


_STATIC = ("graphdef", "groups", "h", "w", "steps", "sde", "use_norm")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_jit(graphdef, state, tokens, mask, img_tokens, img_index, key, cfg, cfg_img, time_shift, *,
                groups, h, w, steps, sde, use_norm):
  _TRACES["sample_images"] += 1
  model = nnx.merge(graphdef, state)
  r, p = tokens.shape
  cache = model.backbone.init_cache(r, p + h * w)
  h_last, cache, lengths = _prefill(model, cache, tokens, mask, img_tokens, img_index)
  out, _, _ = _image_loop(model, cache, h_last, lengths, key, groups=groups, num_tokens=h * w, steps=steps,
                          sde=sde, use_norm=use_norm, cfg=cfg, cfg_img=cfg_img, time_shift=time_shift)
  return out


def _check_common(h: int, w: int, steps: int, time_shift: float) -> None:
  if h < 1 or w < 1:
    raise ValueError(f"image grid h={h}, w={w} must be positive")
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1")
  if time_shift <= 0:
    raise ValueError(f"time_shift={time_shift} must be > 0")


def sample_guided(model: ns.NextStep, prompts: Sequence[PromptLike], h: int, w: int, key: jax.Array, *,
                  cfg: float = 7.5, cfg_img: float = 2.0, steps: int = 28, time_shift: float = 1.0,
                  use_norm: bool = True, sde: bool = False, pad_id: int = 0) -> jax.Array:
  """The compiled sampler for 1, 2 or 3 prompt groups (module docstring). Returns (B, h*w, d)."""
  if not 1 <= len(prompts) <= 3:
    raise ValueError(f"sample_guided takes 1, 2 or 3 prompt groups, got {len(prompts)}")
  if sde and steps < 2:
    raise ValueError("the SDE sampler needs steps >= 2")
  _check_common(h, w, steps, time_shift)
  ps = [as_prompt(p, pad_id=pad_id, name=f"prompt group {g}") for g, p in enumerate(prompts)]
  s = _stack_groups(ps)
  if s["image_tokens"] is not None and s["image_tokens"].shape[2] != model.config.token_dim:
    raise ValueError(f"prompt image tokens have dim {s['image_tokens'].shape[2]}, the model's token_dim "
                     f"is {model.config.token_dim}")
  graphdef, state = nnx.split(model)
  return _sample_jit(graphdef, state, jnp.asarray(s["tokens"]), jnp.asarray(s["mask"]),
                     None if s["image_tokens"] is None else jnp.asarray(s["image_tokens"]),
                     None if s["image_index"] is None else jnp.asarray(s["image_index"]), key,
                     jnp.float32(cfg), jnp.float32(cfg_img), jnp.float32(time_shift),
                     groups=len(ps), h=int(h), w=int(w), steps=int(steps), sde=bool(sde),
                     use_norm=bool(use_norm))


def sample_images(model: ns.NextStep, prompt_tokens: PromptLike, neg_tokens: PromptLike | None, h: int,
                  w: int, key: jax.Array, *, cfg: float = 7.5, steps: int = 28, time_shift: float = 1.0,
                  use_norm: bool = True, sde: bool = False, prompt_image_tokens=None, prompt_image_index=None,
                  pad_id: int = 0) -> jax.Array:
  """Text-to-image (or image-conditioned) sampling with classifier-free guidance on the head.

  prompt_tokens: (B, P) left-padded ids (mask = ids != pad_id), a (tokens, mask) pair or a Prompt,
  ending with the image prefix; neg_tokens: the unconditional rows (B, P2) (the negative text + the
  same prefix), or None for no guidance (cfg unused). prompt_image_tokens (B, M, d) and
  prompt_image_index (B, P): source images inside the conditional prompt. Returns (B, h*w, d).
  """
  cond = as_prompt(prompt_tokens, pad_id=pad_id, image_tokens=prompt_image_tokens,
                   image_index=prompt_image_index, name="prompt_tokens")
  groups = [cond] if neg_tokens is None else [cond, as_prompt(neg_tokens, pad_id=pad_id, name="neg_tokens")]
  return sample_guided(model, groups, h, w, key, cfg=cfg, steps=steps, time_shift=time_shift,
                       use_norm=use_norm, sde=sde, pad_id=pad_id)


def edit_images(model: ns.NextStep, prompt: PromptLike, image_neg_prompt: PromptLike, neg_prompt: PromptLike,
                h: int, w: int, key: jax.Array, *, cfg: float = 7.5, cfg_img: float = 2.0, steps: int = 28,
                time_shift: float = 3.2, use_norm: bool = True, sde: bool = False, pad_id: int = 0
                ) -> jax.Array:
  """Image editing with three rows per sample: [image + text, image + negative, negative only]
  (Prompts carrying the source image tokens where they have them). Returns (B, h*w, d)."""
  return sample_guided(model, [prompt, image_neg_prompt, neg_prompt], h, w, key, cfg=cfg, cfg_img=cfg_img,
                       steps=steps, time_shift=time_shift, use_norm=use_norm, sde=sde, pad_id=pad_id)


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
                        use_norm: bool = True, sde: bool = False, pad_id: int = 0,
                        max_tokens: int | None = None) -> np.ndarray:
  """Reference sampler: per image token, the whole (P + h*w)-slot sequence is recomputed without a
  cache (not-yet-sampled slots masked), and the head's integration is a Python loop. Same groups,
  guidance and random draws as ``sample_guided``. ``max_tokens`` stops after that many tokens (for
  timing). Returns (B, n, d) numpy."""
  ps = [as_prompt(p, pad_id=pad_id, name=f"prompt group {g}") for g, p in enumerate(prompts)]
  s = _stack_groups(ps)
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

  def velocity(x_bd, t, cond):
    v = np.asarray(_naive_velocity(graphdef, state, jnp.asarray(np.tile(x_bd, (groups, 1))),
                                   jnp.full((r,), t, jnp.float32), cond)).reshape(groups, b, d)
    if groups == 1:
      return v[0]
    if groups == 2:
      return v[1] + np.float32(cfg) * (v[0] - v[1])
    return v[2] + np.float32(cfg_img) * (v[1] - v[2]) + np.float32(cfg) * (v[0] - v[1])

  out = np.zeros((b, n, d), np.float32)
  for i in range(n):
    hs = _naive_forward(graphdef, state, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg))
    cond = model.image_out(hs[:, p + i - 1])
    k_init, k_sde = jax.random.split(jax.random.fold_in(key, i))
    xt = np.asarray(jax.random.normal(k_init, (b, d), jnp.float32))
    if not sde:
      for k in range(steps):
        xt = xt + (grid[k + 1] - grid[k]) * velocity(xt, grid[k], cond)
    else:
      for k in range(steps - 1):
        t, dt = grid[k], grid[k + 1] - grid[k]
        z = np.asarray(jax.random.normal(jax.random.fold_in(k_sde, k), (b, d), jnp.float32))
        xt = xt + ((1 + t) * velocity(xt, t, cond) - xt) * dt + np.sqrt(2 * (1 - t) * dt) * z
      t = grid[steps - 1]
      xt = xt + ((1 + t) * velocity(xt, t, cond) - xt) * (1 - t)
    if use_norm:
      mu = xt.mean(-1, keepdims=True)
      xt = (xt - mu) / np.sqrt(((xt - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
    out[:, i] = xt
    x[:, p + i] = np.asarray(model.image_in(jnp.asarray(np.tile(xt, (groups, 1)))))
    seg[:, p + i] = 1
  return out


# ---------------------------------------------------------------------------------------------
# Unified generation (SPEC §1): text from the LM head, images from the image loop
# ---------------------------------------------------------------------------------------------

def sample_logits(logits_nv: jax.Array, key: jax.Array, temperature, top_p, vocab_limit) -> jax.Array:
  """Next ids (N,): greedy when temperature <= 0, else temperature + nucleus (top-p) sampling.
  Ids >= vocab_limit (embedding rows the tokenizer does not use) are never chosen."""
  v = logits_nv.shape[-1]
  logits = jnp.where(jnp.arange(v) < vocab_limit, logits_nv.astype(jnp.float32), -jnp.inf)
  greedy = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  sorted_desc = jnp.sort(scaled, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate
  kept = jnp.where(before < top_p, sorted_desc, jnp.inf)
  threshold = jnp.min(kept, axis=-1, keepdims=True)  # smallest kept logit (the top one always is)
  sampled = jax.random.categorical(key, jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)
  return jnp.where(temperature <= 0, greedy, sampled).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill_jit(graphdef, state, cache, tokens, mask):
  _TRACES["prefill"] += 1
  model = nnx.merge(graphdef, state)
  h_last, cache, lengths = _prefill(model, cache, tokens, mask, None, None)
  return h_last, cache, lengths


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _feed_jit(graphdef, state, cache, token_r, pos_r):
  """Feeds one given token per row. Returns (h (R, D), cache)."""
  _TRACES["feed"] += 1
  model = nnx.merge(graphdef, state)
  r = token_r.shape[0]
  hs, cache = model.backbone(model.backbone.embed(token_r[:, None]), pos_r[:, None],
                             jnp.ones((r, 1), jnp.int32), cache=cache)
  return hs[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _text_step_jit(graphdef, state, cache, h_last, pos_r, key, temperature, top_p, vocab_limit):
  """Samples the next token from h_last and feeds it. Returns (token (R,), h (R, D), cache)."""
  _TRACES["text_step"] += 1
  model = nnx.merge(graphdef, state)
  logits = model.backbone.logits(h_last[:, None])[:, 0]
  tok = sample_logits(logits, key, temperature, top_p, vocab_limit)
  r = tok.shape[0]
  hs, cache = model.backbone(model.backbone.embed(tok[:, None]), pos_r[:, None], jnp.ones((r, 1), jnp.int32),
                             cache=cache)
  return tok, hs[:, 0], cache


@functools.partial(jax.jit, static_argnames=_STATIC)
def _image_jit(graphdef, state, cache, h_last, next_pos, key, cfg, cfg_img, time_shift, *, groups, h, w, steps,
               sde, use_norm):
  _TRACES["image"] += 1
  model = nnx.merge(graphdef, state)
  return _image_loop(model, cache, h_last, next_pos, key, groups=groups, num_tokens=h * w, steps=steps,
                     sde=sde, use_norm=use_norm, cfg=cfg, cfg_img=cfg_img, time_shift=time_shift)


_AREA_RE = re.compile(r"^\s*(\d+)\s*\*\s*(\d+)\s*$")


def parse_area(text: str) -> tuple[int, int] | None:
  """'16*16' -> (16, 16); None when the text is not of that form."""
  m = _AREA_RE.match(text)
  return (int(m.group(1)), int(m.group(2))) if m else None


def generate(model: ns.NextStep, tokenizer: TokenizerLike, prompt_text: str, key: jax.Array, *,
             max_new_tokens: int = 256, image_size: tuple[int, int] = (16, 16),
             max_image_tokens: int | None = None, max_images: int = 1, think: bool = False,
             temperature: float = 0.0, top_p: float = 1.0, cfg: float = 1.0, negative: str = "",
             steps: int = 28, time_shift: float = 1.0, use_norm: bool = True, sde: bool = False,
             bucket: int = 64) -> list[tuple]:
  """Unified generation for one prompt: text from the LM head until the model writes
  ``<|begin_of_image|>``; then an image of the size it announced (``<|image_area|>h*w`` in the text it
  wrote; ``image_size`` (h, w) in tokens when it announced none or too large a one); then
  ``<|end_of_image|>`` is appended and text continues until EOS or ``max_new_tokens`` text tokens.

  think: the prompt is followed by ``<|begin_of_thinking|>``; the model writes its reasoning until
  ``<|end_of_thinking|>``, then the image prefix of ``image_size`` is forced (self-CoT).
  cfg > 1 guides the image with a row for `negative` + the image prefix, prefilled when the image starts.
  Returns segments [("text", str) | ("image", tokens (h*w, d), h, w)]. The text loop is a Python loop over
  one jitted decode step on a fixed-size cache: no recompilation per token.
  """
  area, boi, eoi = (_special(tokenizer, t) for t in ("<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>"))
  eos, pad = int(tokenizer.eos_id), int(tokenizer.pad_id)
  bot, eot = (_special(tokenizer, BOT), _special(tokenizer, EOT)) if think else (None, None)
  h0, w0 = (int(image_size[0]), int(image_size[1]))
  max_img = int(max_image_tokens) if max_image_tokens is not None else h0 * w0
  if h0 * w0 > max_img:
    raise ValueError(f"image_size {image_size} has more than max_image_tokens={max_img} tokens")
  _check_common(h0, w0, steps, time_shift)
  vocab_limit = jnp.int32(min(model.config.backbone.vocab_size,
                              getattr(tokenizer, "vocab_size", model.config.backbone.vocab_size)))

  prompt_ids = list(tokenizer.encode(prompt_text)) + ([bot] if think else [])
  if not prompt_ids:
    raise ValueError("generate needs a non-empty prompt")
  p_len = bucket_length(len(prompt_ids), bucket)
  forced = len(image_prefix_ids(tokenizer, h0, w0)) if think else 0
  capacity = bucket_length(p_len + max_new_tokens + forced + max_images * (max_img + 1) + 1, bucket)
  graphdef, state = nnx.split(model)
  backbone = model.backbone
  cache = backbone.init_cache(1, capacity)
  prompt = pad_prompts([prompt_ids], pad_id=pad, length=p_len)
  h_last, cache, _ = _prefill_jit(graphdef, state, cache, jnp.asarray(prompt.tokens),
                                  jnp.asarray(prompt.mask.astype(np.int32)))
  pos = len(prompt_ids)   # next RoPE position
  used = p_len            # next cache slot
  key_text, key_img = jax.random.split(key)
  temp, topp = jnp.float32(temperature), jnp.float32(top_p)

  segments: list[tuple] = []
  text_ids: list[int] = []
  n_text, n_images = 0, 0

  def feed(tok: int):
    nonlocal h_last, cache, pos, used
    h_last, cache = _feed_jit(graphdef, state, cache, jnp.asarray([tok], jnp.int32), jnp.asarray([pos], jnp.int32))
    pos += 1
    used += 1

  def flush_text(ids: list[int]):
    if ids:
      segments.append(("text", tokenizer.decode(ids)))

  def run_image(hh: int, ww: int):
    nonlocal h_last, cache, pos, used, n_images
    groups, rows_h, rows_pos, c = 1, h_last, jnp.asarray([pos], jnp.int32), cache
    if cfg != 1.0:
      neg_ids = list(tokenizer.encode(negative)) + image_prefix_ids(tokenizer, hh, ww)
      if len(neg_ids) > used:
        raise ValueError(f"the negative prompt ({len(neg_ids)} tokens with the image prefix) is longer than "
                         f"the context before the image ({used} slots)")
      n_len = min(bucket_length(len(neg_ids), bucket), used)
      neg = pad_prompts([neg_ids], pad_id=pad, length=n_len)
      neg_cache = dict(backbone.init_cache(1, capacity), index=jnp.int32(used - n_len))
      neg_h, neg_cache, _ = _prefill_jit(graphdef, state, neg_cache, jnp.asarray(neg.tokens),
                                         jnp.asarray(neg.mask.astype(np.int32)))
      c = {"k": jnp.concatenate([cache["k"], neg_cache["k"]], axis=1),
           "v": jnp.concatenate([cache["v"], neg_cache["v"]], axis=1),
           "segments": jnp.concatenate([cache["segments"], neg_cache["segments"]], axis=0),
           "index": cache["index"]}
      groups, rows_h = 2, jnp.concatenate([h_last, neg_h], axis=0)
      rows_pos = jnp.asarray([pos, len(neg_ids)], jnp.int32)
    toks, c, hs = _image_jit(graphdef, state, c, rows_h, rows_pos, jax.random.fold_in(key_img, n_images),
                             jnp.float32(cfg), jnp.float32(1.0), jnp.float32(time_shift), groups=groups, h=hh,
                             w=ww, steps=int(steps), sde=bool(sde), use_norm=bool(use_norm))
    cache = {"k": c["k"][:, :1], "v": c["v"][:, :1], "segments": c["segments"][:1], "index": c["index"]}
    h_last = hs[:1]
    pos += hh * ww
    used += hh * ww
    segments.append(("image", np.asarray(toks[0]), hh, ww))
    n_images += 1
    feed(eoi)

  def start_image(ids: list[int]):
    """The model just wrote BOI (already fed): split off the area text, pick the size, draw the image."""
    hw = None
    if area in ids:
      a = len(ids) - 1 - ids[::-1].index(area)
      hw = parse_area(tokenizer.decode(ids[a + 1:-1]))
      ids = ids[:a]
    else:
      ids = ids[:-1]
    if hw is None or hw[0] < 1 or hw[1] < 1 or hw[0] * hw[1] > max_img:
      hw = (h0, w0)
    flush_text(ids)
    run_image(*hw)

  while n_text < max_new_tokens and used < capacity - 1:
    tok_arr, h_new, cache_new = _text_step_jit(graphdef, state, cache, h_last, jnp.asarray([pos], jnp.int32),
                                               jax.random.fold_in(key_text, n_text), temp, topp, vocab_limit)
    tok = int(tok_arr[0])
    n_text += 1
    if tok == eos:
      break
    h_last, cache = h_new, cache_new
    pos += 1
    used += 1
    text_ids.append(tok)
    if tok == boi:
      if n_images >= max_images or used + max_img + 1 > capacity:  # no room for another image: stop here
        text_ids.pop()
        if area in text_ids:
          del text_ids[len(text_ids) - 1 - text_ids[::-1].index(area):]
        break
      start_image(text_ids)
      text_ids = []
    elif think and tok == eot and n_images == 0:
      flush_text(text_ids)
      text_ids = []
      for t in image_prefix_ids(tokenizer, h0, w0):
        feed(t)
      run_image(h0, w0)
  flush_text(text_ids)
  return segments
