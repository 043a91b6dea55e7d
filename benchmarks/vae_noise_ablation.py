"""Latent noise augmentation ablation for the demo VAE: gamma = 0.2 against gamma = 0 (SPEC §8).

Trains configs/vae_demo.py twice with the same seed and steps, once with noise std ~ U(0, 0.2)
added to the normalised latent before decoding and once without, then prints for each run:
held-out PSNR / SSIM (clean mean latents), training time, and the held-out PSNR when the decoder
gets latents perturbed by N(0, 0.2^2) noise (how robust the decoder is to off-manifold latents,
which is what the augmentation is meant to buy for generation).

  python benchmarks/vae_noise_ablation.py --workdir=runs/vae_ablation [--steps=700]

Writes <workdir>/ablation.json; each run keeps its own workdir (gamma_0.2/, gamma_0/).
Prints figures, asserts nothing about them.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from nextstep_jax import run as run_lib  # noqa: E402
from configs import vae_demo  # noqa: E402
from nextstep_jax.data import images as images_lib  # noqa: E402
from nextstep_jax.training import vae_trainer  # noqa: E402

flags.DEFINE_string("workdir", "runs/vae_ablation", "output directory")
flags.DEFINE_integer("steps", 0, "training steps per run (0 = the config's)")
flags.DEFINE_float("probe_std", 0.2, "std of the latent perturbation of the robustness probe")
FLAGS = flags.FLAGS


def perturbed_psnr(workdir: str, images: np.ndarray, std: float, seed: int = 0) -> float:
  """Held-out PSNR when decoding (mean latent + N(0, std^2) noise)."""
  from nextstep_jax.evaluation.image_metrics import psnr, to_unit
  vae = run_lib.load_vae(workdir)
  key = jax.random.key(seed)
  out = []
  for i in range(0, len(images), 100):
    x = jnp.asarray(images[i:i + 100])
    z = vae.encode(x, sample=False)
    z = z + std * jax.random.normal(jax.random.fold_in(key, i), z.shape)
    out.append(np.asarray(psnr(to_unit(x), to_unit(vae.decode(z)))))
  return float(np.concatenate(out).mean())


def main(argv) -> None:
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  heldout, _ = images_lib.load_images("digits", "heldout", 32)
  rows = {}
  for name, noise in (("gamma_0.2", True), ("gamma_0", False)):
    config = vae_demo.get_config()
    with config.unlocked():
      if FLAGS.steps:
        config.steps = FLAGS.steps
      config.train.noise_aug = noise
      config.train.gamma = 0.2
    wd = os.path.join(FLAGS.workdir, name)
    result = vae_trainer.train_and_evaluate(config, wd)
    result["perturbed_psnr"] = perturbed_psnr(wd, heldout, FLAGS.probe_std)
    rows[name] = {k: v for k, v in result.items() if k != "vae"}
  print(f"\n{'run':<10} {'steps':>6} {'train s':>8} {'PSNR':>7} {'SSIM':>7} "
        f"{'PSNR@z+N(0,%.1f^2)' % FLAGS.probe_std:>18}")
  for name, r in rows.items():
    print(f"{name:<10} {r['step']:>6} {r['train_time_s']:>8.1f} {r['psnr']:>7.2f} {r['ssim']:>7.4f} "
          f"{r['perturbed_psnr']:>18.2f}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "ablation.json"), "w") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
