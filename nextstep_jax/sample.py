"""Sample images from a trained run:

  python -m nextstep_jax.sample --workdir=W --prompt="a handwritten digit 7" --num=4 --out=DIR
  python -m nextstep_jax.sample --workdir=W --prompt="invert the colours" --image=in.png --out=DIR   # editing

Text-to-image uses two rows per sample (prompt, negative prompt) with guidance on the flow-matching head;
editing uses three ([image + instruction, image + negative, negative only]) with ``--cfg`` and
``--cfg_img`` and the editing time shift. Writes one PNG per sample and ``grid.png``, and prints the
time per image (the first call includes compilation; it is reported apart).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a training work directory (checkpoints, tokenizer, config)")
flags.DEFINE_string("prompt", "", "the caption, or the editing instruction with --image")
flags.DEFINE_string("negative", "", "negative prompt (the unconditional row)")
flags.DEFINE_string("image", "", "source image for editing (PNG/JPEG)")
flags.DEFINE_float("cfg", 3.0, "classifier-free guidance on the text")
flags.DEFINE_float("cfg_img", 2.0, "guidance on the source image (editing)")
flags.DEFINE_integer("steps", 28, "flow-matching ODE steps per token")
flags.DEFINE_float("time_shift", -1.0, "time-grid shift s (-1: 1.0 for text-to-image, 3.2 for editing)")
flags.DEFINE_bool("sde", False, "Euler-Maruyama instead of the ODE")
flags.DEFINE_integer("num", 4, "images to sample")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_integer("size", 0, "image side in pixels (0: the config's data.image_size)")
flags.DEFINE_bool("use_ema", True, "use the EMA weights when the run kept them")
flags.DEFINE_integer("step", -1, "checkpoint step (-1: newest)")
flags.DEFINE_string("out", "", "output directory (default: W/samples)")


def load_image(path: str, size: int) -> np.ndarray:
  """A PNG/JPEG as float32 (size, size, 3) in [-1, 1]; grayscale/RGBA/CMYK converted to RGB."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--image {path}: no such file")
  try:
    with Image.open(path) as im:
      im = im.convert("RGB").resize((size, size), Image.BICUBIC)
      x = np.asarray(im, np.float32)
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"--image {path}: not a readable image ({e})") from e
  return x / 127.5 - 1.0


def edit_prompts(tokenizer, source_tokens: np.ndarray, instruction: str, negative: str, h: int, w: int):
  """The three prompt groups of editing for one source image (T, d), each a batch of one row."""
  from nextstep_jax import sampling  # pylint: disable=import-outside-toplevel
  t = source_tokens.shape[0]
  block = (sampling.image_prefix_ids(tokenizer, h, w) + [tokenizer.placeholder_id] * t + [tokenizer.eoi_id])

  def with_image(text: str) -> sampling.Prompt:
    ids = block + sampling.image_prompt_ids(tokenizer, text, h, w)
    index = [-1] * len(ids)
    start = len(sampling.image_prefix_ids(tokenizer, h, w))
    index[start:start + t] = range(t)
    p = sampling.pad_prompts([ids], pad_id=tokenizer.pad_id)
    full = np.full(p.tokens.shape, -1, np.int32)
    full[0, p.tokens.shape[1] - len(ids):] = index
    return sampling.Prompt(p.tokens, p.mask, source_tokens[None].astype(np.float32), full)

  neg_only = sampling.pad_prompts([sampling.image_prompt_ids(tokenizer, negative, h, w)], pad_id=tokenizer.pad_id)
  return with_image(instruction), with_image(negative), neg_only


def run(workdir: str, prompt: str, *, out: str = "", num: int = 4, image: str = "", negative: str = "",
        cfg: float = 3.0, cfg_img: float = 2.0, steps: int = 28, time_shift: float = -1.0, sde: bool = False,
        seed: int = 0, size: int = 0, use_ema: bool = True, step: int | None = None) -> dict:
  from nextstep_jax import evaluate, latents, sampling  # pylint: disable=import-outside-toplevel
  from nextstep_jax.metrics import image_grid  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if num < 1:
    raise ValueError(f"--num={num} must be >= 1")
  model, config, tokenizer, vae = evaluate.load_trained(workdir, step=step, use_ema=use_ema)
  size = size or int(config.data.image_size)
  h, w = latents.token_grid(vae.config, size, size)
  key = jax.random.key(seed)
  if image:
    src = latents.make_encode_fn(vae)(load_image(image, size)[None])[0]
    groups = edit_prompts(tokenizer, np.asarray(src), prompt, negative, h, w)
    groups = [sampling.Prompt(np.repeat(g.tokens, num, 0), np.repeat(g.mask, num, 0),
                              None if g.image_tokens is None else np.repeat(g.image_tokens, num, 0),
                              None if g.image_index is None else np.repeat(g.image_index, num, 0)) for g in groups]
    shift = 3.2 if time_shift < 0 else time_shift
    fn = lambda k: sampling.edit_images(model, *groups, h, w, k, cfg=cfg, cfg_img=cfg_img, steps=steps,
                                        time_shift=shift, sde=sde, pad_id=tokenizer.pad_id)
  else:
    cond, neg = sampling.image_prompts(tokenizer, [prompt] * num, h, w, negative=negative if cfg != 1.0 else None)
    shift = 1.0 if time_shift < 0 else time_shift
    fn = lambda k: sampling.sample_images(model, cond, neg, h, w, k, cfg=cfg, steps=steps, time_shift=shift,
                                          sde=sde, pad_id=tokenizer.pad_id)
  t0 = time.perf_counter()
  tokens = jax.block_until_ready(fn(key))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  tokens = jax.block_until_ready(fn(jax.random.fold_in(key, 1)))
  warm = time.perf_counter() - t0
  images = evaluate.to_uint8(latents.decode_tokens(vae, tokens, h, w))
  out = out or os.path.join(workdir, "samples")
  os.makedirs(out, exist_ok=True)
  for i, im in enumerate(images):
    Image.fromarray(im).save(os.path.join(out, f"sample_{i:03d}.png"))
  Image.fromarray(image_grid(images)).save(os.path.join(out, "grid.png"))
  stats = {"images": int(num), "first_call_s": first, "seconds_per_image": warm / num, "out": out}
  print(f"{num} images of {size}x{size} ({h * w} tokens) in {warm:.2f} s: {warm / num:.3f} s per image "
        f"(first call with compilation {first:.1f} s) -> {out}", flush=True)
  return stats


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  run(FLAGS.workdir, FLAGS.prompt, out=FLAGS.out, num=FLAGS.num, image=FLAGS.image, negative=FLAGS.negative,
      cfg=FLAGS.cfg, cfg_img=FLAGS.cfg_img, steps=FLAGS.steps, time_shift=FLAGS.time_shift, sde=FLAGS.sde,
      seed=FLAGS.seed, size=FLAGS.size, use_ema=FLAGS.use_ema, step=None if FLAGS.step < 0 else FLAGS.step)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
