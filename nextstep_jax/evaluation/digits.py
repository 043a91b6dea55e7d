"""Evaluation of a trained demo run: do the generated digits follow their prompts, and do they look real?

  python -m nextstep_jax.evaluate --workdir=runs/demo [--per_digit=20 --cfg=3.0 --steps=28 --seed=0]
      [--config=configs/demo.py]  (default: the config saved with the checkpoint)

For every digit d the transformer (restored from ``<workdir>/checkpoints``) draws ``per_digit`` images
with the prompt exactly ``"a handwritten digit {d}"`` through the compiled sampler
(``nextstep_jax.sampling``; classifier-free guidance with the empty negative prompt when cfg != 1),
the VAE (``config.vae.checkpoint``) decodes them, and a small CNN trained on the real training digits
(``nextstep_jax.evaluation.classifier``, kept in ``<workdir>/classifier``) judges them:
  prompt_accuracy          fraction of samples the classifier reads as the prompted digit
                           (per_class_accuracy: the same per digit);
  frechet_distance         Fréchet distance between Gaussians fitted to the classifier's penultimate
                           features of the samples and of the 500 real held-out digits (an "FID" with
                           the digit classifier in place of Inception);
  frechet_distance_real    the same distance for as many real *training* digits as there are samples:
                           the floor that sampling noise alone gives at this sample size (the FD is
                           biased upwards for small sets, so compare the two numbers, not FD with 0);
  vae_psnr, vae_ssim       the VAE's reconstruction quality on the held-out digits (image_metrics);
  classifier_heldout_accuracy  how far the judge can be trusted.
Everything goes to ``<workdir>/eval.json``; ``<workdir>/samples_grid.png`` shows the samples, one row
per digit.

Reusable pieces (the demo script and DPO's digit preferences call them; a run is loaded by
``nextstep_jax.run.load_run``):
  sample_texts(model, config, tokenizer, vae, texts, key, ...) -> uint8 (N, S, S, 3)
  generate_digits(model, config, tokenizer, vae, digits, per_digit, key, cfg, steps) -> uint8 (N, S, S, 3)
  prompt_following(classifier, images, labels) -> float
  evaluate_generated(classifier, images, labels, real_images) -> dict
  evaluate_run(workdir, config=None, *, per_digit, cfg, steps, seed, ...) -> dict (also written)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax import run as run_lib
from nextstep_jax import sampling
from nextstep_jax import storage
from nextstep_jax.sampling import few_step
from nextstep_jax import vae_tokens
from nextstep_jax.batch import padded_chunks, to_uint8
from nextstep_jax.data import digits as digits_lib
from nextstep_jax.evaluation import classifier as clf_lib
from nextstep_jax.evaluation.frechet import frechet_distance
from nextstep_jax.evaluation.image_metrics import reconstruction_summary
from nextstep_jax.data.images import image_grid

PROMPT_TEMPLATE = "a handwritten digit {d}"
EVAL_FILE = "eval.json"
GRID_FILE = "samples_grid.png"
CLASSIFIER_DIR = "classifier"


def prompt_following(classifier: clf_lib.DigitClassifier, images, labels) -> float:
  """Fraction of images (uint8 or [-1, 1], (N, S, S, 3)) the classifier reads as their label."""
  return clf_lib.accuracy(classifier, images, labels)


def evaluate_generated(classifier: clf_lib.DigitClassifier, images, labels, real_images
                       ) -> dict[str, Any]:
  """prompt_accuracy, per_class_accuracy ({digit: accuracy} for the digits present), and the
  frechet_distance between the images and real_images in the classifier's feature space."""
  logits = clf_lib.predict(classifier, images)
  y = clf_lib._check_labels(labels, len(logits), classifier.config.num_classes)  # pylint: disable=protected-access
  pred = np.argmax(logits, axis=-1)
  per_class = {int(d): float(np.mean(pred[y == d] == d)) for d in np.unique(y)}
  fd = frechet_distance(clf_lib.features(classifier, images), clf_lib.features(classifier, real_images))
  return {"prompt_accuracy": float(np.mean(pred == y)), "per_class_accuracy": per_class,
          "frechet_distance": fd, "num_images": int(len(y)), "num_real": int(len(np.asarray(real_images)))}


# ------------------------------------------------------------------------------------------------
# Generating digits
# ------------------------------------------------------------------------------------------------

def digit_labels(digits: Sequence[int], per_digit: int) -> np.ndarray:
  """int32 (len(digits) * per_digit,): the label of each image ``generate_digits`` returns."""
  return np.repeat(np.asarray(list(digits), np.int32), int(per_digit))


def sample_texts(model, config, tokenizer, vae, texts: Sequence[str], key: jax.Array, *, cfg: float = 3.0,
                 steps: int = 28, batch_size: int = 100, time_shift: float = 1.0, use_norm: bool | None = None,
                 sde: bool = False, image_size: int | None = None) -> np.ndarray:
  """uint8 (N, S, S, 3) text-to-image samples of `texts`, drawn by the compiled sampler `batch_size`
  prompts at a time (the last batch padded, so one compilation serves all; batch b uses the key
  fold_in(key, b), so samples depend on batch_size). cfg != 1 adds a row per sample for the empty
  negative prompt (guidance on the head). use_norm (token re-normalisation) defaults to
  config.image.token_norm; S to config.data.image_size."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  size = int(image_size or config.data.image_size)
  h, w = vae_tokens.token_grid(vae.config, size, size)
  if vae.config.token_dim != model.config.token_dim:
    raise ValueError(f"the VAE makes {vae.config.token_dim}-d tokens, the model expects "
                     f"{model.config.token_dim}-d")
  use_norm = bool(config.image.token_norm) if use_norm is None else bool(use_norm)
  decode, vae_params = vae_tokens.token_decoder(vae)
  decode_fn = jax.jit(lambda p, t: decode(p, t, h, w))
  out = []
  texts = np.asarray([str(t) for t in texts], dtype=object)
  for b, (real, chunk) in enumerate(padded_chunks(texts, min(batch_size, len(texts)))):
    cond, neg = sampling.image_prompts(tokenizer, [str(t) for t in chunk], h, w, negative="" if cfg != 1.0 else None)
    tokens = sampling.sample_images(model, cond, neg, h, w, jax.random.fold_in(key, b), cfg=float(cfg),
                                    steps=int(steps), time_shift=float(time_shift), use_norm=use_norm,
                                    sde=bool(sde), pad_id=int(tokenizer.pad_id))
    out.append(to_uint8(decode_fn(vae_params, tokens))[:real])
  return np.concatenate(out)


def generate_digits(model, config, tokenizer, vae, digits: Sequence[int], per_digit: int, key: jax.Array,
                    cfg: float = 3.0, steps: int = 28, *, batch_size: int = 100, time_shift: float = 1.0,
                    use_norm: bool | None = None, sde: bool = False, image_size: int | None = None
                    ) -> np.ndarray:
  """uint8 (len(digits) * per_digit, S, S, 3): ``per_digit`` samples of each digit, digit-major (the
  labels are ``digit_labels(digits, per_digit)``), prompted with exactly "a handwritten digit {d}"
  (``sample_texts`` draws them)."""
  digits = [int(d) for d in digits]
  if not digits or any(not 0 <= d < digits_lib.NUM_CLASSES for d in digits):
    raise ValueError(f"digits must be a non-empty list of 0..9, got {digits}")
  if per_digit < 1 or batch_size < 1:
    raise ValueError(f"per_digit={per_digit} and batch_size={batch_size} must be >= 1")
  texts = [PROMPT_TEMPLATE.format(d=int(d)) for d in digit_labels(digits, per_digit)]
  return sample_texts(model, config, tokenizer, vae, texts, key, cfg=cfg, steps=steps, batch_size=batch_size,
                      time_shift=time_shift, use_norm=use_norm, sde=sde, image_size=image_size)


def samples_grid(images_u8: np.ndarray, per_digit: int) -> np.ndarray:
  """uint8 grid with one row per digit (``per_digit`` images each, digit-major input)."""
  return image_grid(np.asarray(images_u8), cols=int(per_digit))


# ------------------------------------------------------------------------------------------------
# The VAE's reconstruction quality
# ------------------------------------------------------------------------------------------------

def vae_heldout_metrics(vae, images: np.ndarray, batch_size: int = 100) -> dict[str, float]:
  """PSNR / SSIM of the token round trip (encode to normalised tokens, decode) on [-1, 1] images."""
  h, w = vae_tokens.token_grid(vae.config, images.shape[1], images.shape[2])
  encode = vae_tokens.make_encode_fn(vae)
  decode, vae_params = vae_tokens.token_decoder(vae)
  decode_fn = jax.jit(lambda p, t: decode(p, t, h, w))
  recon = [np.asarray(decode_fn(vae_params, encode(jnp.asarray(chunk))))[:real]
           for real, chunk in padded_chunks(images, min(batch_size, len(images)))]
  return reconstruction_summary(images, np.concatenate(recon))


# ------------------------------------------------------------------------------------------------
# The whole evaluation
# ------------------------------------------------------------------------------------------------

def _write_png(path: str, image_u8: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  tmp = f"{path}.{os.getpid()}.tmp.png"
  Image.fromarray(image_u8.squeeze(-1) if image_u8.shape[-1] == 1 else image_u8).save(tmp)
  os.replace(tmp, path)


def evaluate_run(workdir: str, config=None, *, per_digit: int = 20, cfg: float = 3.0, steps: int = 28,
                 seed: int = 0, time_shift: float = 1.0, batch_size: int = 100, step: int | None = None,
                 classifier_dir: str | None = None, vae_eval_images: int = 0, write: bool = True,
                 log: bool = True, head: str | None = None) -> dict[str, Any]:
  """Generates per_digit samples of each digit, judges them, measures the VAE; writes
  ``<workdir>/eval.json`` and ``<workdir>/samples_grid.png`` (when `write`). Returns the dict.

  classifier_dir: where the judge is kept (default ``<workdir>/classifier``; trained there on first
  use, ~30 s); vae_eval_images: held-out digits for PSNR/SSIM (0 = all 500).
  head: a few-step head directory (``sampling.few_step``): the samples come from it, with the steps, cfg and
  time shift it was distilled for (the ODE) in place of `cfg`, `steps` and `time_shift`; eval.json and the
  grid are then written into the head's directory (for a head URL, its copy in this host's cache), not the
  run's."""
  t0 = time.perf_counter()
  say = (lambda msg: print(f"[evaluate] {msg}", flush=True)) if log else (lambda msg: None)
  head_dir = storage.local_input(head, "head") if head else None  # a URL: staged once, here
  head_meta = few_step.read_meta(head_dir) if head else None
  remote = workdir if storage.is_remote(workdir) else None
  workdir = run_lib.local_run(workdir)  # a URL: its local mirror (eval.json and the grid are uploaded back)
  run = run_lib.load_run(workdir, config, step)
  model, config, tokenizer, vae, ckpt_step = run.model, run.config, run.tokenizer, run.vae, run.step
  use_norm = None
  if head:
    model, _ = few_step.with_head(model, head_dir, head_meta)
    k = few_step.sampling_kwargs(head_meta)
    steps, cfg, time_shift, use_norm = k["steps"], k["cfg"], k["time_shift"], k["use_norm"]
  model = sampling.sampler_weights(model, consume=True)  # laid out once for every batch (sampling/layout.py)
  del run
  size = int(config.data.image_size)
  t_load = time.perf_counter() - t0

  t0 = time.perf_counter()
  judge, judge_meta = clf_lib.load_or_train_classifier(classifier_dir or os.path.join(workdir, CLASSIFIER_DIR))
  t_classifier = time.perf_counter() - t0
  say(f"classifier held-out accuracy {judge_meta['heldout_accuracy']:.3f}")

  t0 = time.perf_counter()
  digits = list(range(digits_lib.NUM_CLASSES))
  images = generate_digits(model, config, tokenizer, vae, digits, per_digit, jax.random.key(seed), cfg, steps,
                           batch_size=batch_size, time_shift=time_shift, image_size=size, use_norm=use_norm)
  labels = digit_labels(digits, per_digit)
  t_generate = time.perf_counter() - t0
  say(f"{len(images)} samples in {t_generate:.1f} s (cfg {cfg}, {steps} steps)")

  t0 = time.perf_counter()
  held_u8, _ = digits_lib.load_split("heldout")
  real = digits_lib.pad_digits_u8(held_u8, size)
  gen = evaluate_generated(judge, images, labels, real)
  # The floor: as many real training digits as samples (same digits per class) against held-out.
  train_u8, train_y = digits_lib.load_split("train")
  rng = np.random.default_rng(seed)
  ref_idx = np.concatenate([rng.choice(np.flatnonzero(train_y == d), size=per_digit,
                                       replace=per_digit > np.sum(train_y == d)) for d in digits])
  ref_feats = clf_lib.features(judge, digits_lib.pad_digits_u8(train_u8[ref_idx], size))
  fd_real = frechet_distance(ref_feats, clf_lib.features(judge, real))
  t_judge = time.perf_counter() - t0

  t0 = time.perf_counter()
  n_vae = len(held_u8) if vae_eval_images <= 0 else min(int(vae_eval_images), len(held_u8))
  vae_m = vae_heldout_metrics(vae, digits_lib.to_pixels(held_u8[:n_vae], size))
  t_vae = time.perf_counter() - t0

  result: dict[str, Any] = {
      "prompt_accuracy": gen["prompt_accuracy"],
      "frechet_distance": gen["frechet_distance"],
      "frechet_distance_real": fd_real,
      "vae_psnr": vae_m["psnr"],
      "vae_ssim": vae_m["ssim"],
      "classifier_heldout_accuracy": float(judge_meta["heldout_accuracy"]),
      "per_class_accuracy": {str(d): v for d, v in gen["per_class_accuracy"].items()},
      "num_samples": gen["num_images"],
      "num_real": gen["num_real"],
      "per_digit": int(per_digit),
      "prompt_template": PROMPT_TEMPLATE,
      "cfg": float(cfg),
      "sampling_steps": int(steps),
      "time_shift": float(time_shift),
      "seed": int(seed),
      "checkpoint_step": ckpt_step,
      "head": head or "",
      "vae": vae_m,
      "eval_timing": {"load_s": t_load, "classifier_s": t_classifier, "generate_s": t_generate,
                      "judge_s": t_judge, "vae_s": t_vae},
  }
  say(f"prompt accuracy {result['prompt_accuracy']:.3f}, FD {result['frechet_distance']:.2f} "
      f"(real floor {fd_real:.2f}), VAE PSNR {vae_m['psnr']:.2f} dB SSIM {vae_m['ssim']:.4f}")
  if write:
    where = head_dir or workdir
    tmp = os.path.join(where, f".{EVAL_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2)
    os.replace(tmp, os.path.join(where, EVAL_FILE))
    _write_png(os.path.join(where, GRID_FILE), samples_grid(images, per_digit))
    if remote and not head:
      mirror = storage.RemoteWorkdir(remote, steps_dir=run_lib.CHECKPOINTS)
      for name in (EVAL_FILE, GRID_FILE):
        mirror.upload(name)
  return result
