"""A trained run sampled to PNG files: text-to-image, or editing with a source image
(``python -m nextstep_jax.sample`` is its command line)."""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax import parallel
from nextstep_jax import run as run_lib
from nextstep_jax import storage
from nextstep_jax import vae_tokens
from nextstep_jax.batch import to_uint8
from nextstep_jax.config import UserError
from nextstep_jax.data.images import load_image
from nextstep_jax.sampling import few_step, layout
from nextstep_jax.sampling.prompts import Prompt, edit_prompts, image_prefix_ids, image_prompts
from nextstep_jax.sampling.flow import CFG_SCHEDULES
from nextstep_jax.sampling.sampler import edit_images, reporting, sample_images
from nextstep_jax.data.images import image_grid


def check_request(prompt: str, *, num: int = 4, batch: int = 0, image: str = "", negative: str = "", cfg: float = 7.5,
                  cfg_img: float = 2.0, steps: int = 50, time_shift: float = -1.0, size: int = 0,
                  step: int | None = None, unconditional: bool = False, out: str = "", sde: bool = True,
                  cfg_schedule: str = "constant", dtype: str = "float32") -> None:
  """Refuses, before anything is loaded, a request the sampler cannot honour (UserError naming the
  flag of ``python -m nextstep_jax.sample``)."""
  if unconditional:
    if prompt.strip():
      raise UserError(f"--unconditional samples without a caption, but --prompt={prompt!r} was given: "
                      "drop one of them")
    if image:
      raise UserError("--unconditional is text-to-image only: editing (--image) needs an instruction")
    if negative:
      raise UserError("--negative has no use with --unconditional (one row per sample, no guidance)")
  elif not prompt.strip():
    raise UserError("--prompt is empty: give " + ("the editing instruction" if image else
                    "a caption, or --unconditional to sample without one"))
  if num < 1:
    raise UserError(f"--num={num} must be >= 1")
  if batch < 0:
    raise UserError(f"--batch={batch} must be >= 0 (images per sampler call; 0: all --num in one)")
  if steps < (2 if sde else 1):
    raise UserError(f"--steps={steps} must be >= {2 if sde else 1} (head steps per token; the SDE's last step "
                    "is its own)" if sde else f"--steps={steps} must be >= 1 (flow-matching ODE steps per token)")
  if cfg_schedule not in CFG_SCHEDULES:
    raise UserError(f"--cfg_schedule={cfg_schedule!r}; expected one of {', '.join(CFG_SCHEDULES)}")
  if dtype not in ("float32", "bfloat16"):
    raise UserError(f"--dtype={dtype!r}; expected float32 or bfloat16")
  if not math.isfinite(cfg) or cfg < 0:
    raise UserError(f"--cfg={cfg} must be >= 0: the guided velocity is v_neg + cfg * (v_prompt - v_neg), "
                    "so 1 is no guidance, 0 the negative prompt alone, > 1 stronger guidance")
  if not math.isfinite(cfg_img) or cfg_img < 0:
    raise UserError(f"--cfg_img={cfg_img} must be >= 0: editing adds cfg_img * (v_image - v_neg) to the "
                    "negative row's velocity, so 1 is no image guidance, > 1 stronger")
  if time_shift != -1.0 and not (math.isfinite(time_shift) and time_shift > 0):
    raise UserError(f"--time_shift={time_shift} must be > 0 (or -1: 1.0 for text-to-image, 3.2 for editing)")
  if size < 0:
    raise UserError(f"--size={size} must be >= 0 (0: the config's data.image_size)")
  if step is not None and step < 0:
    raise UserError(f"--step={step} must be >= 0 (or -1: the newest)")
  if out and os.path.exists(out) and not os.path.isdir(out):
    raise NotADirectoryError(f"--out={out} is a file, not a directory")
  if image:
    if os.path.isdir(image):
      raise UserError(f"--image={image} is a directory, not an image file (PNG/JPEG)")
    if not os.path.exists(image):
      raise FileNotFoundError(f"--image {image}: no such file")


def check_context(config, tokenizer, prompt: str, negative: str, h: int, w: int, *, image: bool,
                  guided: bool = True, unconditional: bool = False) -> None:
  """Refuses prompts that do not fit the model's context with the image they ask for: the run trained
  on rows of ``data.seq_len`` positions, and a row of the sampler holds the prompt (with, for editing,
  the source image's block), the image prefix and the h*w image tokens."""
  limit = int(config.data.seq_len)
  prefix = len(image_prefix_ids(tokenizer, h, w))
  block = prefix + h * w + 1 if image else 0  # editing: the source image's prefix, tokens and EOI
  rows = [("--prompt", "" if unconditional else prompt)]
  if guided and not unconditional:
    rows.append(("--negative", negative))
  for name, text in rows:
    n = len(tokenizer.encode(text))
    total = block + n + prefix + h * w
    if total > limit:
      src = f"the source image's block ({block}), " if image else ""
      raise UserError(f"{name} is too long: {n} tokens; with {src}the image prefix ({prefix}) and the "
                      f"{h * w} image tokens a row needs {total} positions, more than the model's context "
                      f"of {limit} (data.seq_len of the run's config); at most {limit - (total - n)} prompt "
                      "tokens fit")


def parse_mesh(text: str) -> dict[str, int]:
  """'fsdp=2,tensor=4' -> {'data': -1, 'fsdp': 2, 'tensor': 4} (the axes not named: data takes the rest
  unless another axis is -1, the others 1); UserError naming the flag for text of another form."""
  axes = {"data": -1, "fsdp": 1, "tensor": 1}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in axes or not value.strip().lstrip("-").isdigit():
      raise UserError(f"--mesh={text!r}: expected axis=size pairs over {', '.join(axes)} (e.g. fsdp=2,tensor=4)")
    axes[name] = int(value)
  if -1 in (axes["fsdp"], axes["tensor"]) and "data" not in text:
    axes["data"] = 1  # another axis takes the rest of the devices
  return axes  # sizes are checked against the devices by parallel.make_mesh (sampling_mesh)


def sampling_mesh(config, mesh: str = ""):
  """The mesh the sampler runs under: `mesh` ('fsdp=2,tensor=4') over all devices; else the run's
  ``config.mesh`` when it shards the model (fsdp or tensor > 1) and there are several devices; else none:
  one device holds the model (a data-only mesh would only replicate it)."""
  axes = parse_mesh(mesh) if mesh else dict(config.mesh.axes)
  if not mesh and (jax.device_count() == 1 or all(int(axes.get(k, 1)) == 1 for k in ("fsdp", "tensor"))):
    return None
  try:
    return parallel.make_mesh(axes)
  except ValueError as e:
    raise UserError(f"--mesh={mesh or dict(config.mesh.axes)}: {e}") from e


# Images of fewer tokens than this sample in seconds on any machine: no progress lines for them.
PROGRESS_MIN_TOKENS = 256


def progress_every(tokens: int, lines: int = 8) -> int:
  """Every how many image tokens the sampler reports a call's progress (``sampler.reporting``): `lines`
  times per image, or never (0) for an image of fewer than ``PROGRESS_MIN_TOKENS`` tokens."""
  return 0 if tokens < PROGRESS_MIN_TOKENS else max(1, tokens // lines)


class ProgressLines:
  """A sampler call's progress as lines on stderr (``sampler.reporting``'s listener): what is sampled, the
  tokens done and the seconds since `t0` (the call's start: compilation included on the first call)."""

  def __init__(self, what: str, t0: float, stream=None):
    self.what, self.t0, self.stream = what, t0, stream
    self.done = 0

  def __call__(self, done: int, total: int) -> None:
    if done <= self.done:  # the host may hear of the steps out of order: report each step once, forwards
      return
    self.done = done
    print(f"sample: {self.what}: token {done}/{total} ({100 * done // total}%), "
          f"{time.perf_counter() - self.t0:.1f} s", file=self.stream or sys.stderr, flush=True)


def _grid(pixels_per_token: int, size: int, what: str) -> tuple[int, int]:
  if size % pixels_per_token:
    raise UserError(f"--size={size} is not divisible by the {pixels_per_token} pixels of a token ({what})")
  return size // pixels_per_token, size // pixels_per_token


def sample_run(workdir: str, prompt: str, *, out: str = "", num: int = 4, image: str = "", negative: str = "",
        cfg: float = 7.5, cfg_img: float = 2.0, steps: int = 50, time_shift: float = -1.0, sde: bool = True,
        seed: int = 0, size: int = 0, use_ema: bool = True, step: int | None = None,
        unconditional: bool = False, use_norm: bool = True, cfg_schedule: str = "constant",
        dtype: str = "float32", mesh: str = "", batch: int = 0, head: str = "") -> dict:
  """Samples `num` images of the run in `workdir` for `prompt` (editing `image` when given; no prompt
  and no guidance when `unconditional`), `batch` per call (0: all in one), and writes them and
  ``grid.png`` to `out` (default W/samples). Image n's noise comes from ``fold_in(key(seed), n)``, so
  the images do not depend on `batch`.
  Mistakes in the request raise UserError (or FileNotFoundError for a missing path) before anything
  compiles. Defaults follow the official pipeline's documented usage (the SDE head sampler, 50 steps,
  cfg 7.5, use_norm, constant schedule); `dtype` "bfloat16" reads the weights and runs the backbone and
  the head's network in bf16 (the head's integration and guidance stay fp32, as in the official code).
  `mesh` ('fsdp=2,tensor=4'; default the run's config.mesh on several devices): the params are restored
  sharded on it and the sampler runs under it (``sampling_mesh``).
  `head`: a few-step head directory (``python -m nextstep_jax.distill``): the head's weights are replaced by
  its, and `steps`, `sde`, `cfg`, `time_shift` and `use_norm` by the settings it was distilled for
  (``few_step.sampling_kwargs``; text-to-image with a constant schedule only).
  Images of ``PROGRESS_MIN_TOKENS`` tokens or more: each call's progress on stderr (``ProgressLines``)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel  # optional: only to write PNGs
  check_request(prompt, num=num, batch=batch, image=image, negative=negative, cfg=cfg, cfg_img=cfg_img, steps=steps,
                time_shift=time_shift, size=size, step=step, unconditional=unconditional, out=out, sde=sde,
                cfg_schedule=cfg_schedule, dtype=dtype)
  workdir = run_lib.local_run(workdir)  # a URL (gs://...): its local mirror, the newest complete step pulled
  if not os.path.isdir(workdir):
    if os.path.exists(workdir):
      raise NotADirectoryError(f"--workdir={workdir} is a file, not a training work directory")
    raise FileNotFoundError(f"--workdir={workdir}: no such directory")
  head_dir = ""
  if head:
    head_dir = storage.local_input(head, "--head")  # a URL: staged once, here
    head_meta = few_step.read_meta(head_dir)  # before any weights load
    if image or unconditional:
      raise UserError(f"--head={head} is distilled for text-to-image with guidance on the negative prompt: "
                      "drop --image / --unconditional, or --head")
    if cfg_schedule != "constant":
      raise UserError(f"--head={head} learnt a constant guidance scale: drop --cfg_schedule={cfg_schedule}")
    k = few_step.sampling_kwargs(head_meta)
    steps, sde, cfg, time_shift, use_norm = k["steps"], k["sde"], k["cfg"], k["time_shift"], k["use_norm"]
  guided = cfg != 1.0 or bool(image)
  # The prompt's length against the context, with the grid the config names, before any weights load.
  config = run_lib.saved_config(workdir)
  tokenizer = run_lib.load_tokenizer(config, workdir)
  size = size or int(config.data.image_size)
  unit = int(config.image.vae_factor) * int(config.image.patch_size)  # the data path's token side
  checked = (size // unit, size // unit) if size % unit == 0 else None
  if checked:
    check_context(config, tokenizer, prompt, negative, *checked, image=bool(image), guided=guided,
                  unconditional=unconditional)
  if dtype != "float32":
    config = config.copy_and_resolve_references()
    config.model.dtype = config.model.param_dtype = dtype
  devices = sampling_mesh(config, mesh)
  loaded = run_lib.load_run(workdir, config=config, step=step, use_ema=use_ema, mesh=devices, tokenizer=tokenizer)
  rules = config.mesh.rules
  model, config, tokenizer, vae = loaded.model, loaded.config, loaded.tokenizer, loaded.vae
  if head:
    model, _ = few_step.with_head(model, head_dir, head_meta)
  # The weights in the sampler's layout once, for every call; the model's own copy freed as it goes, so
  # the device holds the weights once (``layout.sampler_weights``).
  model = layout.sampler_weights(model, consume=True)
  del loaded
  cfg_vae = vae.config
  h, w = _grid(cfg_vae.pixels_per_token, size, f"VAE factor {cfg_vae.factor} x patch size {cfg_vae.patch_size}")
  if (h, w) != checked:  # the VAE's grid differs from the one the config names: check it too
    check_context(config, tokenizer, prompt, negative, h, w, image=bool(image), guided=guided,
                  unconditional=unconditional)
  # Image n draws from fold_in(key(seed), n) whatever the batch and --num (``flow.row_noise``): --batch
  # changes the speed, never the images.
  base = jax.random.key(seed)
  keys = jax.vmap(lambda n: jax.random.fold_in(base, n))(jnp.arange(num))
  batch = min(batch or num, num)
  every = progress_every(h * w)
  if image:
    try:
      pixels = load_image(image, size)
    except ValueError as e:  # "--image X: not a readable image (...)"
      raise UserError(str(e)) from e
    src = vae_tokens.make_encode_fn(vae)(pixels[None])[0]
    groups = edit_prompts(tokenizer, np.asarray(src), prompt, negative, h, w)
    groups = [Prompt(np.repeat(g.tokens, batch, 0), np.repeat(g.mask, batch, 0),
                              None if g.image_tokens is None else np.repeat(g.image_tokens, batch, 0),
                              None if g.image_index is None else np.repeat(g.image_index, batch, 0)) for g in groups]
    shift = 3.2 if time_shift < 0 else time_shift
    fn = lambda k: edit_images(model, *groups, h, w, k, cfg=cfg, cfg_img=cfg_img, steps=steps, time_shift=shift,
                               sde=sde, pad_id=tokenizer.pad_id, use_norm=use_norm, cfg_schedule=cfg_schedule,
                               mesh=devices, rules=rules, progress_every=every)
  else:
    text = "" if unconditional else prompt
    cond, neg = image_prompts(tokenizer, [text] * batch, h, w,
                              negative=negative if guided and not unconditional else None)
    shift = 1.0 if time_shift < 0 else time_shift
    fn = lambda k: sample_images(model, cond, neg, h, w, k, cfg=cfg, steps=steps, time_shift=shift, sde=sde,
                                 pad_id=tokenizer.pad_id, use_norm=use_norm, cfg_schedule=cfg_schedule,
                                 mesh=devices, rules=rules, progress_every=every)
  out = out or os.path.join(workdir, "samples")
  os.makedirs(out, exist_ok=True)
  images, times = [], []
  calls = -(-num // batch)
  for c in range(calls):
    idx = list(range(c * batch, min((c + 1) * batch, num)))
    rows = idx + [idx[-1]] * (batch - len(idx))  # the last call filled up to the compiled batch
    t0 = time.perf_counter()
    with reporting(ProgressLines(f"images {idx[0]}..{idx[-1]}" + (" (compiles first)" if c == 0 else ""), t0)):
      tokens = jax.block_until_ready(fn(keys[np.asarray(rows)]))[:len(idx)]
    times.append(time.perf_counter() - t0)
    for n, im in zip(idx, to_uint8(vae_tokens.decode_tokens(vae, tokens, h, w))):
      Image.fromarray(im).save(os.path.join(out, f"sample_{n:03d}.png"))
      images.append(im)
    if calls > 1:
      print(f"call {c + 1}/{calls}: images {idx[0]}..{idx[-1]} in {times[-1]:.2f} s", flush=True)
  Image.fromarray(image_grid(np.stack(images))).save(os.path.join(out, "grid.png"))
  # After the first call (it compiles), every call samples `batch` images.
  warm = sum(times[1:]) / (batch * (calls - 1)) if calls > 1 else None
  stats = {"images": int(num), "batch": int(batch), "head_evaluations": int(steps), "first_call_s": times[0],
           "seconds_per_image": warm, "images_per_second": None if warm is None else 1.0 / warm, "out": out}
  speed = (f"{warm:.3f} s per image after the first call ({1.0 / warm:.2f} images/s at --batch={batch})"
           if warm is not None else "one call: more than --batch images time the sampler without compilation")
  print(f"{num} images of {size}x{size} ({h * w} tokens) in {sum(times):.2f} s, first call with compilation "
        f"{times[0]:.1f} s; {speed} -> {out}", flush=True)
  return stats
