"""One writer per work directory: a lock file, and the refusal to overwrite a run with another model.

``acquire(workdir)`` creates ``<workdir>/.nextstep.lock`` (atomically: ``O_CREAT | O_EXCL``) holding
the writer's host, pid, start time and a heartbeat timestamp that a daemon thread refreshes every
``NEXTSTEP_LOCK_HEARTBEAT_S`` seconds (30). A second writer of the same work directory is refused
before it writes anything (``WorkdirLockedError``, a ``config.ConfigError``: a user error, printed
without a traceback), naming the holder. A stale lock is recovered with a warning naming the
previous holder: its pid is dead on this host (or was reused by another process), or its heartbeat
is older than ``NEXTSTEP_LOCK_STALE_S`` seconds (300; the only test for a holder on another host).
Only process 0 of a job takes the lock (its other processes write into the same directory under it).
``release()`` removes the file when it is still ours; train, DPO and the VAE trainer release it in a
``finally`` (normal end, exception, SIGTERM / SIGINT) and at interpreter exit. URLs (``gs://...``)
are not locked (a note is logged): object stores have no exclusive create.

``refuse_architecture_change(workdir, config, fields)``: when the work directory already holds
checkpoint steps and a saved config (``checkpoints/config.json``) whose architecture fields differ
from `config`'s, raises ``ArchitectureChangedError`` listing them ("model.num_layers: 4 (saved) vs
2 (now)"); called before anything is written, so the run is left byte for byte as it was.

Mechanics are stdlib only (os, socket, json, time, threading).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from nextstep_jax.config import ConfigError, get_dotted, has_dotted

LOCK_FILE = ".nextstep.lock"
STALE_ENV = "NEXTSTEP_LOCK_STALE_S"
HEARTBEAT_ENV = "NEXTSTEP_LOCK_HEARTBEAT_S"
DEFAULT_STALE_S = 300.0
DEFAULT_HEARTBEAT_S = 30.0
# A lock file that exists but does not parse is being written (O_EXCL create, then write): it is
# waited for this long, then treated as stale.
_PARTIAL_GRACE_S = 10.0
# Tokens of the locks this process holds now (a lock file naming this pid but none of these was
# left behind by this process: stale).
_HELD: set[str] = set()


class WorkdirLockedError(ConfigError):
  """Another live run writes into this work directory."""


class ArchitectureChangedError(ConfigError):
  """The config's architecture differs from the one the work directory's checkpoints were saved with."""


def _env_seconds(name: str, default: float) -> float:
  raw = os.environ.get(name, "")
  if not raw:
    return default
  try:
    value = float(raw)
  except ValueError:
    raise ConfigError(f"{name}={raw!r} must be a number of seconds") from None
  if value <= 0:
    raise ConfigError(f"{name}={raw!r} must be > 0")
  return value


def stale_after_s() -> float:
  """Heartbeat age past which a lock is stale (``NEXTSTEP_LOCK_STALE_S``, default 300 s)."""
  return _env_seconds(STALE_ENV, DEFAULT_STALE_S)


def heartbeat_every_s() -> float:
  """Seconds between heartbeats (``NEXTSTEP_LOCK_HEARTBEAT_S``, default 30 s, at most a third of
  the stale timeout)."""
  return min(_env_seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S), stale_after_s() / 3)


def is_url(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def lock_path(workdir: str | os.PathLike) -> str:
  return os.path.join(os.fspath(workdir), LOCK_FILE)


# ------------------------------------------------------------------------------------------------
# Who holds it
# ------------------------------------------------------------------------------------------------

def _pid_namespace() -> str:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return ""


def _pid_start(pid: int) -> str:
  """The start time of `pid` in clock ticks since boot (Linux; "" elsewhere): tells a reused pid."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      stat = f.read()
    return stat[stat.rindex(")") + 2:].split()[19]
  except (OSError, ValueError, IndexError):
    return ""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  except OSError:
    return True
  return True


def _me(token: str, started: float) -> dict[str, Any]:
  pid = os.getpid()
  return {"host": socket.gethostname(), "pid": pid, "pid_ns": _pid_namespace(),
          "pid_start": _pid_start(pid), "started": started, "heartbeat": time.time(),
          "token": token, "command": " ".join(sys.argv)[:300]}


def _when(t: Any) -> str:
  try:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))
  except (TypeError, ValueError, OverflowError):
    return "?"


def describe(info: Mapping[str, Any]) -> str:
  """'host H, pid P (started ..., heartbeat N s ago)' of a lock's holder."""
  age = time.time() - float(info.get("heartbeat", 0) or 0)
  return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')} (started "
          f"{_when(info.get('started'))}, last heartbeat {max(age, 0):.0f} s ago)")


def stale_reason(info: Mapping[str, Any], stale_s: float | None = None) -> str | None:
  """Why the lock `info` no longer protects a live run (a phrase), or None while its holder lives."""
  stale_s = stale_after_s() if stale_s is None else stale_s
  try:
    age = time.time() - float(info["heartbeat"])
    pid = int(info["pid"])
  except (KeyError, TypeError, ValueError):
    return "the lock file is unreadable"
  same_host = (info.get("host") == socket.gethostname()
               and (not info.get("pid_ns") or not _pid_namespace() or info.get("pid_ns") == _pid_namespace()))
  if same_host:
    if pid == os.getpid():
      if info.get("token") not in _HELD:
        return "this process left it behind"
    elif not _pid_alive(pid):
      return f"process {pid} is gone"
    elif info.get("pid_start") and _pid_start(pid) and info.get("pid_start") != _pid_start(pid):
      return f"pid {pid} now belongs to another process"
  if age > stale_s:
    return f"its heartbeat is {age:.0f} s old (> {STALE_ENV}={stale_s:g})"
  return None


def read_lock(path: str) -> dict[str, Any] | None:
  """The lock file's content; None when it does not exist; {} when it does not parse."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    return None
  except OSError:
    return {}
  try:
    info = json.loads(text)
  except ValueError:
    return {}
  return info if isinstance(info, dict) else {}


# ------------------------------------------------------------------------------------------------
# The lock
# ------------------------------------------------------------------------------------------------

class WorkdirLock:
  """The lock of one work directory, held by this process (see the module docstring)."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.path = lock_path(self.workdir)
    self.token = secrets.token_hex(8)
    self.started = time.time()
    self.held = False
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._mutex = threading.Lock()

  # Taking it -----------------------------------------------------------------------------------

  def acquire(self, heartbeat: bool = True) -> "WorkdirLock":
    """Takes the lock or raises WorkdirLockedError naming the holder; recovers stale locks."""
    deadline = time.monotonic() + _PARTIAL_GRACE_S
    while True:
      if self._create():
        break
      info = read_lock(self.path)
      if info is None:  # released meanwhile
        continue
      if not info and time.monotonic() < deadline and self._age() < _PARTIAL_GRACE_S:
        time.sleep(0.1)  # being written by its creator
        continue
      why = stale_reason(info)
      if why is None:
        raise WorkdirLockedError(
            f"work directory {self.workdir} is in use by another run: {describe(info)}.\n"
            f"Wait for it to end or stop it, or use another --workdir; if that run is gone, delete "
            f"{self.path}.")
      self._break(info, why)
    self.held = True
    _HELD.add(self.token)
    atexit.register(self.release)
    if heartbeat:
      self._thread = threading.Thread(target=self._beat, args=(heartbeat_every_s(),),
                                      name="nextstep-workdir-lock", daemon=True)
      self._thread.start()
    return self

  def _age(self) -> float:
    try:
      return time.time() - os.stat(self.path).st_mtime
    except OSError:
      return 0.0

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(_me(self.token, self.started), f)
      f.flush()
      os.fsync(f.fileno())
    return True

  def _break(self, info: Mapping[str, Any], why: str) -> None:
    """Removes a stale lock. Under a second exclusive file, so that of two writers recovering the
    same stale lock at once, the slower cannot remove the lock the faster has just created."""
    guard = self.path + ".break"
    try:
      fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:  # a recovery that died midway leaves its guard: old guards are removed
        if time.time() - os.stat(guard).st_mtime > _PARTIAL_GRACE_S:
          os.remove(guard)
      except OSError:
        pass
      time.sleep(0.1)
      return
    try:
      os.close(fd)
      now = read_lock(self.path)
      if now is not None and now.get("token") == info.get("token") and dict(now) == dict(info):
        logging.warning("workdir lock: recovering the stale lock of %s (previous holder %s: %s)",
                        self.workdir, describe(info) if info else "unknown", why)
        os.remove(self.path)
    finally:
      try:
        os.remove(guard)
      except OSError:
        pass

  # Holding it ----------------------------------------------------------------------------------

  def _beat(self, every: float) -> None:
    while not self._stop.wait(every):
      try:
        self.refresh()
      except Exception as e:  # pylint: disable=broad-except  # never kill the run over a heartbeat
        logging.warning("workdir lock: heartbeat of %s failed: %s", self.path, e)

  def refresh(self) -> bool:
    """Writes a new heartbeat (atomically: aside, then os.replace) while the lock is still ours;
    False once another writer has taken it over."""
    with self._mutex:
      if not self.held:
        return False
      info = read_lock(self.path)
      if not info or info.get("token") != self.token:
        logging.warning("workdir lock: %s is no longer this run's (now %s); stopping the heartbeat",
                        self.path, describe(info) if info else "missing")
        self._stop.set()
        return False
      info = dict(info, heartbeat=time.time())
      tmp = f"{self.path}.{os.getpid()}.tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f)
      os.replace(tmp, self.path)
      return True

  def release(self) -> None:
    """Removes the lock file when it is still ours; idempotent."""
    self._stop.set()
    thread = self._thread
    if thread is not None and thread is not threading.current_thread():
      thread.join(timeout=5)
    with self._mutex:
      if not self.held:
        return
      self.held = False
      _HELD.discard(self.token)
      info = read_lock(self.path)
      if info and info.get("token") == self.token:
        try:
          os.remove(self.path)
        except OSError as e:
          logging.warning("workdir lock: could not remove %s: %s", self.path, e)
    try:
      atexit.unregister(self.release)
    except Exception:  # pylint: disable=broad-except
      pass

  def abandon(self) -> None:
    """Removes the lock file at once, without waiting for the heartbeat thread or taking any lock
    (for a process about to ``os._exit``, e.g. from a signal handler)."""
    self._stop.set()
    if self.held:
      self.held = False
      info = read_lock(self.path)
      if info and info.get("token") == self.token:
        try:
          os.remove(self.path)
        except OSError:
          pass

  def __enter__(self) -> "WorkdirLock":
    return self if self.held else self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def acquire(workdir: str | os.PathLike, process_index: int = 0,
            heartbeat: bool = True) -> WorkdirLock | None:
  """The lock of `workdir` for this job (process 0 takes it; other processes get None, as do URLs).
  Raises WorkdirLockedError when another live run holds it."""
  if process_index != 0:
    return None
  if is_url(workdir):
    logging.warning("workdir lock: %s is not a local path; it is not locked against a second "
                    "writer", workdir)
    return None
  return WorkdirLock(workdir).acquire(heartbeat=heartbeat)


# ------------------------------------------------------------------------------------------------
# The saved config's architecture
# ------------------------------------------------------------------------------------------------

def architecture_diff(saved: Mapping[str, Any], now: Mapping[str, Any], fields: Iterable[str]) -> list[str]:
  """'field: saved (saved) vs now (now)' for each of `fields` (dotted) whose JSON values differ;
  fields one of the two lacks are not compared."""
  out = []
  for field in fields:
    has_a, has_b = has_dotted(saved, field), has_dotted(now, field)
    a = get_dotted(saved, field) if has_a else None
    b = get_dotted(now, field) if has_b else None
    if has_a and has_b and json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
      out.append(f"{field}: {json.dumps(a)} (saved) vs {json.dumps(b)} (now)")
  return out


def checkpoint_steps(ckpt_dir: str) -> list[int]:
  """The finished steps in a checkpoint directory (numeric directory names)."""
  try:
    names = os.listdir(ckpt_dir)
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def refuse_architecture_change(workdir: str | os.PathLike, config_json: Mapping[str, Any],
                               fields: Iterable[str], saved_files: Iterable[str] = ("checkpoints/config.json",),
                               ckpt_dir: str = "checkpoints") -> None:
  """Raises ArchitectureChangedError when `workdir` holds checkpoint steps whose saved config (the
  first of `saved_files` that exists, relative to `workdir`) differs from `config_json` in any of
  `fields`; reads only. URLs are not checked."""
  workdir = os.fspath(workdir)
  if is_url(workdir):
    return
  steps = checkpoint_steps(os.path.join(workdir, ckpt_dir))
  if not steps:
    return
  for rel in saved_files:
    path = os.path.join(workdir, rel)
    if os.path.isfile(path):
      break
  else:
    return
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    logging.warning("%s is unreadable (%s): the architecture is not compared with it", path, e)
    return
  if not isinstance(saved, Mapping):
    return
  diff = architecture_diff(saved, config_json, fields)
  if diff:
    raise ArchitectureChangedError(
        f"work directory {workdir} holds checkpoint steps {steps[-3:]} of another architecture "
        f"(saved in {path}):\n  " + "\n  ".join(diff) +
        "\nResuming would not fit them; nothing was written. Use a new --workdir for this config "
        "(or checkpoint.init_from to start from that run's parameters).")
