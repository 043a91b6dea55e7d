"""A trained run sampled to PNG files: text-to-image, or editing with a source image
(``python -m nextstep_jax.sample`` is its command line)."""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from nextstep_jax import run as run_lib
from nextstep_jax import vae_tokens
from nextstep_jax.batch import to_uint8
from nextstep_jax.data.images import load_image
from nextstep_jax.sampling.prompts import Prompt, edit_prompts, image_prompts
from nextstep_jax.sampling.sampler import edit_images, sample_images
from nextstep_jax.data.images import image_grid


def sample_run(workdir: str, prompt: str, *, out: str = "", num: int = 4, image: str = "", negative: str = "",
        cfg: float = 3.0, cfg_img: float = 2.0, steps: int = 28, time_shift: float = -1.0, sde: bool = False,
        seed: int = 0, size: int = 0, use_ema: bool = True, step: int | None = None) -> dict:
  from PIL import Image  # pylint: disable=import-outside-toplevel  # optional: only to write PNGs
  if num < 1:
    raise ValueError(f"--num={num} must be >= 1")
  loaded = run_lib.load_run(workdir, step=step, use_ema=use_ema)
  model, config, tokenizer, vae = loaded.model, loaded.config, loaded.tokenizer, loaded.vae
  size = size or int(config.data.image_size)
  h, w = vae_tokens.token_grid(vae.config, size, size)
  key = jax.random.key(seed)
  if image:
    src = vae_tokens.make_encode_fn(vae)(load_image(image, size)[None])[0]
    groups = edit_prompts(tokenizer, np.asarray(src), prompt, negative, h, w)
    groups = [Prompt(np.repeat(g.tokens, num, 0), np.repeat(g.mask, num, 0),
                              None if g.image_tokens is None else np.repeat(g.image_tokens, num, 0),
                              None if g.image_index is None else np.repeat(g.image_index, num, 0)) for g in groups]
    shift = 3.2 if time_shift < 0 else time_shift
    fn = lambda k: edit_images(model, *groups, h, w, k, cfg=cfg, cfg_img=cfg_img, steps=steps,
                                        time_shift=shift, sde=sde, pad_id=tokenizer.pad_id)
  else:
    cond, neg = image_prompts(tokenizer, [prompt] * num, h, w, negative=negative if cfg != 1.0 else None)
    shift = 1.0 if time_shift < 0 else time_shift
    fn = lambda k: sample_images(model, cond, neg, h, w, k, cfg=cfg, steps=steps, time_shift=shift,
                                          sde=sde, pad_id=tokenizer.pad_id)
  t0 = time.perf_counter()
  tokens = jax.block_until_ready(fn(key))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  tokens = jax.block_until_ready(fn(jax.random.fold_in(key, 1)))
  warm = time.perf_counter() - t0
  images = to_uint8(vae_tokens.decode_tokens(vae, tokens, h, w))
  out = out or os.path.join(workdir, "samples")
  os.makedirs(out, exist_ok=True)
  for i, im in enumerate(images):
    Image.fromarray(im).save(os.path.join(out, f"sample_{i:03d}.png"))
  Image.fromarray(image_grid(images)).save(os.path.join(out, "grid.png"))
  stats = {"images": int(num), "first_call_s": first, "seconds_per_image": warm / num, "out": out}
  print(f"{num} images of {size}x{size} ({h * w} tokens) in {warm:.2f} s: {warm / num:.3f} s per image "
        f"(first call with compilation {first:.1f} s) -> {out}", flush=True)
  return stats
