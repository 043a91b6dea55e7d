"""Train the image tokenizer, then evaluate it (the library: ``nextstep_jax/training/vae_trainer.py``).

  python -m nextstep_jax.train_vae --config=configs/vae_demo.py [--workdir=DIR] \
      [--config.steps=200 --config.train.noise_aug=False ...]
"""

from __future__ import annotations


if __name__ == "__main__":
  from nextstep_jax import startup  # stdlib only: in place before the heavy imports below
  startup.exit_on_interrupt()

import json

from absl import flags, logging
from ml_collections import config_flags

from nextstep_jax import cli
from nextstep_jax.training import vae_trainer
from nextstep_jax.training.metrics import log


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  config = flags.FLAGS.config
  result = vae_trainer.train_and_evaluate(config, flags.FLAGS.workdir or config.workdir)
  log(json.dumps({k: v for k, v in result.items() if k != "vae"}))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "VAE training config file", lock_config=True)
  flags.DEFINE_string("workdir", "", "output directory (overrides config.workdir)")
  flags.mark_flags_as_required(["config"])
  cli.run(main)
