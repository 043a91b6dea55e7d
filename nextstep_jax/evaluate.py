"""Evaluation of a trained demo run: do the generated digits follow their prompts, and do they look real?

  python -m nextstep_jax.evaluate --workdir=runs/demo [--per_digit=20 --cfg=3.0 --steps=28 --seed=0]
      [--config=configs/demo.py]  (default: the config saved with the checkpoint)
  python -m nextstep_jax.evaluate --workdir=runs/demo --head=runs/demo/heads/k4   # a few-step head

It samples every digit with the prompt "a handwritten digit {d}", judges the samples with the digit
classifier (prompt accuracy, Fréchet distance against real digits and its real-vs-real floor), measures
the VAE, and writes ``<workdir>/eval.json`` and ``<workdir>/samples_grid.png``. The library: ``nextstep_jax/evaluation/digits.py``.
"""

from __future__ import annotations

import json

from absl import flags, logging
from ml_collections import config_flags

from nextstep_jax import cli
from nextstep_jax.evaluation import digits


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  for name in ("per_digit", "steps", "batch_size"):
    if f[name].value < 1:
      raise cli.UserError(f"--{name}={f[name].value} must be >= 1")
  if not f.cfg >= 0:
    raise cli.UserError(f"--cfg={f.cfg} must be >= 0 (1: no guidance)")
  if not f.time_shift > 0:
    raise cli.UserError(f"--time_shift={f.time_shift} must be > 0")
  clash = [f"--{n}" for n in ("steps", "cfg", "time_shift") if f.head and f[n].present]
  if clash:
    raise cli.UserError(f"--head={f.head} samples with the settings it was distilled for (its head.json): "
                        f"drop {', '.join(clash)}")
  result = digits.evaluate_run(f.workdir, f.config, per_digit=f.per_digit, cfg=f.cfg, steps=f.steps, seed=f.seed,
                        time_shift=f.time_shift, batch_size=f.batch_size,
                        step=None if f.step < 0 else f.step, classifier_dir=f.classifier_dir or None,
                        vae_eval_images=f.vae_eval_images, head=f.head or None)
  print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
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
  flags.DEFINE_string("head", "", "a few-step head directory (python -m nextstep_jax.distill): judge its samples "
                      "(its K steps, cfg, time shift); eval.json and the grid go into that directory")
  flags.DEFINE_integer("vae_eval_images", 0, "held-out digits for the VAE's PSNR/SSIM (0: all 500)")
  cli.run(main)
