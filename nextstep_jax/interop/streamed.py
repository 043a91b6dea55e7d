"""A params tree written into an orbax checkpoint a piece at a time, for the import: no process ever holds
the tree, nor a whole leaf; it holds one piece (one layer of a stacked leaf, a band of rows of a
vocabulary-sized one) between reading it from the safetensors files and writing it.

The checkpoint is what orbax's own save of the whole tree writes, file for file (``_METADATA``, the
array metadata store, the sharding file, zarr arrays in OCDBT with orbax's chunking for the leaf's
``SaveArgs``): every reader (training's restore, ``run.load_run``, ``interop.stored``) reads it unchanged.
The leaves are ``StreamedLeaf`` objects; orbax sends them to ``StreamedLeafHandler`` (registered for
that type only), an ``ArrayHandler`` whose ``serialize`` opens each array with the TensorStore spec
orbax's ArrayHandler builds (``build_array_write_spec``) and writes it band by band along the leaf's
chunk grid instead of from a device copy. ``tests/test_streamed_import.py`` holds the files to orbax's
own save of the same tree.

Several processes share the pieces, round-robin over every leaf's bands in tree order: each band is a
whole number of zarr chunks, so no chunk is written by two processes (each writes its own OCDBT
sub-database, merged by orbax when the step is finalised). Process 0 writes each array's zarr metadata,
as orbax does.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

# orbax's own builders of what its ArrayHandler writes (the spec, the array metadata, the sharding
# entry): the streamed files are orbax's by construction, not a copy of its format.
from orbax.checkpoint._src.serialization import jax_array_handlers as _jah  # pylint: disable=g-direct-orbax-import
from orbax.checkpoint._src.serialization import ocdbt_utils as _ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils


class StreamedLeaf:
  """One array of the checkpoint, not held: its global `shape` and `dtype`, `read(index)` giving
  ``leaf[index]`` (a tuple of slices) as numpy, and `axis`, the axis the reader prefers to go along (a
  piece is a band of whole zarr chunks along it: one layer of a stacked leaf, rows of the embedding,
  columns of the lm_head kernel). `sharding` is recorded in the checkpoint's sharding file (what a
  restore without a target would use). `name` names the leaf in errors."""

  def __init__(self, name: str, shape: Sequence[int], dtype: Any, read: Callable[[tuple], np.ndarray],
               axis: int = 0, sharding: Any = None):
    self.name, self.shape, self.dtype = name, tuple(int(s) for s in shape), np.dtype(dtype)
    self.read, self.axis, self.sharding = read, int(axis), sharding
    if self.shape and not 0 <= self.axis < len(self.shape):
      raise ValueError(f"{name}: axis {axis} is not an axis of shape {list(self.shape)}")

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def __repr__(self) -> str:
    return f"StreamedLeaf({self.name}, {list(self.shape)}, {self.dtype})"


def bands(shape: Sequence[int], chunk: Sequence[int], axis: int) -> list[tuple[slice, ...]]:
  """The pieces of an array of `shape` stored in chunks of `chunk`: bands one chunk wide along `axis`,
  whole along every other axis (so each band is a whole number of chunks)."""
  if not shape:
    return [()]
  width = max(1, int(chunk[axis]))
  out = []
  for a in range(0, int(shape[axis]), width):
    out.append(tuple(slice(a, min(a + width, int(shape[axis]))) if d == axis else slice(None)
                     for d in range(len(shape))))
  return out or [tuple(slice(None) for _ in shape)]


class StreamedLeafHandler(ocp.type_handlers.ArrayHandler):
  """orbax's ArrayHandler for ``StreamedLeaf`` values: the same files, written from the leaf's reader a
  band at a time. Restores go through the ordinary ArrayHandler (the checkpoint records jax.Array)."""

  def __init__(self, progress: Callable[[str, int, int], None] | None = None, **kwargs):
    """`progress`: ``(leaf name, leaves done, leaves)`` after this process's pieces of each leaf; the
    rest as ``ArrayHandler``'s."""
    super().__init__(**kwargs)
    self._progress = progress

  def memory_size(self, values: Sequence[StreamedLeaf]) -> list[tuple[int, int]]:
    """(bytes written, bytes read) of each leaf for orbax's accounting: its share of the whole leaf, of which
    it holds one piece at a time."""
    share = 1.0 / jax.process_count()
    return [(int(v.nbytes * share), int(v.nbytes * share)) for v in values]

  async def serialize(self, values: Sequence[StreamedLeaf], infos: Sequence[Any],
                      args: Sequence[Any] | None = None) -> list:
    args = args or [ocp.SaveArgs()] * len(values)
    process, count = jax.process_index(), jax.process_count()
    primary = process == 0
    # One context for every array of this process's OCDBT database, with a small B-tree node cache (orbax's
    # holds up to 100 MB of nodes, which grows with the number of pieces written); nothing is read back.
    context = ts.Context({"file_io_concurrency": {"limit": 128}, "cache_pool#ocdbt": {"total_bytes_limit": 1 << 22}})
    metadatas = []
    turn = 0  # the pieces of every leaf, in order, dealt round-robin to the processes
    for k, (value, info, arg) in enumerate(zip(values, infos, args)):
      if not isinstance(value, StreamedLeaf):
        raise TypeError(f"{info.name}: {type(value).__name__} is not a StreamedLeaf")
      if hasattr(info, "await_path_creation"):  # newer orbax creates the directory asynchronously
        await info.await_path_creation()
      use_ocdbt = bool(info.is_ocdbt_checkpoint)
      # Written as one array (orbax's chunking of the whole leaf for its SaveArgs, whatever the mesh and the
      # process count); each band is whole chunks of it.
      spec = _ts_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=value.shape, local_shape=value.shape, dtype=value.dtype,
          use_ocdbt=use_ocdbt, process_index=_ocdbt_utils.get_process_index_for_subdir(use_ocdbt),
          metadata_key=self._metadata_key)
      tspec = ts.Spec(spec.json)
      if primary:
        await ts.open(tspec, create=True, open=True, context=context)
      store = await ts.open(tspec, open=True, assume_metadata=True, context=context)
      pieces = bands(value.shape, store.chunk_layout.write_chunk.shape, value.axis)
      for i, index in enumerate(pieces):
        if turn % count == process:
          data = np.asarray(value.read(index))
          want = tuple(len(range(*s.indices(n))) for s, n in zip(index, value.shape))
          if data.shape != want:
            raise ValueError(f"{value.name}: piece {i} read with shape {list(data.shape)}, expected {list(want)}")
          await store[index].write(data.astype(value.dtype, copy=False))
          del data
        turn += 1
      metadatas.append(spec.metadata)
      if self._progress is not None:
        self._progress(value.name, k + 1, len(values))
    writes = []
    if self._array_metadata_store is not None:
      writes.append(self._array_metadata_store.write(
          checkpoint_dir=infos[0].parent_dir, array_metadatas=metadatas, process_index=process))
    if self._enable_write_sharding_file:
      writes.append(_jah._async_serialize_shardings(  # pylint: disable=protected-access
          shardings=[v.sharding for v in values], infos=infos, primary_host=self._primary_host))
    await asyncio.gather(*writes)
    return [ocp.future.NoopFuture()]


def save_handler(progress: Callable[[str, int, int], None] | None = None) -> ocp.PyTreeCheckpointHandler:
  """orbax's PyTree handler for a tree of ``StreamedLeaf`` leaves (``checkpoint.Checkpointer``'s
  `state_handler`): ``StreamedLeafHandler`` in a type registry of its own, built with the stores of the
  handler a jax.Array leaf gets (so the global registry, which restores read, is left as it is).
  `progress`: called ``(leaf name, leaves done, leaves)`` as this process finishes its pieces of each leaf."""
  base = ocp.type_handlers.get_type_handler(jax.Array)
  handler = StreamedLeafHandler(
      progress=progress, metadata_key=base._metadata_key, primary_host=base._primary_host,  # pylint: disable=protected-access
      enable_write_sharding_file=base._enable_write_sharding_file,  # pylint: disable=protected-access
      array_metadata_store=base._array_metadata_store)  # pylint: disable=protected-access
  # jax.Array's own entry too: the PyTree handler takes the array metadata store from it.
  registry = ocp.type_handlers.create_type_handler_registry((jax.Array, base), (StreamedLeaf, handler))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
