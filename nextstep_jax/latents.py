"""Per-channel latent statistics of a VAE over a dataset (the digits or a folder of images).

CLI: python -m nextstep_jax.latents --vae_workdir=WORKDIR (a train_vae workdir) | --vae_dir=DIR
     (an exported / imported VAE directory) --out_dir=DIR [--split=train] [--source=digits]
     [--image_size=32] [--batch_size=100]

Writes ``--out_dir/{split}_latent_stats.json`` (``vae_tokens.latent_stats``: per token dimension and
per channel of the tokens, and of the encoder's raw posterior mean, the figures to choose scaling
and shift factors by). The latent tokens training reads are written by the data command, into the
records themselves: ``python -m nextstep_jax.data prepare --input=... --out=ROOT --vae=VAE`` (with
the same statistics of what it stored in ``ROOT/latent_stats.json``), then ``python -m
nextstep_jax.train ... --config.data.source=ROOT --config.data.payload=image_tokens``.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import flags

from nextstep_jax import cli
from nextstep_jax import run as run_lib
from nextstep_jax import vae_tokens
from nextstep_jax.data.images import load_images

PREPARE_HINT = ("latent tokens for training: python -m nextstep_jax.data prepare --input=... "
                "--out=ROOT --vae=VAE, then train with --config.data.source=ROOT "
                "--config.data.payload=image_tokens")


def main(argv=None) -> None:
  del argv
  f = flags.FLAGS
  if bool(f.vae_workdir) == bool(f.vae_dir):
    raise cli.UserError("give exactly one of --vae_workdir (train_vae output) or --vae_dir "
                        "(exported VAE directory)")
  vae = run_lib.load_vae(f.vae_workdir or f.vae_dir)
  images, _ = load_images(f.source, f.split, f.image_size)
  os.makedirs(f.out_dir, exist_ok=True)
  t0 = time.time()
  stats = vae_tokens.latent_stats(vae, images, f.batch_size)
  stats_path = os.path.join(f.out_dir, f"{f.split}_latent_stats.json")
  with open(stats_path, "w") as fh:
    json.dump(stats, fh, indent=2)
  print(f"latent stats of {len(images)} images -> {stats_path} ({time.time() - t0:.1f} s); "
        f"channel mean {np.round(stats['channel_mean'], 3).tolist()}, "
        f"std {np.round(stats['channel_std'], 3).tolist()}")
  print(PREPARE_HINT)


def _define_flags() -> None:
  flags.DEFINE_string("vae_workdir", "", "train_vae workdir to load the VAE from")
  flags.DEFINE_string("vae_dir", "", "exported VAE directory (config.json + weights)")
  flags.DEFINE_string("out_dir", None, "where to write the statistics", required=True)
  flags.DEFINE_string("source", "digits", "'digits' or a folder of images")
  flags.DEFINE_string("split", "train", "'train', 'heldout' or 'all'")
  flags.DEFINE_integer("image_size", 32, "image side in pixels")
  flags.DEFINE_integer("batch_size", 100, "images per encoder call")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
