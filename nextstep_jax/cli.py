"""How the command lines end: a user's mistake is answered with ``error: <message>`` on stderr and exit
status 2, never with a traceback; anything else (a bug) keeps its traceback.

Every entry point ends with ``cli.run(main)`` (absl flags) or ``cli.run(main, absl_flags=False)`` (its own
argparse parser; ``ArgumentParser`` below turns argparse's errors into user errors). User errors are
``config.UserError`` (``ConfigError`` is one), ``FileNotFoundError``,
``IsADirectoryError``, ``NotADirectoryError``, ``PermissionError`` and the errors of flag parsing: an
unknown flag, a value of the wrong type, a missing required flag, a ``--config`` file that does not exist,
an unknown ``--config.x.y`` key (named with the closest valid keys, ``overrides.unknown_key_message``).
``--debug`` or ``NEXTSTEP_DEBUG=1`` shows the full traceback of user errors instead.

This is a library module: entry points import it, it imports no entry point.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags
from ml_collections.config_flags import config_flags as ml_config_flags  # ConfigFileFlagParser

from nextstep_jax import config as config_lib

from nextstep_jax import overrides as overrides_lib

EXIT_USER_ERROR = 2
DEBUG_ENV = "NEXTSTEP_DEBUG"
UserError = config_lib.UserError
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, IsADirectoryError,
                                                NotADirectoryError, PermissionError)
_TRACEBACK = "Traceback (most recent call last)"


def debug_requested(argv: Sequence[str] | None = None) -> bool:
  """True when the full traceback is wanted: ``--debug`` (``--debug=true``) or ``NEXTSTEP_DEBUG=1``."""
  if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes"):
    return True
  for a in (sys.argv[1:] if argv is None else argv):
    if a == "--":
      break
    if a in ("--debug", "-debug") or a.lower() in ("--debug=true", "--debug=1"):
      return True
  return False


def is_user_error(e: BaseException) -> bool:
  return isinstance(e, USER_ERRORS)


def user_error_message(e: BaseException) -> str:
  """``error: <message>``: the exception's text, without the traceback text some libraries embed."""
  msg = str(e).strip()
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    msg = f"{e.filename}: {e.strerror}"  # "[Errno 2] No such file or directory: 'x'" -> "x: No such ..."
  if _TRACEBACK in msg:  # e.g. ml_collections' "Error whilst parsing config file: <traceback>"
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    msg = lines[0].rstrip(": ") + ": " + lines[-1].strip()
  return "error: " + (msg or type(e).__name__)


def report(e: BaseException) -> None:
  sys.stdout.flush()
  print(user_error_message(e), file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# absl flags: their parsing errors as user errors
# ------------------------------------------------------------------------------------------------

def _config_file_flags(flag_values) -> list[str]:
  """Names of the ml_collections ``DEFINE_config_file`` flags defined."""
  return [n for n in flag_values
          if isinstance(getattr(flag_values[n], "parser", None), ml_config_flags.ConfigFileFlagParser)]


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value given to --name on the command line (--name=V or --name V), the last one; None if absent."""
  value = None
  for i, a in enumerate(argv):
    m = re.match(rf"^--?{re.escape(name)}(=(.*))?$", a)
    if m:
      value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _overrides(argv: Sequence[str], name: str) -> list[str]:
  """The dotted keys of the --name.x.y=V (or --noname.x.y) overrides on the command line."""
  out = []
  for a in argv:
    m = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", a)
    if m:
      out.append(m.group(1))
  return out


def _check_config_files(argv: Sequence[str], flag_values) -> None:
  for name in _config_file_flags(flag_values):
    value = _flag_value(argv, name)
    if value is None:
      continue
    path = value.split(":", 1)[0]
    if not path:
      raise UserError(f"--{name}= is empty: give a config file (configs/<name>.py)")
    if os.path.isdir(path):
      raise UserError(f"--{name}={value}: {path} is a directory, not a config file (configs/<name>.py)")
    if not os.path.isfile(path):
      raise UserError(f"--{name}={value}: no such config file (relative paths are read from the current "
                      f"directory, {os.getcwd()})")


def _diagnose_config_overrides(argv: Sequence[str], flag_values) -> UserError | None:
  """After a config flag failed to parse: the override the config lacks, named with its closest keys."""
  for name in _config_file_flags(flag_values):
    keys = _overrides(argv, name)
    if not keys:
      continue
    value = _flag_value(argv, name)
    if value is None:
      return UserError(f"--{name}.{keys[0]} overrides a config, but no --{name}=FILE was given")
    try:
      config = flag_values[name].parser.parse(value)
    except Exception:  # pylint: disable=broad-except  # the original error is the one to show
      return None
    for key in keys:
      base = re.sub(r"\[[^\]]*\]", "", key)  # config_path's a.b[0] indexing
      if not config_lib.has_dotted(config, base):
        return UserError(f"--{name}.{key}: " + overrides_lib.unknown_key_message(config, base))
  return None


def parse_flags(argv: Sequence[str], flag_values=flags.FLAGS) -> list[str]:
  """absl's flag parsing (``app.run``'s `flags_parser`) with its errors raised as UserError."""
  argv = list(argv)
  _check_config_files(argv[1:], flag_values)
  try:
    return flag_values(argv)
  except flags.Error as e:
    raise UserError(user_error_message(e)[len("error: "):] + " (--helpshort lists the flags)") from e
  except Exception as e:  # pylint: disable=broad-except  # ml_collections raises bare Key/AttributeErrors
    diagnosed = _diagnose_config_overrides(argv[1:], flag_values)
    if diagnosed is None:
      raise
    raise diagnosed from e


def _define_debug_flag(flag_values) -> None:
  if "debug" not in flag_values:
    flags.DEFINE_bool("debug", False, f"show the full traceback of a user error (or set {DEBUG_ENV}=1)",
                      flag_values=flag_values, module_name=sys.argv[0])  # listed by --helpshort


# ------------------------------------------------------------------------------------------------
# argparse: its errors as user errors
# ------------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
  """argparse whose parsing errors (an unknown or missing flag, a bad value or choice) raise
  UserError, answered by ``run`` in one line with status 2 instead of argparse's usage block."""

  def error(self, message: str) -> NoReturn:
    raise UserError(f"{message} (--help lists the flags)")


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------

def run(main: Callable, *, argv: Sequence[str] | None = None, absl_flags: bool = True) -> NoReturn:
  """Runs an entry point's `main` and exits: status 2 with ``error: <message>`` for a user error
  (the traceback too with ``--debug`` / ``NEXTSTEP_DEBUG=1``), the traceback for any other exception.

  `absl_flags`: `main(argv)` runs under ``absl.app.run`` with ``parse_flags``; otherwise `main` receives
  the arguments after the program name (its own argparse parser, which should accept ``--debug``)."""
  argv = list(sys.argv if argv is None else argv)
  debug = debug_requested(argv[1:])
  try:
    if absl_flags:
      _define_debug_flag(flags.FLAGS)

      def main_(args):
        try:
          return main(args)
        except app.UsageError as e:  # absl would print the whole module help
          raise UserError(str(e)) from e

      app.run(main_, argv=argv, flags_parser=parse_flags)
    else:
      main(argv[1:])
  except USER_ERRORS as e:
    if debug:
      raise
    report(e)
    sys.exit(EXIT_USER_ERROR)
  sys.exit(0)
