"""A run's params read from its orbax checkpoint a piece at a time, for the export: each tensor (one layer of a
stacked leaf, a piece of rows of a vocabulary-sized one) is read from the files alone, so the reader never holds
the tree, nor a whole stacked leaf.

The checkpoint stays what training and ``run.load_run`` write and read (orbax PyTree, OCDBT over zarr); the
TensorStore specs come from orbax's own ``type_handlers.get_json_tspec_read``, with the same cast to the
requested dtype as orbax's restore (so a piece read here equals the same piece of a restored array, bit for bit).
A piece costs its own bytes plus the zarr chunks it touches: the import saves one layer a chunk
(``chunked_save_args``); a checkpoint saved with whole-leaf chunks (a one-process training run) costs one
leaf's chunk, decoded, per piece read.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from absl import logging

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from nextstep_jax.interop import names
from nextstep_jax.interop.safetensors_io import CheckpointError
from nextstep_jax.training import checkpoint as ckpt_lib

STATE_DIR = "state"  # the train-state item of a step (``checkpoint.STATE``)
_METADATA_FILE = "_METADATA"


def stacked_paths(cfg) -> set[tuple[str, ...]]:
  """Params paths whose first axis is the layer (backbone layers, head blocks): read and saved a layer at a time."""
  out = {("backbone", "layers", ours) for ours, *_ in names.BACKBONE_LAYER_MAP}
  out |= {("head", ours) for ours in names.HEAD_BLOCK_MAP}
  return out


LM_HEAD_PATH = ("backbone", "lm_head_kernel")  # (hidden, vocab): the official [vocab, hidden] weight transposed


def piece_axis(path: tuple[str, ...]) -> int:
  """The axis a piece-wise reader or writer of the leaf at `path` goes along: the layer of a stacked leaf,
  the vocabulary of the embedding (axis 0) and of the lm_head kernel (axis 1, the official weight's rows);
  0 for the rest (small leaves, read whole). The same paths for every size."""
  return 1 if tuple(path) == LM_HEAD_PATH else 0


def chunked_save_args(params: Mapping, cfg, chunk_bytes: int | None = None) -> dict:
  """orbax ``SaveArgs`` for a params tree whose zarr chunks a piece-wise reader or writer can use alone: a
  stacked leaf split by layer first (``shard_axes=(0,)``), no chunk above `chunk_bytes` (orbax splits a
  leaf's largest axis first: the vocabulary of the embedding and of the lm_head kernel, the axis they are
  read along, ``piece_axis``). Readers of any chunking (training's restore, ``run.load_run``) read it
  unchanged. `chunk_bytes`: ``names.CHUNK_BYTES`` by default."""
  stacked = stacked_paths(cfg)
  chunk_bytes = names.CHUNK_BYTES if chunk_bytes is None else chunk_bytes

  def walk(tree: Mapping, prefix: tuple) -> dict:
    out = {}
    for k, v in tree.items():
      path = prefix + (k,)
      if isinstance(v, Mapping):
        out[k] = walk(v, path)
      else:
        out[k] = ocp.SaveArgs(chunk_byte_size=int(chunk_bytes), shard_axes=(0,) if path in stacked else ())
    return out
  return walk(params, ())


def cache_budget() -> int:
  """Half the host's available memory (``MemAvailable``, else the free physical pages): the most the export's
  chunk cache takes by default."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024 // 2
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 2


class StoredLeaf:
  """One array of a checkpoint, not read: its path, shape and dtype (what ``names.nextstep_to_tensors`` needs
  to plan), read by ``StoredParams.fetch``."""

  def __init__(self, name: str, shape: tuple[int, ...], dtype: np.dtype):
    self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)

  def __repr__(self) -> str:
    return f"StoredLeaf({self.name}, {self.shape}, {self.dtype})"


class StoredParams:
  """The params entry `key` ("params" or "ema") of one checkpoint step, opened for piece-wise reading as `dtype`.

  ``tree`` mirrors `abstract` (the model's abstract params) with ``StoredLeaf`` leaves; ``fetch(leaf, start,
  stop, axis)`` is ``names.host_slice``'s contract (the writers' `fetch`). Every leaf of `abstract` must be
  stored with its shape (CheckpointError naming the step and the leaf otherwise). `max_cache_bytes`: the most
  the chunk cache of a training-chunked checkpoint takes (default ``cache_budget()``); ``cache_bytes`` is what
  it takes."""

  def __init__(self, step_dir: str | os.PathLike, abstract: Mapping, key: str, dtype: Any,
               max_cache_bytes: int | None = None):
    self.step_dir = epath.Path(step_dir)
    state = self.step_dir / STATE_DIR
    meta_path = state / _METADATA_FILE
    try:
      meta = json.loads(meta_path.read_text())
      stored = meta["tree_metadata"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{meta_path}: not an orbax PyTree checkpoint's metadata ({e})") from e
    self._use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(state)
    self._use_zarr3 = bool(meta.get("use_zarr3", False))
    self._state = state
    self._dtype = np.dtype(dtype)
    # Small caches: the data is read once, piece by piece; nothing is kept between reads.
    self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                                "cache_pool#ocdbt": {"total_bytes_limit": 1 << 22},
                                "data_copy_concurrency": {"limit": 1}})
    self._open: dict[str, ts.TensorStore] = {}

    def walk(tree: Mapping, prefix: tuple) -> dict:
      out = {}
      for k, v in tree.items():
        if isinstance(v, Mapping):
          out[k] = walk(v, prefix + (k,))
          continue
        path = (key,) + prefix + (k,)
        if str(path) not in stored:
          raise CheckpointError(f"{self.step_dir}: the checkpoint has no array {'/'.join(path)} (it was not "
                                "written by this model's config)")
        name = ".".join(path)
        store = self._store(name)
        if tuple(store.shape) != tuple(v.shape):
          raise CheckpointError(f"{self.step_dir}: array {'/'.join(path)} is stored with shape "
                                f"{list(store.shape)}, the config implies {list(v.shape)}")
        out[k] = StoredLeaf(name, v.shape, self._dtype)
      return out
    self.tree = walk(abstract, ())
    # A checkpoint whose zarr chunks are larger than the pieces the export reads (a training run's: orbax's
    # default chunk is a device's whole shard, spanning every layer) would decode each chunk once per
    # piece (once per layer: L times the leaf). Such chunks are kept decoded in a cache sized to hold them,
    # so each is read once; the import's checkpoints (chunks of one layer, at most names.CHUNK_BYTES) keep
    # no cache and hold one piece at a time.
    # The cache never takes more than `max_cache_bytes` (default: half the host's available memory): a host
    # too small for them re-reads chunks (slower) instead of running out of memory.
    large = sum(self._chunk_cost(n) for n in self._open)
    budget = cache_budget() if max_cache_bytes is None else int(max_cache_bytes)
    self.cache_bytes = int(min(large, budget))
    if large > self.cache_bytes:
      logging.warning("%s: its zarr chunks span the layers and need a %.2f GB cache to be read once; caching "
                      "%.2f GB (half this host's available memory, or max_cache_bytes): chunks are re-read, the "
                      "export is slower", self.step_dir, large / 1e9, self.cache_bytes / 1e9)
    if large:
      self._context = ts.Context({"cache_pool": {"total_bytes_limit": self.cache_bytes},
                                  "cache_pool#ocdbt": {"total_bytes_limit": 1 << 22},
                                  "data_copy_concurrency": {"limit": 1}})
      self._open = {}

  def _store(self, name: str) -> ts.TensorStore:
    if name not in self._open:
      info = ocp.type_handlers.ParamInfo(name=name, parent_dir=self._state, use_zarr3=self._use_zarr3,
                                         ts_context=self._context)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
      store = ts.open(spec, context=self._context, open=True, read=True).result()
      if np.dtype(store.dtype.numpy_dtype) != self._dtype:  # orbax's restore casts the same way
        spec = {"driver": "cast", "base": spec, "dtype": self._dtype.name}
        store = ts.open(spec, context=self._context, open=True, read=True).result()
      self._open[name] = store
    return self._open[name]

  def _chunk_cost(self, name: str) -> int:
    """The decoded bytes of array `name` when its read chunks exceed ``names.CHUNK_BYTES`` (a piece-wise
    reader would decode each several times), else 0."""
    store = self._open[name]
    base = store.base if hasattr(store, "base") and store.base is not None else store
    chunk = [int(c) for c in base.chunk_layout.read_chunk.shape]
    itemsize = np.dtype(base.dtype.numpy_dtype).itemsize
    if int(np.prod(chunk)) * itemsize <= names.CHUNK_BYTES:
      return 0
    return int(np.prod(base.shape)) * itemsize

  def fetch(self, leaf: Any, start: int | None = None, stop: int | None = None, axis: int = 0) -> np.ndarray:
    """`leaf` (whole, or leaf[start:stop] along `axis`) read from the checkpoint as a numpy array."""
    if not isinstance(leaf, StoredLeaf):
      return names.host_slice(leaf, start, stop, axis)
    store = self._store(leaf.name)
    if start is not None:
      store = store[(slice(None),) * axis + (slice(start, stop),)]
    try:
      return np.asarray(store.read().result())
    except Exception as e:  # pylint: disable=broad-except  # tensorstore's errors: name the step and the array
      raise CheckpointError(f"{self.step_dir}: cannot read array {leaf.name} ({ckpt_lib._first_line(e)})") from e  # pylint: disable=protected-access


def open_params(path: str | os.PathLike, abstract: Mapping, key: str, dtype: Any,
                what: str = "checkpoint", max_cache_bytes: int | None = None) -> tuple[int, StoredParams]:
  """(step, StoredParams) of a checkpoint directory's newest step that passes its integrity check and holds
  every leaf of `abstract` (newer ones that fail are named in a warning, as ``checkpoint.restore_params_step``
  does; nothing is moved), or of one step's directory (which must pass). `what` names `path` in messages;
  `max_cache_bytes` bounds the chunk cache (``StoredParams``)."""
  root = ckpt_lib.absolute(path)
  if not root.is_dir():
    raise FileNotFoundError(f"{what}: {str(path)!r} does not exist")
  if root.name.isdigit() and (root / STATE_DIR).is_dir():
    reason = ckpt_lib.check_integrity(root)
    if reason is not None:
      raise ckpt_lib.CorruptCheckpointError(f"{what}: step {root.name} in {root.parent} is corrupt: {reason}")
    return int(root.name), StoredParams(root, abstract, key, dtype, max_cache_bytes)
  manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    steps = sorted(manager.all_steps(), reverse=True)
  finally:
    manager.close()
  if not steps:
    raise FileNotFoundError(f"{what}: {root} holds no finished checkpoint")
  failed: list[tuple[int, str]] = []
  for i, step in enumerate(steps):
    reason = ckpt_lib.check_integrity(root / str(step))
    if reason is None:
      try:
        stored = StoredParams(root / str(step), abstract, key, dtype, max_cache_bytes)
      except (CheckpointError, ValueError, OSError) as e:
        reason = f"it cannot be read ({ckpt_lib._first_line(e)})"  # pylint: disable=protected-access
    if reason is None:
      if failed:
        logging.warning("checkpoint: reading step %d of %s, not the newest step %d (%s)", step, root, steps[0],
                        "; ".join(f"step {s}: {r}" for s, r in failed))
      return step, stored
    failed.append((step, reason))
    nxt = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older step left"
    logging.warning("checkpoint: step %d in %s is unusable: %s; %s", step, root, reason, nxt)
  raise ckpt_lib.CorruptCheckpointError(f"{what}: no step of {root} can be read:\n  " +
                                        "\n  ".join(f"step {s}: {r}" for s, r in failed))
