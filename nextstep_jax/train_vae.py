"""Train the image tokenizer, then evaluate it (the library: ``nextstep_jax/training/vae_trainer.py``).

  python -m nextstep_jax.train_vae --config=configs/vae_demo.py [--workdir=DIR] \
      [--config.steps=200 --config.train.noise_aug=False ...]
"""

from __future__ import annotations

import os
import signal

if __name__ == "__main__":
  # Until the run installs its own handler (training/loop.start), a Ctrl-C during start-up (importing
  # jax, parsing flags: nothing is written yet) ends the process at once with status 130. os._exit, not
  # an exception: one raised inside a garbage-collector callback of jax would be swallowed.
  signal.signal(signal.SIGINT, lambda *_: (os.write(2, b"interrupted during start-up\n"), os._exit(130)))

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
