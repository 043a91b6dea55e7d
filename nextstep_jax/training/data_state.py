"""The data iterator's state in a checkpoint: one JSON file per process (``<step>/data/process_<i>-of-<n>.json``),
read back by the same process, or, when the process count changed, every process's file handed to the
iterator for an elastic re-shard (``data/mixture.py``)."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from nextstep_jax.data import mixture


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


_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _process_identity() -> tuple[int, int]:
  """(index, count) of this process, as the data-state files are named."""
  return jax.process_index(), jax.process_count()


def elastic_data_state(states: list) -> dict | None:
  """The states of all M processes of a step (process order), for a run of another process count:
  ``mixture.elastic_envelope`` of them (what ``TrainIterator.set_state`` re-shards), or None when none holds
  a state. Only dict states can be re-sharded."""
  if all(s is None for s in states):
    return None
  kinds = sorted({type(s).__name__ for s in states if not isinstance(s, Mapping)})
  if kinds:
    raise ValueError(f"the data-iterator states are {kinds}, not dicts: they cannot be re-sharded "
                     "for another number of processes")
  return mixture.elastic_envelope([dict(s) for s in states])


class DataStateHandler(ocp.CheckpointHandler):
  """Writes this process's iterator state as process_<i>-of-<n>.json; reads its own file back, or,
  when the step was written by another number of processes M, all M files
  (``elastic_data_state``): each process reads every process's file (a shared file system)."""

  @staticmethod
  def _file(directory: epath.Path) -> epath.Path:
    index, count = _process_identity()
    return epath.Path(directory) / f"process_{index}-of-{count}.json"

  def save(self, directory: epath.Path, args: "DataStateSave") -> None:
    self._file(directory).write_text(json.dumps(encode_data_state(args.state)))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
    path = self._file(directory)
    if path.exists():   # the same process count: this process's own state, exactly
      return decode_data_state(json.loads(path.read_text()))
    names = sorted(p.name for p in epath.Path(directory).iterdir())
    written: dict[int, set[int]] = {}
    for name in names:
      m = _DATA_FILE.fullmatch(name)
      if m:
        written.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    count = _process_identity()[1]
    if count in written or len(written) != 1:
      raise FileNotFoundError(f"no data-iterator state {path.name} in {directory} (found {names})")
    (saved,) = written
    if written[saved] != set(range(saved)):
      raise FileNotFoundError(f"the data-iterator states of {saved} processes in {directory} are "
                              f"incomplete (found {names})")
    states = [decode_data_state(json.loads((epath.Path(directory) /
                                            f"process_{i}-of-{saved}.json").read_text()))
              for i in range(saved)]
    logging.info("checkpoint: data-iterator states of %d processes read by %d (elastic resume)",
                 saved, count)
    return elastic_data_state(states)

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
