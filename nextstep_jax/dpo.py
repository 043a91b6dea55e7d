"""DPO for NextStep-1 (SPEC §7's last stage): Diffusion-DPO applied per image token.

  python -m nextstep_jax.dpo --config=configs/dpo.py [--config.dpo.data=DIR --config.x.y=...]

The loss, the trainer and the loop: ``nextstep_jax/training/dpo.py``; the preference format:
``nextstep_jax/data/preferences.py``.
"""

from __future__ import annotations


if __name__ == "__main__":
  from nextstep_jax import startup  # stdlib only: in place before the heavy imports below
  startup.exit_on_interrupt()

from absl import flags, logging
from ml_collections import config_flags

from nextstep_jax import cli
from nextstep_jax.training import dpo


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  dpo.train_dpo(flags.FLAGS.config, flags.FLAGS.workdir or None)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/dpo.py)", lock_config=True)
  flags.DEFINE_string("workdir", "", "output directory (default: config.workdir)")
  flags.mark_flags_as_required(["config"])
  cli.run(main)
