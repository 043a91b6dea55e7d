"""Evaluation of a trained demo run: do the generated digits follow their prompts, and do they look real?

  python -m nextstep_jax.evaluate --workdir=runs/demo [--per_digit=20 --cfg=3.0 --steps=28 --seed=0]
      [--config=configs/demo.py]  (default: the config saved with the checkpoint)

For every digit d the transformer (restored from ``<workdir>/checkpoints``) draws ``per_digit`` images
with the prompt exactly ``"a handwritten digit {d}"`` through the compiled sampler
(``nextstep_jax.sampling``; classifier-free guidance with the empty negative prompt when cfg != 1),
the VAE (``config.vae.checkpoint``) decodes them, and a small CNN trained on the real training digits
(``nextstep_jax.classifier``, kept in ``<workdir>/classifier``) judges them:
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

Reusable pieces (the demo script and the sample CLI call them):
  load_trained(workdir, config=None, step=None) -> (model, config, tokenizer, vae)
  generate_digits(model, config, tokenizer, vae, digits, per_digit, key, cfg, steps) -> uint8 (N, S, S, 3)
  frechet_distance(feats_a, feats_b) -> float
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
import ml_collections
import numpy as np
from flax import nnx

from nextstep_jax import classifier as clf_lib
from nextstep_jax.data import digits as digits_lib

PROMPT_TEMPLATE = "a handwritten digit {d}"
EVAL_FILE = "eval.json"
GRID_FILE = "samples_grid.png"
CLASSIFIER_DIR = "classifier"


# ------------------------------------------------------------------------------------------------
# Fréchet distance
# ------------------------------------------------------------------------------------------------

def _check_features(x, name: str) -> np.ndarray:
  a = np.asarray(x, np.float64)
  if a.ndim != 2:
    raise ValueError(f"{name} must be (N, F) features, got shape {a.shape}")
  if a.shape[0] < 2:
    raise ValueError(f"{name} needs at least 2 rows to estimate a covariance, got {a.shape[0]}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} holds non-finite values")
  return a


def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
  """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
  w, v = np.linalg.eigh((c + c.T) / 2.0)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)) for two Gaussians.

  tr((C1 C2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
  PSD matrix C1^(1/2) C2 C1^(1/2), which has the same spectrum as C1 C2 (no scipy, no complex
  round-off). Result clipped at 0."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  f = mu1.shape[0]
  if mu1.shape != (f,) or mu2.shape != (f,) or cov1.shape != (f, f) or cov2.shape != (f, f):
    raise ValueError(f"Fréchet distance needs means (F,) and covariances (F, F) of one F; got "
                     f"{mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}")
  s1 = _sqrtm_psd(cov1)
  m = s1 @ cov2 @ s1
  eig = np.linalg.eigvalsh((m + m.T) / 2.0)
  tr_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
  diff = mu1 - mu2
  fd = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)
  return max(fd, 0.0)


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
  """(mean (F,), covariance (F, F), unbiased) of features (N, F), in float64."""
  a = _check_features(feats, "features")
  return a.mean(axis=0), np.cov(a, rowvar=False)


def frechet_distance(feats_a, feats_b) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets (N_a, F) and (N_b, F)."""
  a = _check_features(feats_a, "feats_a")
  b = _check_features(feats_b, "feats_b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feats_a has {a.shape[1]} features per row, feats_b {b.shape[1]}")
  return gaussian_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# ------------------------------------------------------------------------------------------------
# Judging images with the classifier
# ------------------------------------------------------------------------------------------------

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
# A trained run: model, config, tokenizer, VAE
# ------------------------------------------------------------------------------------------------

def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The experiment config the run saved beside its checkpoints (``checkpoints/config.json``)."""
  path = os.path.join(checkpoint_dir(workdir), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir} holds no trained run's config; pass the "
                            "config explicitly (--config=configs/<name>.py)")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except ValueError as e:
    raise ValueError(f"{path}: not a valid config JSON ({e})") from e


def latest_step(workdir: str) -> int:
  """The newest finished checkpoint step of a run."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} does not exist: no trained transformer in {workdir}")
  from nextstep_jax.checkpoint import absolute  # pylint: disable=import-outside-toplevel
  manager = ocp.CheckpointManager(absolute(directory),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step()
  finally:
    manager.close()
  if step is None:
    raise FileNotFoundError(f"{directory} holds no finished checkpoint")
  return int(step)


def _load_tokenizer(workdir: str, config):
  from nextstep_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  tcfg = config.tokenizer
  path = tcfg.path or os.path.join(workdir, "tokenizer")
  if not tcfg.path and not os.path.isdir(path):
    raise FileNotFoundError(f"{path} does not exist: the demo tokenizer is saved there by training "
                            "(config tokenizer.path is empty)")
  tok = tok_lib.load_tokenizer(path, tcfg.kind)
  if tok.vocab_size > int(config.model.vocab_size):
    raise ValueError(f"tokenizer {path} has {tok.vocab_size} ids, more than model.vocab_size="
                     f"{config.model.vocab_size}")
  return tok


def _load_vae(config):
  from nextstep_jax import train_vae  # pylint: disable=import-outside-toplevel
  path = config.vae.checkpoint
  if not path:
    raise ValueError("config vae.checkpoint is empty: evaluation decodes samples with the run's VAE "
                     "(a train_vae work directory)")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config vae.checkpoint={path!r} is not a directory (relative paths are "
                            "read from the current directory)")
  vae, vae_cfg = train_vae.load_vae(path)
  want = int(config.image.latent_channels) * int(config.image.patch_size) ** 2
  if vae_cfg.token_dim != want or vae_cfg.patch_size != int(config.image.patch_size):
    raise ValueError(f"vae.checkpoint {path}: the VAE makes {vae_cfg.token_dim}-d tokens with patch "
                     f"{vae_cfg.patch_size}, the config expects {want}-d tokens with patch "
                     f"{config.image.patch_size}")
  return vae


def load_trained(workdir: str, config=None, step: int | None = None, use_ema: bool = True):
  """(model, config, tokenizer, vae) of a trained run.

  config: the experiment config (default: the one saved with the checkpoints); step: which
  checkpoint (default: the newest); use_ema: the EMA weights when the run kept them
  (config.ema_decay > 0), else the raw parameters. The model's parameters live on the first
  device. Tokenizer: config.tokenizer.path, or ``<workdir>/tokenizer`` for the demo; VAE:
  config.vae.checkpoint (a train_vae work directory)."""
  from nextstep_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  from nextstep_jax.checkpoint import restore_params_from  # pylint: disable=import-outside-toplevel
  config = config if config is not None else saved_config(workdir)
  step = latest_step(workdir) if step is None else int(step)
  graphdef, abstract, _ = train_lib.abstract_model(config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
  key = "ema" if use_ema and float(config.get("ema_decay", 0.0) or 0.0) > 0 else "params"
  step_dir = os.path.join(checkpoint_dir(workdir), str(step))
  if not os.path.isdir(step_dir):
    raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}")
  params = restore_params_from(step_dir, target, key=key)
  model = nnx.merge(graphdef, params)
  return model, config, _load_tokenizer(workdir, config), _load_vae(config)


# ------------------------------------------------------------------------------------------------
# Generating digits
# ------------------------------------------------------------------------------------------------

def digit_labels(digits: Sequence[int], per_digit: int) -> np.ndarray:
  """int32 (len(digits) * per_digit,): the label of each image ``generate_digits`` returns."""
  return np.repeat(np.asarray(list(digits), np.int32), int(per_digit))


def to_uint8(images) -> np.ndarray:
  """[-1, 1] pixels -> uint8 [0, 255] (clipped, rounded)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _decoder(vae, h: int, w: int):
  from nextstep_jax import latents  # pylint: disable=import-outside-toplevel
  decode, vae_params = latents.token_decoder(vae)
  fn = jax.jit(lambda p, t: decode(p, t, h, w))
  return lambda tokens: fn(vae_params, tokens)


def generate_digits(model, config, tokenizer, vae, digits: Sequence[int], per_digit: int, key: jax.Array,
                    cfg: float = 3.0, steps: int = 28, *, batch_size: int = 100, time_shift: float = 1.0,
                    use_norm: bool | None = None, sde: bool = False, image_size: int | None = None
                    ) -> np.ndarray:
  """uint8 (len(digits) * per_digit, S, S, 3): ``per_digit`` samples of each digit, digit-major (the
  labels are ``digit_labels(digits, per_digit)``), prompted with exactly "a handwritten digit {d}".

  The compiled sampler draws ``batch_size`` rows at a time (the last batch padded, so one
  compilation serves all); batch b uses the key fold_in(key, b), so samples depend on batch_size.
  cfg != 1 adds a row per sample for the empty negative prompt (guidance on the head). use_norm
  (token re-normalisation) defaults to config.image.token_norm; S to config.data.image_size."""
  from nextstep_jax import latents, sampling  # pylint: disable=import-outside-toplevel
  digits = [int(d) for d in digits]
  if not digits or any(not 0 <= d < digits_lib.NUM_CLASSES for d in digits):
    raise ValueError(f"digits must be a non-empty list of 0..9, got {digits}")
  if per_digit < 1 or batch_size < 1:
    raise ValueError(f"per_digit={per_digit} and batch_size={batch_size} must be >= 1")
  size = int(image_size or config.data.image_size)
  h, w = latents.token_grid(vae.config, size, size)
  if vae.config.token_dim != model.config.token_dim:
    raise ValueError(f"the VAE makes {vae.config.token_dim}-d tokens, the model expects "
                     f"{model.config.token_dim}-d")
  use_norm = bool(config.image.get("token_norm", True)) if use_norm is None else bool(use_norm)
  labels = digit_labels(digits, per_digit)
  texts = [PROMPT_TEMPLATE.format(d=int(d)) for d in labels]
  bs = min(batch_size, len(texts))
  decode = _decoder(vae, h, w)
  out = []
  for b, start in enumerate(range(0, len(texts), bs)):
    chunk = texts[start:start + bs]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (bs - real)
    cond, neg = sampling.image_prompts(tokenizer, chunk, h, w, negative="" if cfg != 1.0 else None)
    tokens = sampling.sample_images(model, cond, neg, h, w, jax.random.fold_in(key, b), cfg=float(cfg),
                                    steps=int(steps), time_shift=float(time_shift), use_norm=use_norm,
                                    sde=bool(sde), pad_id=int(tokenizer.pad_id))
    out.append(to_uint8(decode(tokens))[:real])
  return np.concatenate(out)


def samples_grid(images_u8: np.ndarray, per_digit: int) -> np.ndarray:
  """uint8 grid with one row per digit (``per_digit`` images each, digit-major input)."""
  from nextstep_jax.metrics import image_grid  # pylint: disable=import-outside-toplevel
  return image_grid(np.asarray(images_u8), cols=int(per_digit))


# ------------------------------------------------------------------------------------------------
# The VAE's reconstruction quality
# ------------------------------------------------------------------------------------------------

def vae_heldout_metrics(vae, images: np.ndarray, batch_size: int = 100) -> dict[str, float]:
  """PSNR / SSIM of the token round trip (encode to normalised tokens, decode) on [-1, 1] images."""
  from nextstep_jax import latents, train_vae  # pylint: disable=import-outside-toplevel
  h, w = latents.token_grid(vae.config, images.shape[1], images.shape[2])
  encode = latents.make_encode_fn(vae)
  decode = _decoder(vae, h, w)
  from nextstep_jax.data.batch import padded_chunks  # pylint: disable=import-outside-toplevel
  recon = [np.asarray(decode(encode(jnp.asarray(chunk))))[:real]
           for real, chunk in padded_chunks(images, min(batch_size, len(images)))]
  return train_vae.evaluate(images, np.concatenate(recon))


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
                 log: bool = True) -> dict[str, Any]:
  """Generates per_digit samples of each digit, judges them, measures the VAE; writes
  ``<workdir>/eval.json`` and ``<workdir>/samples_grid.png`` (when `write`). Returns the dict.

  classifier_dir: where the judge is kept (default ``<workdir>/classifier``; trained there on first
  use, ~30 s); vae_eval_images: held-out digits for PSNR/SSIM (0 = all 500)."""
  t0 = time.perf_counter()
  say = (lambda msg: print(f"[evaluate] {msg}", flush=True)) if log else (lambda msg: None)
  ckpt_step = latest_step(workdir) if step is None else int(step)
  model, config, tokenizer, vae = load_trained(workdir, config, ckpt_step)
  size = int(config.data.image_size)
  t_load = time.perf_counter() - t0

  t0 = time.perf_counter()
  judge, judge_meta = clf_lib.load_or_train_classifier(classifier_dir or os.path.join(workdir, CLASSIFIER_DIR))
  t_classifier = time.perf_counter() - t0
  say(f"classifier held-out accuracy {judge_meta['heldout_accuracy']:.3f}")

  t0 = time.perf_counter()
  digits = list(range(digits_lib.NUM_CLASSES))
  images = generate_digits(model, config, tokenizer, vae, digits, per_digit, jax.random.key(seed), cfg, steps,
                           batch_size=batch_size, time_shift=time_shift, image_size=size)
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
      "vae": vae_m,
      "eval_timing": {"load_s": t_load, "classifier_s": t_classifier, "generate_s": t_generate,
                      "judge_s": t_judge, "vae_s": t_vae},
  }
  say(f"prompt accuracy {result['prompt_accuracy']:.3f}, FD {result['frechet_distance']:.2f} "
      f"(real floor {fd_real:.2f}), VAE PSNR {vae_m['psnr']:.2f} dB SSIM {vae_m['ssim']:.4f}")
  if write:
    tmp = os.path.join(workdir, f".{EVAL_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2)
    os.replace(tmp, os.path.join(workdir, EVAL_FILE))
    _write_png(os.path.join(workdir, GRID_FILE), samples_grid(images, per_digit))
  return result


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def main(argv) -> None:
  del argv
  from absl import flags, logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  result = evaluate_run(f.workdir, f.config, per_digit=f.per_digit, cfg=f.cfg, steps=f.steps, seed=f.seed,
                        time_shift=f.time_shift, batch_size=f.batch_size,
                        step=None if f.step < 0 else f.step, classifier_dir=f.classifier_dir or None,
                        vae_eval_images=f.vae_eval_images)
  print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "experiment config (default: the one saved with the "
                                  "checkpoints)", lock_config=False)
  flags.DEFINE_string("workdir", None, "the trained run's work directory", required=True)
  flags.DEFINE_integer("per_digit", 20, "samples per digit")
  flags.DEFINE_float("cfg", 3.0, "classifier-free guidance scale (1 = none)")
  flags.DEFINE_integer("steps", 28, "flow-matching head ODE steps per token")
  flags.DEFINE_integer("seed", 0, "sampling seed")
  flags.DEFINE_float("time_shift", 1.0, "time-grid shift of the head's ODE (1 for text-to-image)")
  flags.DEFINE_integer("batch_size", 100, "rows per sampler call")
  flags.DEFINE_integer("step", -1, "checkpoint step (-1: the newest)")
  flags.DEFINE_string("classifier_dir", "", "where the judge classifier is kept (default: WORKDIR/classifier)")
  flags.DEFINE_integer("vae_eval_images", 0, "held-out digits for the VAE's PSNR/SSIM (0: all 500)")
  app.run(main)
