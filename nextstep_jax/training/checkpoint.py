"""Checkpoints: a thin layer over orbax's CheckpointManager, hardened against faults.

One checkpoint per saved step, under ``<directory>/<step>/``, with three items:
  state   the train-state pytree (params, optimizer state, step...), arrays restored straight
          into the shardings of the abstract target, so nothing is gathered on one host;
  data    the data-iterator state, one JSON file per process (each process reads its own
          shard of the data, so each has its own iterator state); dicts are stored as JSON,
          bytes (grain's DataLoader iterator) as base64. With the same process count each
          process restores its own file; with another, every process reads all files and the
          iterator re-shards them (elastic resume, ``elastic_data_state``);
  config  the experiment config as JSON, for provenance (also at ``<directory>/config.json``,
          written by ``write_config`` once the run's restore or init succeeded).
Saves are asynchronous (the device->host copy happens in ``save``; writing continues in the
background) and the newest ``keep`` checkpoints are kept. Preemption: ``should_save`` is also
true at a preemption sync point, so a run that saves when it says so stops cleanly.

Faults:
  * A save is atomic: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it when every
    process has finished, so a writer killed mid-save leaves no step behind (the leftover is
    reported at start-up and replaced when that step is saved again).
  * Every step carries ``integrity.json``: the size and CRC-32 of each of its files, written by
    process 0 after all writes and before the rename (so it is part of the atomic step).
    ``verify(step)`` checks a step against it: truncated, missing or altered files are found
    before orbax reads anything (orbax alone reports truncated or missing files, but reads
    flipped bits back as wrong numbers).
  * ``restore_latest_good`` tries steps newest first; a step that fails its check or cannot be
    read is named in a warning with the reason, and the next older one is tried. When an older
    step restores, the unreadable newer ones are moved aside to ``<step>.corrupt`` (never
    deleted, never written over), so the resumed run saves those steps afresh. When no step
    can be read, nothing is moved and the error lists every step and its reason (a changed
    config, not corruption, is the likely cause then).
  * Nothing here unpickles: arrays are tensorstore/zarr, metadata and iterator states JSON.

A remote work directory (``storage.RemoteWorkdir``, the `replica`): the manager writes its local
mirror as it writes any directory; each step, once committed, is uploaded by process 0 in a
background thread (its files, then its marker), started at the first step boundary with no save in
flight; a save waits for that upload first (so retention never deletes a step being uploaded), and
``wait`` / ``close`` finish it. The remote keeps the steps the local retention keeps.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nextstep_jax import storage
from nextstep_jax.training.data_state import DataStateRestore, DataStateSave

STATE, DATA, CONFIG = "state", "data", "config"
CONFIG_FILE = "config.json"
INTEGRITY_FILE = "integrity.json"
INTEGRITY_MODES = ("auto", "crc32", "size", "off")
# "auto" checksums steps up to this many bytes and records only sizes above (reading back a
# multi-hundred-GB checkpoint on process 0 after every save would cost more than it is worth).
AUTO_CRC_LIMIT_BYTES = 4 << 30
# Files orbax itself rewrites after our manifest is written (step metadata, commit markers).
_UNLISTED = frozenset({INTEGRITY_FILE, "_CHECKPOINT_METADATA", "commit_success.txt"})
QUARANTINE_SUFFIX = ".corrupt"
ORBAX_TMP_MARK = ".orbax-checkpoint-tmp"


class _ReadOnlyNotices(logging.Filter):
  """Drops orbax's warnings that a manager opened read-only is read-only (three per load, on every
  sampling, evaluation and init_from); all its other messages pass."""

  PREFIXES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.PREFIXES)


logging.getLogger("absl").addFilter(_ReadOnlyNotices())


class CorruptCheckpointError(RuntimeError):
  """A checkpoint step that does not match its integrity manifest, or no readable step at all."""


def config_to_json(config: Any) -> dict:
  """A JSON-safe dict of a ConfigDict or mapping (tuples become lists, odd values strings)."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


# ------------------------------------------------------------------------------------------
# Integrity manifests
# ------------------------------------------------------------------------------------------


def _files_under(root: epath.Path) -> Iterator[tuple[str, epath.Path]]:
  """(path relative to `root` with '/' separators, path) of every file below `root`."""
  for dirpath, _, filenames in root.walk():
    for name in filenames:
      path = epath.Path(dirpath) / name
      yield path.relative_to(root).as_posix(), path


def _crc32(path: epath.Path, chunk: int = 1 << 20) -> int:
  crc = 0
  with path.open("rb") as f:
    while block := f.read(chunk):
      crc = zlib.crc32(block, crc)
  return crc


def write_integrity(step_dir: str | os.PathLike, mode: str = "auto") -> dict:
  """Lists every file of a checkpoint step directory in ``<step_dir>/integrity.json``.

  ``mode``: "crc32" records size and CRC-32, "size" only sizes, "auto" is crc32 up to
  ``AUTO_CRC_LIMIT_BYTES`` in total and size above. Written through a temporary file and a
  rename, so a reader never sees half a manifest. Returns the manifest.
  """
  if mode not in INTEGRITY_MODES or mode == "off":
    raise ValueError(f"integrity mode {mode!r} must be one of {INTEGRITY_MODES[:-1]}")
  root = epath.Path(step_dir)
  files = {rel: {"size": int(path.stat().length)} for rel, path in _files_under(root)
           if path.name not in _UNLISTED and not path.name.startswith(INTEGRITY_FILE)}
  if mode == "auto":
    mode = "crc32" if sum(f["size"] for f in files.values()) <= AUTO_CRC_LIMIT_BYTES else "size"
  if mode == "crc32":
    for rel, entry in files.items():
      entry["crc32"] = _crc32(root / rel)
  manifest = {"version": 1, "mode": mode, "files": files}
  tmp = root / (INTEGRITY_FILE + ".partial")
  tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
  tmp.replace(root / INTEGRITY_FILE)
  return manifest


def check_integrity(step_dir: str | os.PathLike, checksums: bool = True) -> str | None:
  """Why the step directory does not match its ``integrity.json`` (a sentence), or None.

  A step without a manifest (written before manifests existed, or whose writer was killed
  between orbax's rename and the manifest in synchronous mode) passes: orbax's own reads are
  then the only check. `checksums=False` compares sizes only.
  """
  root = epath.Path(step_dir)
  if not root.is_dir():
    return f"{root} is not a directory"
  path = root / INTEGRITY_FILE
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text())
    files = manifest["files"]
    if not isinstance(files, dict):
      raise TypeError(f"'files' is a {type(files).__name__}")
  except (ValueError, KeyError, TypeError) as e:
    return f"its {INTEGRITY_FILE} is unreadable ({e})"
  for rel, entry in sorted(files.items()):
    file = root / rel
    if not file.exists():
      return f"{rel} is missing"
    size = int(file.stat().length)
    if size != entry.get("size"):
      return f"{rel} has {size} bytes, {entry.get('size')} were written (truncated or overwritten)"
    if checksums and "crc32" in entry and _crc32(file) != entry["crc32"]:
      return f"{rel} does not match the CRC-32 recorded when it was written (altered on disk)"
  return None


def _agree(ok: bool) -> bool:
  """True when `ok` holds on every process (an all-gather; no-op for a single process)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  flags = multihost_utils.process_allgather(np.asarray(int(ok), np.int32))
  return bool(np.all(np.asarray(flags)))


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip().splitlines()
  line = text[0] if text else ""
  return f"{type(e).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"


# ------------------------------------------------------------------------------------------
# The manager
# ------------------------------------------------------------------------------------------


def _step_of(path: epath.Path) -> int | None:
  return int(path.name) if path.name.isdigit() else None


def absolute(path: str | os.PathLike) -> epath.Path:
  """`path` as an absolute path (orbax refuses relative ones); URLs such as gs://... stay as they are."""
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


class Checkpointer:
  """Saves and restores train states (plus data-iterator state and config) in `directory`.

  Usage in a train loop::

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=1000, keep=3, config=config)
    restored = ckpt.restore_latest_good(abstract_state_with_shardings)
    if restored is not None:
      step, state, data_state = restored
    ...
    ckpt.write_config()                                        # once restore or init succeeded
    ckpt.save(step, state, data_state=iterator.get_state())   # saves when should_save(step)
    ...
    ckpt.save(last_step, state, data_state, force=True); ckpt.close()

  `integrity`: what each step's ``integrity.json`` records ("auto", "crc32", "size") or "off"
  (no manifest). Restores check whatever the manifest holds.
  `replica`: a ``storage.RemoteWorkdir`` whose mirror holds `directory`; committed steps are
  uploaded to it (module docstring). None: nothing leaves `directory`.
  `state_handler`: an orbax PyTree handler that saves the state item (``save``), e.g. the import's
  ``streamed.save_handler``; None: orbax's standard handler.
  """

  def __init__(self, directory: str | os.PathLike, *, every: int, keep: int,
               async_save: bool = True, config: Any = None, integrity: str = "auto",
               replica: Any = None, state_handler: Any = None):
    if every < 1 or keep < 1:
      raise ValueError(f"checkpoint.every={every} and checkpoint.keep={keep} must be >= 1")
    if integrity not in INTEGRITY_MODES:
      raise ValueError(f"checkpoint.integrity={integrity!r} must be one of {INTEGRITY_MODES}")
    self.directory = absolute(directory)
    self.every = int(every)
    self.integrity = integrity
    self._async = bool(async_save)
    self._pending_step: int | None = None
    self._config_json = config_to_json(config) if config is not None else None
    self._config_written = False
    self._report_unfinished()
    async_options = None
    if self._async and integrity != "off":
      async_options = ocp.AsyncOptions(post_finalization_callback=self._seal_pending)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=int(keep), save_interval_steps=1, create=True,
      enable_async_checkpointing=self._async, async_options=async_options)
    self._state_handler = state_handler
    registry = None
    if state_handler is not None:  # saves of the state item go to it (the other items as usual)
      registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
      registry.add(STATE, ocp.args.PyTreeSave, state_handler)
    self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
    self._replica = replica if jax.process_index() == 0 else None
    self._upload: threading.Thread | None = None
    self._upload_error: BaseException | None = None
    # The newest step the remote holds complete; newer committed local steps are uploaded.
    self._published = -1
    if self._replica is not None:
      self._published = max(self._replica.complete_steps(), default=-1)

  def write_config(self) -> None:
    """Writes the config to ``<directory>/config.json`` (process 0; aside, then renamed over the old
    one, so a reader never sees half a file). Called once the run's restore or init has succeeded
    (``loop.restore_or_init``, the VAE trainer), never before: a run refused at start-up leaves the
    saved config as it was. ``save`` calls it before the first step it writes, for callers that
    did not."""
    self._config_written = True
    if self._config_json is None or jax.process_index() != 0:
      return
    path = self.directory / CONFIG_FILE
    tmp = self.directory / (CONFIG_FILE + ".partial")
    tmp.write_text(json.dumps(self._config_json, indent=2))
    tmp.replace(path)

  @classmethod
  def from_config(cls, config: Any, directory: str | os.PathLike | None = None,
                  replica: Any = None) -> "Checkpointer":
    """From ``config.checkpoint``; the directory defaults to ``<workdir>/checkpoints``."""
    c = config.checkpoint
    directory = directory or os.path.join(config.workdir, "checkpoints")
    return cls(directory, every=c.every, keep=c.keep, async_save=c.async_save, config=config,
               integrity=c.integrity, replica=replica)

  def _report_unfinished(self) -> None:
    """Warns about saves that never finished (a writer killed mid-save) and steps moved aside."""
    if jax.process_index() != 0 or not self.directory.exists():
      return
    names = [p.name for p in self.directory.iterdir()]
    unfinished = sorted(n for n in names if ORBAX_TMP_MARK in n)
    if unfinished:
      logging.warning("checkpoint: %s holds unfinished save(s) %s (the writer stopped mid-save); "
                      "they are not checkpoints and are ignored; a save of the same step replaces "
                      "them", self.directory, unfinished)
    moved = sorted(n for n in names if QUARANTINE_SUFFIX in n)
    if moved:
      logging.warning("checkpoint: %s holds step(s) moved aside as unreadable: %s (kept for "
                      "inspection; delete them when no longer needed)", self.directory, moved)

  # Queries --------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """Newest finished checkpoint step, or None. (Finished is not the same as readable: use
    ``restore_latest_good`` to resume.)"""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> epath.Path:
    """The directory of a finished step."""
    return self.directory / str(int(step))

  def verify(self, step: int, checksums: bool = True) -> str | None:
    """Why `step` does not match its integrity manifest (a sentence), or None."""
    return check_integrity(self.step_dir(step), checksums=checksums)

  def reached_preemption(self, step: int) -> bool:
    """True when the job is being preempted and every process has reached `step`."""
    return self._manager.reached_preemption(step)

  def should_save(self, step: int) -> bool:
    """Every `every` steps, and at a preemption sync point. (With a replica, also where a committed
    step's upload starts, once no save is in flight.)"""
    if self._replica is not None and not self._saving():
      self._publish_committed()
    return step % self.every == 0 or self.reached_preemption(step)

  # Upload to the replica ------------------------------------------------------------------

  def _saving(self) -> bool:
    """True while an asynchronous save is in flight."""
    return bool(self._manager.is_saving_in_progress())

  def _unpublished(self) -> list[int]:
    return [s for s in sorted(self._manager.all_steps())
            if s > self._published and self.step_dir(s).is_dir()]

  def _upload_steps(self, steps: list[int]) -> None:
    for step in steps:
      self._replica.publish(step)
      self._published = max(self._published, step)
    self._replica.retain(self._manager.all_steps())

  def _join_upload(self, final: bool = False) -> None:
    """Waits for the upload in flight; its failure is a warning (retried at the next step boundary),
    or raised when `final`."""
    if self._upload is not None:
      self._upload.join()
      self._upload = None
    err, self._upload_error = self._upload_error, None
    if err is not None:
      if final:
        raise err
      logging.warning("checkpoint: uploading to %s failed, retried at the next step: %s",
                      self._replica.url, _first_line(err))

  def _publish_committed(self, block: bool = False, final: bool = False) -> None:
    """Starts uploading the committed steps the remote lacks (no save may be in flight); `block`:
    uploads them now, in this thread."""
    if self._upload is not None and self._upload.is_alive() and not block:
      return
    self._join_upload(final)
    todo = self._unpublished()
    if not todo:
      return
    if block:
      self._upload_steps(todo)
      return

    def work() -> None:
      try:
        self._upload_steps(todo)
      except BaseException as e:  # pylint: disable=broad-except  # reported by _join_upload
        self._upload_error = e

    self._upload = threading.Thread(target=work, name="nextstep-checkpoint-upload", daemon=True)
    self._upload.start()

  def _flush_replica(self) -> None:
    """After every save finished: every committed step uploaded, errors raised."""
    if self._replica is not None:
      self._publish_committed(block=True, final=True)  # joins the upload in flight first

  # Save -----------------------------------------------------------------------------------

  def save(self, step: int, state: Any, data_state: dict | bytes | None = None,
           force: bool = False, save_args: Any = None) -> bool:
    """Saves `state` (any pytree of jax.Arrays) and the iterator state when due or forced.

    Returns True when a save started. A step that is already saved is never saved twice.
    The arrays are copied to host before returning, so the caller may donate them next.
    `save_args`: orbax ``SaveArgs`` per leaf of `state` (None: orbax's defaults), e.g. the import's
    chunking; any chunking reads back the same. With a `state_handler` (the constructor's), `state` is saved
    by it (its leaves may be of any type its registry knows, e.g. the import's ``streamed.StreamedLeaf``).
    """
    if step in self._manager.all_steps():
      return False
    if not (force or self.should_save(step)):
      return False
    if not self._config_written:
      self.write_config()
    save = ocp.args.PyTreeSave if self._state_handler is not None else ocp.args.StandardSave
    items = {STATE: save(state, save_args=save_args), DATA: DataStateSave(data_state)}
    if self._config_json is not None:
      items[CONFIG] = ocp.args.JsonSave(self._config_json)
    # One save in flight at a time (orbax waits too): the finalize callback reads _pending_step.
    self._manager.wait_until_finished()
    if self._replica is not None:  # the committed steps uploaded before retention may delete one
      self._publish_committed(block=True)  # joins the upload in flight first
    self._pending_step = int(step)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
      if not self._async and self.integrity != "off" and jax.process_index() == 0:
        self._write_integrity(self.step_dir(step), step)
      if not self._async and self._replica is not None:
        self._publish_committed()
    return bool(saved)

  def _seal_pending(self) -> None:
    """orbax's post-finalization callback (process 0, after every process has written, before
    the rename that publishes the step): writes the pending step's integrity manifest."""
    step = self._pending_step
    if step is None:
      return
    try:
      tmp = [p for p in self.directory.iterdir()
             if p.name.startswith(f"{step}.") and ORBAX_TMP_MARK in p.name]
      target = tmp[0] if len(tmp) == 1 else self.step_dir(step)
      if len(tmp) > 1 or not target.is_dir():
        logging.warning("checkpoint: cannot tell where step %d is being written (%s); it gets no "
                        "integrity manifest", step, [p.name for p in tmp])
        return
    except OSError as e:
      logging.warning("checkpoint: step %d gets no integrity manifest: %s", step, e)
      return
    self._write_integrity(target, step)

  def _write_integrity(self, step_dir: epath.Path, step: int) -> None:
    try:
      write_integrity(step_dir, self.integrity)
    except OSError as e:  # never fail a save over its manifest
      logging.warning("checkpoint: could not write the integrity manifest of step %d: %s", step, e)

  # Restore --------------------------------------------------------------------------------

  def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict | bytes | None]:
    """(state, data_state) of `step`; None = the newest readable step (``restore_latest_good``).

    `abstract_state` has the saved state's tree structure with jax.ShapeDtypeStruct leaves
    carrying the target shardings (``parallel.with_shardings``); arrays land there directly.
    None restores with the saved shapes, dtypes and shardings (for inspection).
    Raises CorruptCheckpointError when an explicit step fails its integrity check.
    """
    if step is None:
      restored = self.restore_latest_good(abstract_state)
      if restored is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      return restored[1], restored[2]
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"steps: {self.all_steps()}")
    reason = self.verify(step)
    if reason is not None:
      raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: {reason}")
    return self._read(step, abstract_state)

  def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict | bytes | None]:
    state_args = (ocp.args.StandardRestore(abstract_state) if abstract_state is not None
                  else ocp.args.StandardRestore())
    out = self._manager.restore(step, args=ocp.args.Composite(**{
      STATE: state_args, DATA: DataStateRestore()}))
    return out[STATE], out[DATA]

  def restore_latest_good(self, abstract_state: Any) -> tuple[int, Any, dict | bytes | None] | None:
    """(step, state, data_state) of the newest step that passes its integrity check and reads
    back; None when there is no checkpoint at all.

    Each step that fails is named in a warning with the reason, then the next older one is
    tried. Once one restores, the failed newer steps are moved aside to ``<step>.corrupt``
    (kept, never deleted) so that saving those steps again writes fresh copies. If every step
    fails, nothing is moved and CorruptCheckpointError lists each step and why.
    All processes agree on each step (a step unreadable on one process is skipped by all).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    failed: list[tuple[int, str]] = []
    for i, step in enumerate(steps):
      reason = self.verify(step) if jax.process_index() == 0 else None
      if not _agree(reason is None) and reason is None:
        reason = "failed its integrity check on process 0"
      out = None
      if reason is None:
        try:
          out = self._read(step, abstract_state)
        except Exception as e:  # pylint: disable=broad-except  # any reader error: unreadable
          reason = f"it cannot be read ({_first_line(e)})"
        if not _agree(reason is None) and reason is None:
          reason, out = "it cannot be read on another process", None
      if reason is None:
        if failed:
          moved = self._quarantine([s for s, _ in failed])
          logging.warning("checkpoint: resuming from step %d, not the newest step %d; moved the "
                          "unreadable step(s) aside: %s (kept for inspection, never deleted)",
                          step, steps[0], ", ".join(moved))
        return step, out[0], out[1]
      failed.append((step, reason))
      nxt = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older step left"
      logging.warning("checkpoint: step %d in %s is unusable: %s; %s", step, self.directory,
                      reason, nxt)
    raise CorruptCheckpointError(
      f"no checkpoint in {self.directory} can be restored:\n  " +
      "\n  ".join(f"step {s}: {r}" for s, r in failed) +
      "\nNothing was moved or deleted. When every step fails the same way, the config (model "
      "shapes, dtypes, optimizer) probably differs from the one that wrote them.")

  def _quarantine(self, steps: list[int]) -> list[str]:
    """Renames unreadable step directories to ``<step>.corrupt[.<n>]`` (process 0), then all
    processes reload the step list. Returns 'old -> new' descriptions."""
    moved = []
    for step in steps:
      src = self.step_dir(step)
      dst = self.directory / f"{step}{QUARANTINE_SUFFIX}"
      n = 1
      while dst.exists():
        dst = self.directory / f"{step}{QUARANTINE_SUFFIX}.{n}"
        n += 1
      moved.append(f"{src.name} -> {dst.name}")
      if jax.process_index() == 0:
        src.rename(dst)
    # A step saved again after being moved aside is uploaded again.
    self._published = min(self._published, min(steps) - 1)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("nextstep_checkpoint_quarantine")
    self._manager.reload()
    return moved

  def restore_params_from(self, path: str | os.PathLike, abstract_params: Any,
                          key: str = "params") -> Any:
    """See the module function ``restore_params_from``."""
    return restore_params_from(path, abstract_params, key=key)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written (and, with a replica, uploaded)."""
    self._manager.wait_until_finished()
    self._flush_replica()

  def close(self) -> None:
    self._manager.wait_until_finished()
    try:
      self._flush_replica()
    finally:
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()



def restore_params_from(path: str | os.PathLike, abstract_params: Any, key: str = "params") -> Any:
  """Only the parameters of another run's checkpoint (``checkpoint.init_from``); see
  ``restore_params_step``, which also says which step was read."""
  return restore_params_step(path, abstract_params, key=key)[1]


def restore_params_step(path: str | os.PathLike, abstract_params: Any, key: str = "params",
                        what: str = "checkpoint.init_from") -> tuple[int, Any]:
  """(step, params) of another run's checkpoint, read only.

  `path` is a checkpoint directory, a run's work directory (its ``checkpoints/``) or one step's directory
  (``.../checkpoints/20000``). A
  directory gives its newest step that passes its integrity check and reads back: each newer step
  that fails is named in a warning with the reason (as training's resume does, but nothing is
  moved: readers never change a run). An explicit step that fails raises CorruptCheckpointError.
  The saved state must be a mapping whose `key` entry holds parameters with the structure of
  `abstract_params` (ShapeDtypeStructs with shardings; the dtype there wins, so fp32 masters can
  be read as bf16 and the reverse). The optimizer state and step counter are not read.
  `what` names the path in messages (a config field or a flag). A URL (gs://, s3://, ...) is read
  from the local copy of one step, its newest complete one or the step it names
  (``storage.local_checkpoint``); messages still name the URL.
  """
  shown = str(path)
  if storage.is_remote(shown):
    path = storage.local_checkpoint(shown, what)
  root = absolute(path)
  if not root.exists():
    raise FileNotFoundError(f"{what}={shown!r} does not exist")
  steps = [s for s in (_step_of(p) for p in root.iterdir() if p.is_dir()) if s is not None]
  if not steps and (root / "checkpoints").is_dir():  # a run's work directory: its checkpoints
    root = root / "checkpoints"
    steps = [s for s in (_step_of(p) for p in root.iterdir() if p.is_dir()) if s is not None]
  explicit = (root / STATE).exists() and _step_of(root) is not None
  if explicit:
    root, steps = root.parent, [_step_of(root)]
  elif not steps:
    raise FileNotFoundError(f"{what}={shown!r} holds no checkpoint steps")
  target = {key: abstract_params}
  manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True))
  failed: list[tuple[int, str]] = []
  try:
    if not explicit:
      steps = sorted(manager.all_steps(), reverse=True)
      if not steps:
        raise FileNotFoundError(f"{what}={shown!r} holds no finished checkpoint")
    for i, step in enumerate(steps):
      reason = check_integrity(root / str(step))
      if reason is not None and explicit:
        raise CorruptCheckpointError(f"{what}={shown!r}: step {step} is corrupt: {reason}")
      if reason is None:
        try:
          out = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)}))
        except Exception as e:  # pylint: disable=broad-except  # any reader error: unreadable
          if explicit:
            raise
          reason = f"it cannot be read ({_first_line(e)})"
      if reason is None:
        if failed:
          logging.warning("checkpoint: reading step %d of %s, not the newest step %d (%s)", step, root,
                          steps[0], "; ".join(f"step {s}: {r}" for s, r in failed))
        logging.info("checkpoint: params from %s step %d", root, step)
        return step, out[STATE][key]
      failed.append((step, reason))
      nxt = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older step left"
      logging.warning("checkpoint: step %d in %s is unusable: %s; %s", step, root, reason, nxt)
  finally:
    manager.close()
  raise CorruptCheckpointError(f"{what}={shown!r}: no step can be read:\n  " +
                               "\n  ".join(f"step {s}: {r}" for s, r in failed))


def read_step(directory: str | os.PathLike, step: int | None = None
              ) -> tuple[int, Any, dict | bytes | None]:
  """(step, state, data_state) of one step (newest when None) of a checkpoint directory, read
  only, with the saved shapes, dtypes and shardings, after its integrity check (for tools and
  tests that compare runs)."""
  root = absolute(directory)
  if not root.is_dir():
    raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
  manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step() if step is None else int(step)
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint{'' if step is None else f' for step {step}'} in "
                              f"{directory}; steps: {sorted(manager.all_steps())}")
    reason = check_integrity(root / str(step))
    if reason is not None:
      raise CorruptCheckpointError(f"checkpoint step {step} in {directory} is corrupt: {reason}")
    out = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(), DATA: DataStateRestore()}))
  finally:
    manager.close()
  return step, out[STATE], out[DATA]
