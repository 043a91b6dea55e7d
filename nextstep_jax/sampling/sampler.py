"""The compiled image sampler: prefill, then a fori_loop over the image tokens (condition, head
integration, KV-cached decode step). See the package docstring."""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

from nextstep_jax import parallel
from nextstep_jax.models import nextstep as ns
from nextstep_jax.sampling import layout
from nextstep_jax.sampling.flow import CFG_SCHEDULES, eval_grid, guide, integrate, row_noise, scheduled, token_noise
from nextstep_jax.sampling.prompts import PromptLike, as_prompt, stack_groups


TRACES: collections.Counter = collections.Counter()


def trace_count(name: str | None = None) -> int:
  """How many times the jitted sampler functions were traced (all, or one by name)."""
  return sum(TRACES.values()) if name is None else TRACES[name]


# Who hears of a sampler call's progress (``reporting``). The compiled loop calls one module function, so
# listening changes no compiled program.
_LISTENERS: list[Callable[[int, int], None]] = []


def _report(done, total) -> None:
  for fn in list(_LISTENERS):
    fn(int(done), int(total))


@contextlib.contextmanager
def reporting(listener: Callable[[int, int], None]) -> Iterator[None]:
  """Within it, a sampler call made with ``progress_every`` = n > 0 calls ``listener(tokens done, tokens of
  the image)`` from inside its compiled loop after every n-th image token and after the last (from the
  host, once per call, as the device gets there)."""
  _LISTENERS.append(listener)
  try:
    yield
  finally:
    _LISTENERS.remove(listener)


# ---------------------------------------------------------------------------------------------
# Compiled pieces (pure functions of (graphdef, state, ...))
# ---------------------------------------------------------------------------------------------

def embed_prompt(model: ns.NextStep, tokens, img_tokens, img_index) -> jax.Array:
  if img_tokens is None:
    return model.backbone.embed(tokens)
  m = img_tokens.shape[1]
  toks = model.prepare_tokens(img_tokens)  # as in training: normed only when the model's token_norm is on
  seq = jnp.take_along_axis(toks, jnp.clip(img_index, 0, m - 1)[..., None], axis=1)
  return model.embed_inputs(tokens, seq, img_index >= 0)


def prefill(model: ns.NextStep, dec: dict, cache, tokens, mask, img_tokens, img_index):
  """Runs left-padded prompts (R, P) into the per-layer cache (``layout``). Returns (h_last (R, D), cache,
  lengths (R,))."""
  seg = mask.astype(jnp.int32)
  pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  x = embed_prompt(model, tokens, img_tokens, img_index)
  hs, cache = layout.decode(model.config.backbone, dec, x, pos, seg, cache)
  return hs[:, -1], cache, jnp.sum(seg, axis=1)


def draw_token(hl: dict, ttable: jax.Array, cy_rd: jax.Array, x0: jax.Array, zs: jax.Array | None, *,
               groups: int, steps: int, cfg, cfg_img, time_shift) -> jax.Array:
  """One token (B, d) from its noise (x0, zs), each row's condition projection cy (G*B, D) and the grid's
  time embeddings `ttable` (``FlowHead.time_embed`` of ``flow.eval_grid``): ``flow.integrate`` over ``layout.head_velocity``."""
  b, d = x0.shape
  ada = layout.head_ada(hl, ttable[:, None, :] + cy_rd[None])  # (steps, G*B, (3n + 2) D), once per token

  def velocity(x_bd, k):
    v = layout.head_velocity(hl, x_bd, ada[k], groups)
    return guide(v.reshape(groups, b, d), cfg, cfg_img)

  return integrate(velocity, x0, zs, steps=steps, time_shift=time_shift, indexed=True)


def image_loop(model: ns.NextStep, dec: dict, hl: dict, cache, h_last, next_pos, key, *, groups: int,
               num_tokens: int, steps: int, sde: bool, use_norm: bool, cfg, cfg_img, time_shift,
               cfg_schedule: str = "constant", noise_repeat: int = 0, progress_every: int = 0):
  """h*w image tokens, each fed back into every row. `key`: one key (rows drawn together,
  ``flow.token_noise``) or one per image (B,) (``flow.row_noise``). `dec`, `hl`: the decoder's and the head's
  weights laid out (``layout.SamplerWeights.decoder`` / ``.head``). `progress_every` n > 0: ``reporting``'s listeners
  hear of every n-th token and of the last. Returns (tokens (B, T, d), cache, h_last)."""
  r = h_last.shape[0]
  b, d = r // groups, model.config.token_dim
  ttable = model.head.time_embed(eval_grid(steps, time_shift, sde))  # once per image
  per_row = key.ndim == 1

  def body(i, carry):
    cache, h_last, out = carry
    cy = model.head.cond_embed(model.image_out(h_last))
    if per_row:
      x0, zs = row_noise(key, i, d, steps, sde=sde)
    else:
      x0, zs = token_noise(jax.random.fold_in(key, i), b, d, steps, sde=sde, noise_repeat=noise_repeat)
    tok = draw_token(hl, ttable, cy, x0, zs, groups=groups, steps=steps,
                     cfg=scheduled(cfg, i, num_tokens, cfg_schedule),
                     cfg_img=scheduled(cfg_img, i, num_tokens, cfg_schedule), time_shift=time_shift)
    if use_norm:
      tok = ns.normalize_tokens(tok)
    out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
    x_in = model.image_in(jnp.tile(tok, (groups, 1)))[:, None]  # (R, 1, D)
    hs, cache = layout.decode(model.config.backbone, dec, x_in, (next_pos + i)[:, None],
                              jnp.ones((r, 1), jnp.int32), cache)
    if progress_every:
      done = i + 1
      jax.lax.cond((done % progress_every == 0) | (done == num_tokens),
                   lambda: jax.debug.callback(_report, done, num_tokens), lambda: None)
    return cache, hs[:, 0], out

  out0 = jnp.zeros((b, num_tokens, d), jnp.float32)
  cache, h_last, out = jax.lax.fori_loop(0, num_tokens, body, (cache, h_last, out0))
  return out, cache, h_last


STATIC = ("groups", "h", "w", "steps", "sde", "use_norm", "cfg_schedule", "noise_repeat", "progress_every")


@functools.partial(jax.jit, static_argnames=STATIC)
def _sample_jit(weights: layout.SamplerWeights, tokens, mask, img_tokens, img_index, key, cfg, cfg_img, time_shift,
                *, groups, h, w, steps, sde, use_norm, cfg_schedule, noise_repeat, progress_every=0):
  TRACES["sample_images"] += 1
  model = weights.model()
  r, p = tokens.shape
  dec = weights.decoder(model)
  cache = layout.init_cache(model.config.backbone, r, p + h * w)
  h_last, cache, lengths = prefill(model, dec, cache, tokens, mask, img_tokens, img_index)
  out, _, _ = image_loop(model, dec, weights.head(model), cache, h_last, lengths, key, groups=groups,
                          num_tokens=h * w, steps=steps, sde=sde, use_norm=use_norm, cfg=cfg, cfg_img=cfg_img,
                          time_shift=time_shift, cfg_schedule=cfg_schedule, noise_repeat=noise_repeat,
                          progress_every=progress_every)
  return out


def check_common(h: int, w: int, steps: int, time_shift: float, cfg_schedule: str = "constant") -> None:
  if cfg_schedule not in CFG_SCHEDULES:
    raise ValueError(f"cfg_schedule={cfg_schedule!r}; expected one of {CFG_SCHEDULES}")
  if h < 1 or w < 1:
    raise ValueError(f"image grid h={h}, w={w} must be positive")
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1")
  if time_shift <= 0:
    raise ValueError(f"time_shift={time_shift} must be > 0")


def sample_guided(model: ns.NextStep | layout.SamplerWeights, prompts: Sequence[PromptLike], h: int, w: int,
                  key: jax.Array, *, cfg: float = 7.5, cfg_img: float = 2.0, steps: int = 28, time_shift: float = 1.0,
                  use_norm: bool = True, sde: bool = True, pad_id: int = 0, cfg_schedule: str = "constant",
                  noise_repeat: int = 0, mesh: jax.sharding.Mesh | None = None, rules=None,
                  progress_every: int = 0) -> jax.Array:
  """The compiled sampler for 1, 2 or 3 prompt groups (package docstring). Returns (B, h*w, d).

  sde: the official pipeline's Euler–Maruyama head sampler (the default); False: the Euler ODE.
  cfg_schedule: "constant" or the official "linear" decay towards 1 over the image's tokens.
  key: one key (every row's noise drawn from it together) or one key per image (B,): image j's noise then
  depends on its key only (``flow.row_noise``), so a batch of prompts samples what each prompt sampled
  alone with its key would.
  noise_repeat: with one key, 0 draws every row's noise apart; n shares draws as the official pipeline
  does with n images per caption (``flow.token_noise``).
  mesh: the model's params placed on it (``run.load_run(..., mesh=...)``; by the logical rules `rules`,
  default ``parallel.DEFAULT_RULES``): the sampler is traced under it (``jax.set_mesh``), activations
  pinned by the same rules, so the weights stay sharded (FSDP and tensor) and no device holds them all.
  model: the model, or its weights in the sampler's layout (``layout.sampler_weights``, made once and
  reused): given the model, each call splits its layer weights anew and holds them twice while it runs.
  progress_every: n > 0 tells ``reporting``'s listeners of every n-th image token and of the last (a
  program of its own; 0, the default, compiles no callback)."""
  if not 1 <= len(prompts) <= 3:
    raise ValueError(f"sample_guided takes 1, 2 or 3 prompt groups, got {len(prompts)}")
  if sde and steps < 2:
    raise ValueError("the SDE sampler needs steps >= 2")
  check_common(h, w, steps, time_shift, cfg_schedule)
  if progress_every < 0:
    raise ValueError(f"progress_every={progress_every} must be >= 0")
  ps = [as_prompt(p, pad_id=pad_id, name=f"prompt group {g}") for g, p in enumerate(prompts)]
  s = stack_groups(ps)
  if s["image_tokens"] is not None and s["image_tokens"].shape[2] != model.config.token_dim:
    raise ValueError(f"prompt image tokens have dim {s['image_tokens'].shape[2]}, the model's token_dim "
                     f"is {model.config.token_dim}")
  key = jnp.asarray(key)
  rows = s["tokens"].shape[0] // len(ps)
  if key.ndim > 1 or (key.ndim == 1 and key.shape[0] != rows):
    raise ValueError(f"key: one key, or one per image ({rows}); got shape {key.shape}")
  if key.ndim == 1 and noise_repeat:
    raise ValueError("noise_repeat shares one key's draws across rows; with one key per image it has no use")
  weights = layout.sampler_weights(model)  # the model's weights laid out for this call, or those given
  args = (weights, jnp.asarray(s["tokens"]), jnp.asarray(s["mask"]),
          None if s["image_tokens"] is None else jnp.asarray(s["image_tokens"]),
          None if s["image_index"] is None else jnp.asarray(s["image_index"]), key,
          jnp.float32(cfg), jnp.float32(cfg_img), jnp.float32(time_shift))
  kw = dict(groups=len(ps), h=int(h), w=int(w), steps=int(steps), sde=bool(sde), use_norm=bool(use_norm),
            cfg_schedule=str(cfg_schedule), noise_repeat=int(noise_repeat), progress_every=int(progress_every))
  if mesh is None:
    return _sample_jit(*args, **kw)
  with jax.set_mesh(mesh), parallel.activation_rules(parallel.DEFAULT_RULES if rules is None else rules):
    return _sample_jit(*args, **kw)


def sample_images(model: ns.NextStep | layout.SamplerWeights, prompt_tokens: PromptLike,
                  neg_tokens: PromptLike | None, h: int,
                  w: int, key: jax.Array, *, cfg: float = 7.5, steps: int = 28, time_shift: float = 1.0,
                  use_norm: bool = True, sde: bool = True, prompt_image_tokens=None, prompt_image_index=None,
                  pad_id: int = 0, cfg_schedule: str = "constant", noise_repeat: int = 0,
                  mesh: jax.sharding.Mesh | None = None, rules=None, progress_every: int = 0) -> jax.Array:
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
                       use_norm=use_norm, sde=sde, pad_id=pad_id, cfg_schedule=cfg_schedule,
                       noise_repeat=noise_repeat, mesh=mesh, rules=rules, progress_every=progress_every)


def edit_images(model: ns.NextStep | layout.SamplerWeights, prompt: PromptLike, image_neg_prompt: PromptLike,
                neg_prompt: PromptLike, h: int, w: int, key: jax.Array, *, cfg: float = 7.5, cfg_img: float = 2.0,
                steps: int = 28,
                time_shift: float = 3.2, use_norm: bool = True, sde: bool = True, pad_id: int = 0,
                cfg_schedule: str = "constant", noise_repeat: int = 0, mesh: jax.sharding.Mesh | None = None,
                rules=None, progress_every: int = 0) -> jax.Array:
  """Image editing with three rows per sample: [image + text, image + negative, negative only]
  (Prompts carrying the source image tokens where they have them). Returns (B, h*w, d)."""
  return sample_guided(model, [prompt, image_neg_prompt, neg_prompt], h, w, key, cfg=cfg, cfg_img=cfg_img,
                       steps=steps, time_shift=time_shift, use_norm=use_norm, sde=sde, pad_id=pad_id,
                       cfg_schedule=cfg_schedule, noise_repeat=noise_repeat, mesh=mesh, rules=rules,
                       progress_every=progress_every)
