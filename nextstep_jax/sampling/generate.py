"""Unified generation (SPEC §1): text from the LM head until ``<|begin_of_image|>``, then an image of
the size the model named, then text again; ``think=True`` turns on self-CoT."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax.models import nextstep as ns
from nextstep_jax.sampling import layout
from nextstep_jax.sampling.prompts import TokenizerLike, bucket_length, image_prefix_ids, pad_prompts, special_id
from nextstep_jax.sampling.sampler import TRACES, check_common, image_loop


BOT, EOT = "<|begin_of_thinking|>", "<|end_of_thinking|>"


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


# Every program runs on the sampler's layout (``layout.SamplerWeights``, laid out once per call of
# ``generate``) with a per-layer KV cache (``layout.Cache``): the text steps as the image loop.

@jax.jit
def _prefill_jit(weights: layout.SamplerWeights, cache, tokens, mask):
  TRACES["prefill"] += 1
  model = weights.model()
  seg = mask.astype(jnp.int32)
  hs, cache = layout.decode(model.config.backbone, weights.decoder(model), model.backbone.embed(tokens),
                            jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0), seg, cache)
  return hs[:, -1], cache, jnp.sum(seg, axis=1)


def _step(weights: layout.SamplerWeights, model, cache, token_r, pos_r):
  """Feeds one token per row through the per-layer decoder. Returns (h (R, D), cache)."""
  r = token_r.shape[0]
  hs, cache = layout.decode(model.config.backbone, weights.decoder(model), model.backbone.embed(token_r[:, None]),
                            pos_r[:, None], jnp.ones((r, 1), jnp.int32), cache)
  return hs[:, 0], cache


@jax.jit
def _feed_jit(weights: layout.SamplerWeights, cache, token_r, pos_r):
  """Feeds one given token per row. Returns (h (R, D), cache)."""
  TRACES["feed"] += 1
  return _step(weights, weights.model(), cache, token_r, pos_r)


@jax.jit
def _text_step_jit(weights: layout.SamplerWeights, cache, h_last, pos_r, key, temperature, top_p, vocab_limit):
  """Samples the next token from h_last and feeds it. Returns (token (R,), h (R, D), cache)."""
  TRACES["text_step"] += 1
  model = weights.model()
  logits = model.backbone.logits(h_last[:, None])[:, 0]
  tok = sample_logits(logits, key, temperature, top_p, vocab_limit)
  h, cache = _step(weights, model, cache, tok, pos_r)
  return tok, h, cache


@functools.partial(jax.jit, static_argnames=("groups", "h", "w", "steps", "sde", "use_norm", "cfg_schedule",
                                             "noise_repeat"))
def _image_jit(weights: layout.SamplerWeights, cache, h_last, next_pos, key, cfg, cfg_img, time_shift, *, groups, h,
               w, steps, sde, use_norm, cfg_schedule="constant", noise_repeat=0):
  TRACES["image"] += 1
  model = weights.model()
  return image_loop(model, weights.decoder(model), weights.head(model), cache, h_last, next_pos, key, groups=groups,
                    num_tokens=h * w, steps=steps, sde=sde, use_norm=use_norm, cfg=cfg, cfg_img=cfg_img,
                    time_shift=time_shift, cfg_schedule=cfg_schedule, noise_repeat=noise_repeat)


_AREA_RE = re.compile(r"^\s*(\d+)\s*\*\s*(\d+)\s*$")


def parse_area(text: str) -> tuple[int, int] | None:
  """'16*16' -> (16, 16); None when the text is not of that form."""
  m = _AREA_RE.match(text)
  return (int(m.group(1)), int(m.group(2))) if m else None


def generate(model: ns.NextStep | layout.SamplerWeights, tokenizer: TokenizerLike, prompt_text: str, key: jax.Array, *,
             max_new_tokens: int = 256, image_size: tuple[int, int] = (16, 16),
             max_image_tokens: int | None = None, max_images: int = 1, think: bool = False,
             temperature: float = 0.0, top_p: float = 1.0, cfg: float = 1.0, negative: str = "",
             steps: int = 28, time_shift: float = 1.0, use_norm: bool = True, sde: bool = True,
             bucket: int = 64) -> list[tuple]:
  """Unified generation for one prompt: text from the LM head until the model writes
  ``<|begin_of_image|>``; then an image of the size it announced (``<|image_area|>h*w`` in the text it
  wrote; ``image_size`` (h, w) in tokens when it announced none or too large a one); then
  ``<|end_of_image|>`` is appended and text continues until EOS or ``max_new_tokens`` text tokens.

  think: the prompt is followed by ``<|begin_of_thinking|>``; the model writes its reasoning until
  ``<|end_of_thinking|>``, then the image prefix of ``image_size`` is forced (self-CoT).
  cfg > 1 guides the image with a row for `negative` + the image prefix, prefilled when the image starts.
  Returns segments [("text", str) | ("image", tokens (h*w, d), h, w)]. The text loop is a Python loop over
  one jitted decode step on a fixed-size cache: no recompilation per token. Every step runs on the sampler's
  layout (``layout.sampler_weights``: `model` may be it, laid out once; a model is laid out per call) and
  a per-layer cache, the text steps as the image loop.
  """
  area, boi, eoi = (special_id(tokenizer, t) for t in ("<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>"))
  eos, pad = int(tokenizer.eos_id), int(tokenizer.pad_id)
  bot, eot = (special_id(tokenizer, BOT), special_id(tokenizer, EOT)) if think else (None, None)
  h0, w0 = (int(image_size[0]), int(image_size[1]))
  max_img = int(max_image_tokens) if max_image_tokens is not None else h0 * w0
  if h0 * w0 > max_img:
    raise ValueError(f"image_size {image_size} has more than max_image_tokens={max_img} tokens")
  check_common(h0, w0, steps, time_shift)
  vocab_limit = jnp.int32(min(model.config.backbone.vocab_size,
                              getattr(tokenizer, "vocab_size", model.config.backbone.vocab_size)))

  prompt_ids = list(tokenizer.encode(prompt_text)) + ([bot] if think else [])
  if not prompt_ids:
    raise ValueError("generate needs a non-empty prompt")
  p_len = bucket_length(len(prompt_ids), bucket)
  forced = len(image_prefix_ids(tokenizer, h0, w0)) if think else 0
  capacity = bucket_length(p_len + max_new_tokens + forced + max_images * (max_img + 1) + 1, bucket)
  weights = layout.sampler_weights(model)  # the model's weights laid out for this call, or those given
  bc = model.config.backbone
  cache = layout.init_cache(bc, 1, capacity)
  prompt = pad_prompts([prompt_ids], pad_id=pad, length=p_len)
  h_last, cache, _ = _prefill_jit(weights, cache, jnp.asarray(prompt.tokens),
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
    h_last, cache = _feed_jit(weights, cache, jnp.asarray([tok], jnp.int32), jnp.asarray([pos], jnp.int32))
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
      neg_cache = dict(layout.init_cache(bc, 1, capacity), index=jnp.int32(used - n_len))
      neg_h, neg_cache, _ = _prefill_jit(weights, neg_cache, jnp.asarray(neg.tokens),
                                         jnp.asarray(neg.mask.astype(np.int32)))
      rows = lambda name: tuple(jnp.concatenate([a, b], axis=0) for a, b in zip(cache[name], neg_cache[name]))
      c = {"k": rows("k"), "v": rows("v"),
           "segments": jnp.concatenate([cache["segments"], neg_cache["segments"]], axis=0),
           "index": cache["index"]}
      groups, rows_h = 2, jnp.concatenate([h_last, neg_h], axis=0)
      rows_pos = jnp.asarray([pos, len(neg_ids)], jnp.int32)
    toks, c, hs = _image_jit(weights, c, rows_h, rows_pos, jax.random.fold_in(key_img, n_images),
                             jnp.float32(cfg), jnp.float32(1.0), jnp.float32(time_shift), groups=groups, h=hh,
                             w=ww, steps=int(steps), sde=bool(sde), use_norm=bool(use_norm))
    cache = {"k": tuple(x[:1] for x in c["k"]), "v": tuple(x[:1] for x in c["v"]), "segments": c["segments"][:1],
             "index": c["index"]}  # the prompt's row goes on
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
    tok_arr, h_new, cache_new = _text_step_jit(weights, cache, h_last, jnp.asarray([pos], jnp.int32),
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
