"""Distil a trained run's flow-matching head into a few-step head (the backbone frozen; the library:
``nextstep_jax/training/head_distill.py``).

  python -m nextstep_jax.distill --config=configs/head_distill_demo.py [--config.teacher=W \
      --config.evaluations=4 --config.out=DIR]

Writes DIR (default W/heads/k<K>) with ``head.safetensors`` and ``head.json``; sample with
``python -m nextstep_jax.sample --workdir=W --head=DIR`` and judge with ``python -m nextstep_jax.evaluate
--workdir=W --head=DIR``.
"""

from __future__ import annotations


if __name__ == "__main__":
  from nextstep_jax import startup  # stdlib only: in place before the heavy imports below
  startup.exit_on_interrupt()

from absl import flags, logging
from ml_collections import config_flags

from nextstep_jax import cli
from nextstep_jax.training import head_distill


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  head_distill.distill_head(flags.FLAGS.config)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "head distillation config file (configs/head_distill_demo.py)",
                                  lock_config=True)
  flags.mark_flags_as_required(["config"])
  cli.run(main)
