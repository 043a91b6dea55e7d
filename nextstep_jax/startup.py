"""What a training entry point does first, before its heavy imports (stdlib only, so it is in place at once)."""

import os
import signal


def exit_on_interrupt() -> None:
  """Until the run installs its own handler (training/loop.start), a Ctrl-C during start-up (importing jax,
  parsing flags: nothing is written yet) ends the process at once with status 130. os._exit, not an
  exception: one raised inside a garbage-collector callback of jax would be swallowed."""
  signal.signal(signal.SIGINT, lambda *_: (os.write(2, b"interrupted during start-up\n"), os._exit(130)))
