"""Train NextStep-1: ``python -m nextstep_jax.train --config=configs/<stage>.py [--config.x.y=...]``.

The loop reads top to bottom in ``nextstep_jax/training/loop.py``; the step in
``nextstep_jax/training/trainer.py``.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
  from nextstep_jax import startup  # stdlib only: in place before the heavy imports below
  startup.exit_on_interrupt()

import sys
import traceback

import jax
from absl import flags, logging
from ml_collections import config_flags

from nextstep_jax import cli
from nextstep_jax.training import loop


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    loop.train(flags.FLAGS.config, flags.FLAGS.workdir or None)
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise  # cli.run: a user error in one line, anything else with its traceback
    # Multi-process: a normal exit waits at jax.distributed's shutdown barrier for every other
    # process, dead ones included (until the heartbeat timeout). Print the error and leave now.
    if cli.is_user_error(e) and not cli.debug_requested():
      print(f"process {jax.process_index()}: {cli.user_error_message(e)}", file=sys.stderr, flush=True)
      code = cli.EXIT_USER_ERROR
    else:
      traceback.print_exc()
      print(f"process {jax.process_index()}: training failed (see above; when another process died, "
            "this is the collective or barrier that lost it); exiting without waiting for the "
            "other processes", file=sys.stderr, flush=True)
      code = 1
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/<name>.py)",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "", "output directory (default: config.workdir)")
  flags.mark_flags_as_required(["config"])
  cli.run(main)
