"""The user-error type, apart from everything so that any module can raise it (``config`` re-exports it)."""


class UserError(ValueError):
  """A mistake of the user's (a flag, a config field, a file): the command lines print its message on
  one or two lines and exit with status 2, without a traceback (``nextstep_jax/cli.py``)."""
