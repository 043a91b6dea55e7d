"""Checkpoints: a thin layer over orbax's CheckpointManager.

One checkpoint per saved step, under ``<directory>/<step>/``, with three items:
  state   the train-state pytree (params, optimizer state, step...), arrays restored straight
          into the shardings of the abstract target, so nothing is gathered on one host;
  data    the data-iterator state, one JSON file per process (each process reads its own
          shard of the data, so each has its own iterator state); dicts are stored as JSON,
          bytes (grain's DataLoader iterator) as base64;
  config  the experiment config as JSON, for provenance (also at ``<directory>/config.json``).
Saves are asynchronous (the device->host copy happens in ``save``; writing continues in the
background) and the newest ``keep`` checkpoints are kept. Preemption: ``should_save`` is also
true at a preemption sync point, so a run that saves when it says so stops cleanly.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

STATE, DATA, CONFIG = "state", "data", "config"


# ------------------------------------------------------------------------------------------
# Data-iterator state: one JSON file per process
# ------------------------------------------------------------------------------------------


def encode_data_state(data_state: dict | bytes | None) -> dict:
  """JSON-ready envelope for an iterator state: a dict, bytes (as base64) or None."""
  if data_state is None:
    return {"format": "none"}
  if isinstance(data_state, (bytes, bytearray)):
    return {"format": "bytes", "value": base64.b64encode(bytes(data_state)).decode("ascii")}
  if isinstance(data_state, Mapping):
    return {"format": "dict", "value": dict(data_state)}
  raise TypeError(f"data_state must be a dict, bytes or None, got {type(data_state).__name__}")


def decode_data_state(envelope: Mapping[str, Any]) -> dict | bytes | None:
  """Inverse of ``encode_data_state``."""
  fmt = envelope.get("format")
  if fmt == "none":
    return None
  if fmt == "bytes":
    return base64.b64decode(envelope["value"])
  if fmt == "dict":
    return envelope["value"]
  raise ValueError(f"unknown data-state format {fmt!r}")


class DataStateHandler(ocp.CheckpointHandler):
  """Writes/reads this process's iterator state as process_<i>-of-<n>.json."""

  @staticmethod
  def _file(directory: epath.Path) -> epath.Path:
    return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "DataStateSave") -> None:
    self._file(directory).write_text(json.dumps(encode_data_state(args.state)))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
    path = self._file(directory)
    if not path.exists():
      present = sorted(p.name for p in epath.Path(directory).iterdir())
      raise FileNotFoundError(f"no data-iterator state {path.name} in {directory} (found "
                              f"{present}): was it saved with another number of processes?")
    return decode_data_state(json.loads(path.read_text()))

  def metadata(self, directory: epath.Path) -> None:
    return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: dict | bytes | None


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def config_to_json(config: Any) -> dict:
  """A JSON-safe dict of a ConfigDict or mapping (tuples become lists, odd values strings)."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


# ------------------------------------------------------------------------------------------
# The manager
# ------------------------------------------------------------------------------------------


def _step_of(path: epath.Path) -> int | None:
  return int(path.name) if path.name.isdigit() else None


class Checkpointer:
  """Saves and restores train states (plus data-iterator state and config) in `directory`.

  Usage in a train loop::

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=1000, keep=3, config=config)
    if ckpt.latest_step() is not None:
      state, data_state = ckpt.restore(ckpt.latest_step(), abstract_state_with_shardings)
    ...
    ckpt.save(step, state, data_state=iterator.get_state())   # saves when should_save(step)
    ...
    ckpt.save(last_step, state, data_state, force=True); ckpt.close()
  """

  def __init__(self, directory: str | os.PathLike, *, every: int, keep: int,
               async_save: bool = True, config: Any = None):
    if every < 1 or keep < 1:
      raise ValueError(f"checkpoint.every={every} and checkpoint.keep={keep} must be >= 1")
    self.directory = epath.Path(directory)
    self.every = int(every)
    self._config_json = config_to_json(config) if config is not None else None
    options = ocp.CheckpointManagerOptions(
      max_to_keep=int(keep), save_interval_steps=1, create=True,
      enable_async_checkpointing=bool(async_save))
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    if self._config_json is not None and jax.process_index() == 0:
      (self.directory / "config.json").write_text(json.dumps(self._config_json, indent=2))

  @classmethod
  def from_config(cls, config: Any, directory: str | os.PathLike | None = None) -> "Checkpointer":
    """From ``config.checkpoint``; the directory defaults to ``<workdir>/checkpoints``."""
    c = config.checkpoint
    directory = directory or os.path.join(config.workdir, "checkpoints")
    return cls(directory, every=c.every, keep=c.keep, async_save=c.async_save, config=config)

  # Queries --------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """Newest finished checkpoint step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True when the job is being preempted and every process has reached `step`."""
    return self._manager.reached_preemption(step)

  def should_save(self, step: int) -> bool:
    """Every `every` steps, and at a preemption sync point."""
    return step % self.every == 0 or self.reached_preemption(step)

  # Save / restore -------------------------------------------------------------------------

  def save(self, step: int, state: Any, data_state: dict | bytes | None = None,
           force: bool = False) -> bool:
    """Saves `state` (any pytree of jax.Arrays) and the iterator state when due or forced.

    Returns True when a save started. A step that is already saved is never saved twice.
    The arrays are copied to host before returning, so the caller may donate them next.
    """
    if step in self._manager.all_steps():
      return False
    if not (force or self.should_save(step)):
      return False
    items = {STATE: ocp.args.StandardSave(state), DATA: DataStateSave(data_state)}
    if self._config_json is not None:
      items[CONFIG] = ocp.args.JsonSave(self._config_json)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return bool(saved)

  def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict | bytes | None]:
    """(state, data_state) of `step` (None = latest).

    `abstract_state` has the saved state's tree structure with jax.ShapeDtypeStruct leaves
    carrying the target shardings (``parallel.with_shardings``); arrays land there directly.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"steps: {self.all_steps()}")
    out = self._manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract_state), DATA: DataStateRestore()}))
    return out[STATE], out[DATA]

  def restore_params_from(self, path: str | os.PathLike, abstract_params: Any,
                          key: str = "params") -> Any:
    """See the module function ``restore_params_from``."""
    return restore_params_from(path, abstract_params, key=key)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def restore_params_from(path: str | os.PathLike, abstract_params: Any, key: str = "params") -> Any:
  """Only the parameters of another run's checkpoint (``checkpoint.init_from``).

  `path` is a checkpoint directory (its newest step is used) or one step's directory
  (``.../checkpoints/20000``). The saved state must be a mapping whose `key` entry holds
  parameters with the structure of `abstract_params` (ShapeDtypeStructs with shardings; the
  dtype there wins, so fp32 masters can be read as bf16 and the reverse). The optimizer state
  and step counter of the source are not read: the new run starts them fresh.
  """
  root = epath.Path(path)
  if not root.exists():
    raise FileNotFoundError(f"checkpoint.init_from={str(path)!r} does not exist")
  steps = [s for s in (_step_of(p) for p in root.iterdir() if p.is_dir()) if s is not None]
  if (root / STATE).exists() and _step_of(root) is not None:
    root, step = root.parent, _step_of(root)
  elif steps:
    step = None
  else:
    raise FileNotFoundError(f"checkpoint.init_from={str(path)!r} holds no checkpoint steps")
  manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    if step is None:
      step = manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"checkpoint.init_from={str(path)!r} holds no finished checkpoint")
    target = {key: abstract_params}
    out = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)}))
  finally:
    manager.close()
  logging.info("checkpoint: params from %s step %d", root, step)
  return out[STATE][key]
