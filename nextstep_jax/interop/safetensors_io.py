"""Safetensors files and sharded Hugging Face tensor directories, read and written directly.

The format: an 8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}},
then the raw little-endian data. So bfloat16 works without torch (via ml_dtypes), writing streams one
tensor at a time, reading reads one tensor at a time into its own buffer, and a damaged file gets an error that names the file and the
tensor. Nothing is ever unpickled: a directory with only ``pytorch_model.bin`` is refused. Every
floating-point tensor is checked for NaN/Inf as it is read (``check_finite``, chunked ``np.isfinite``
on the tensor as read): a checkpoint that would poison a model is refused naming the file and the
tensor, before the rest of the model is assembled.

A sharded directory holds ``model-0000i-of-0000n.safetensors`` files and ``model.safetensors.index.json``
({"metadata": {"total_size": bytes}, "weight_map": {name: file}}); a single ``model.safetensors`` is
also read. The NextStep-1 / Qwen2.5 names, shapes and config.json are in ``interop/hf.py``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from nextstep_jax.errors import UserError

if sys.byteorder != "little":
  raise ImportError("nextstep_jax.interop.safetensors_io reads and writes safetensors on little-endian hosts only")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3
MAX_HEADER_BYTES = 100 * 1024**2

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_FLOATS = frozenset(_DTYPES[k] for k in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))
_FINITE_CHUNK = 1 << 24  # elements per np.isfinite call: bounds the temporary bool array to 16 MiB


class CheckpointError(UserError):
  """A checkpoint directory or file that cannot be read; the message names the file and key (a user's
  input: the command lines print it on one line and exit with status 2)."""


def non_finite_count(x: np.ndarray) -> int:
  """How many NaN/Inf values `x` holds (0 for integer and bool arrays). Reads the array once, in chunks,
  so a memory-mapped tensor is not copied whole."""
  x = np.asarray(x)
  if x.dtype not in _FLOATS and not np.issubdtype(x.dtype, np.floating):
    return 0
  flat = x.reshape(-1)
  bad = 0
  for i in range(0, flat.size, _FINITE_CHUNK):
    ok = np.isfinite(flat[i:i + _FINITE_CHUNK])
    if not ok.all():
      bad += int(ok.size - np.count_nonzero(ok))
  return bad


def check_finite(path: str, name: str, x: np.ndarray) -> np.ndarray:
  """`x`, or CheckpointError naming the file and the tensor when it holds any NaN/Inf."""
  bad = non_finite_count(x)
  if bad:
    raise CheckpointError(f"{path}: tensor {name} has {bad} non-finite values (NaN/Inf) of {np.size(x)}")
  return x


# ---------------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------------

def _header(entries: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
  """Header bytes (padded to 8) and data offsets for tensors written in the given order."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offsets, pos = {}, 0
  for name, (shape, dtype) in entries.items():
    n = int(math.prod(shape)) * dtype.itemsize
    header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
    offsets[name] = (pos, pos + n)
    pos += n
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)
  return raw, offsets


class RowChunks:
  """A tensor handed to a writer in pieces along its first dim (``chunks`` yields arrays of shape
  (rows, *shape[1:]) in order): the writer never holds it whole."""

  def __init__(self, shape: tuple[int, ...], chunks: Iterable[np.ndarray]):
    self.shape, self.chunks = tuple(shape), chunks


class _StreamWriter:
  """Writes one safetensors file tensor by tensor, in the planned order."""

  def __init__(self, path: str, entries: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
    self.path, self.entries = path, dict(entries)
    self._order = list(self.entries)
    self._next = 0
    raw, _ = _header(self.entries)
    self._f = open(path + ".partial", "wb")
    self._f.write(len(raw).to_bytes(8, "little"))
    self._f.write(raw)

  def write(self, name: str, x: "np.ndarray | RowChunks") -> None:
    want = self._order[self._next]
    shape, dtype = self.entries[want]
    if isinstance(x, RowChunks):
      if name != want or x.shape != tuple(shape):
        raise RuntimeError(f"{self.path}: expected tensor {want} {shape}, got {name} {x.shape}")
      rows = 0
      for part in x.chunks:
        part = np.asarray(part).astype(dtype, copy=False)
        if tuple(part.shape[1:]) != tuple(shape[1:]):
          raise RuntimeError(f"{self.path}: tensor {name}: a chunk of shape {part.shape} for {shape}")
        self._f.write(np.ascontiguousarray(part).tobytes())
        rows += part.shape[0]
      if rows != shape[0]:
        raise RuntimeError(f"{self.path}: tensor {name}: chunks gave {rows} of {shape[0]} rows")
      self._next += 1
      return
    if name != want or tuple(x.shape) != tuple(shape) or x.dtype != dtype:
      raise RuntimeError(f"{self.path}: expected tensor {want} {shape} {dtype}, got {name} {x.shape} {x.dtype}")
    self._f.write(np.ascontiguousarray(x).tobytes())  # little-endian host (checked at import)
    self._next += 1

  def close(self) -> None:
    if self._next != len(self._order):
      raise RuntimeError(f"{self.path}: {len(self._order) - self._next} planned tensors were not written")
    self._f.close()
    os.replace(self.path + ".partial", self.path)


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes one safetensors file (numpy arrays, bfloat16 via ml_dtypes allowed)."""
  arrays = {k: np.asarray(v) for k, v in tensors.items()}
  for k, v in arrays.items():
    if v.dtype not in _CODES:
      raise ValueError(f"tensor {k}: dtype {v.dtype} cannot be stored in safetensors")
  w = _StreamWriter(path, {k: (v.shape, v.dtype) for k, v in arrays.items()})
  for k, v in arrays.items():
    w.write(k, v)
  w.close()


class SafetensorsFile:
  """A safetensors file: ``names()``, ``shape(name)``, ``dtype(name)``, ``get(name)`` (one tensor read into a
  numpy buffer of its own).

  Every structural problem (short file, bad header, unknown dtype, offsets outside the file) raises
  CheckpointError naming the file and, where it applies, the tensor; so does a tensor with NaN/Inf
  values, when ``get`` reads it.
  """

  def __init__(self, path: str):
    self.path = path
    if not os.path.isfile(path):
      raise CheckpointError(f"{path}: file does not exist")
    size = os.path.getsize(path)
    if size < 8:
      raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file of "
                              f"{size} bytes)")
      raw = f.read(n)
    try:
      header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
      raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
      raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + n
    data_size = size - self._data_start
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
      try:
        dtype = _DTYPES[e["dtype"]]
        shape = tuple(int(s) for s in e["shape"])
        begin, end = (int(o) for o in e["data_offsets"])
      except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: tensor {name}: bad header entry {e!r} ({err!r})") from err
      if any(s < 0 for s in shape) or end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise CheckpointError(f"{path}: tensor {name}: {e['dtype']} {list(shape)} does not fit its data "
                              f"offsets [{begin}, {end})")
      if end > data_size:
        raise CheckpointError(f"{path}: truncated file: tensor {name} needs bytes [{begin}, {end}) of the data "
                              f"section, which has {data_size} bytes")
      self._entries[name] = (dtype, shape, begin, end)

  def names(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the tensor's first dim, read alone (and checked for NaN/Inf)."""
    if name not in self._entries:
      raise CheckpointError(f"{self.path}: no tensor {name}")
    dtype, shape, begin, _ = self._entries[name]
    row = math.prod(shape[1:]) * dtype.itemsize
    with open(self.path, "rb") as f:
      f.seek(self._data_start + begin + start * row)
      buf = bytearray((stop - start) * row)
      if f.readinto(buf) != len(buf):
        raise CheckpointError(f"{self.path}: truncated file: rows {start}:{stop} of tensor {name} could not be read")
    return check_finite(self.path, name, np.frombuffer(buf, dtype=dtype).reshape((stop - start,) + tuple(shape[1:])))

  def get(self, name: str, *, finite: bool = True) -> np.ndarray:
    """The tensor, read from the file into its own buffer. finite=True (the default): CheckpointError naming the file
    and the tensor when it holds any NaN/Inf."""
    if name not in self._entries:
      raise CheckpointError(f"{self.path}: no tensor {name}")
    dtype, shape, begin, end = self._entries[name]
    # Read into a buffer of its own (not a view of a memory map): the pages are the caller's and go when
    # the array does, so a reader that streams tensor by tensor holds one tensor, never the file.
    with open(self.path, "rb") as f:
      f.seek(self._data_start + begin)
      buf = bytearray(end - begin)
      if f.readinto(buf) != end - begin:
        raise CheckpointError(f"{self.path}: truncated file: tensor {name} could not be read whole")
    x = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return check_finite(self.path, name, x) if finite else x


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one file (each checked for NaN/Inf)."""
  f = SafetensorsFile(path)
  return {k: f.get(k) for k in f.names()}


class TensorDir:
  """The tensors of a Hugging Face directory: sharded (index.json) or a single ``model.safetensors``."""

  def __init__(self, directory: str):
    self.directory = directory
    if not os.path.isdir(directory):
      raise CheckpointError(f"{directory}: not a directory")
    index = os.path.join(directory, INDEX_FILE)
    single = os.path.join(directory, SINGLE_FILE)
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}
    if os.path.exists(index):
      d = _read_json(index)
      wm = d.get("weight_map") if isinstance(d, dict) else None
      if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: no 'weight_map' object")
      for name, file in wm.items():
        if not isinstance(file, str) or os.path.basename(file) != file:
          raise CheckpointError(f"{index}: weight_map[{name!r}] = {file!r} is not a file name in the directory")
        self._where[name] = file
      for file in sorted(set(self._where.values())):
        self._files[file] = SafetensorsFile(os.path.join(directory, file))
      for name, file in self._where.items():
        if name not in self._files[file]:
          raise CheckpointError(f"{os.path.join(directory, file)}: tensor {name} listed in {INDEX_FILE} is "
                                "missing from the file")
    elif os.path.exists(single):
      f = SafetensorsFile(single)
      self._files[SINGLE_FILE] = f
      self._where = {n: SINGLE_FILE for n in f.names()}
    else:
      pickles = [p for p in os.listdir(directory) if p.endswith((".bin", ".pt", ".pth", ".ckpt"))]
      hint = f" (found {pickles}: PyTorch pickles are never loaded; convert them to safetensors)" if pickles else ""
      raise CheckpointError(f"{directory}: no {INDEX_FILE} or {SINGLE_FILE}{hint}")

  def names(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def file_of(self, name: str) -> str:
    return os.path.join(self.directory, self._where[name])

  def shape(self, name: str) -> tuple[int, ...]:
    return self._files[self._where[name]].shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self._files[self._where[name]].dtype(name)

  def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the tensor's first dim (``SafetensorsFile.get_rows``)."""
    if name not in self._where:
      raise CheckpointError(f"{self.directory}: tensor {name} is missing (not in any safetensors file)")
    return self._files[self._where[name]].get_rows(name, start, stop)

  def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The tensor; CheckpointError naming the file when missing, (given `shape`) misshapen, or holding
    any NaN/Inf."""
    if name not in self._where:
      raise CheckpointError(f"{self.directory}: tensor {name} is missing (not in any safetensors file)")
    f = self._files[self._where[name]]
    if shape is not None and tuple(f.shape(name)) != tuple(shape):
      raise CheckpointError(f"{f.path}: tensor {name} has shape {list(f.shape(name))}, config.json implies "
                            f"{list(shape)}")
    return f.get(name)


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise CheckpointError(f"{path}: file does not exist") from e
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e


# ---------------------------------------------------------------------------------------------
# Sharded writing
# ---------------------------------------------------------------------------------------------

def plan_shards(entries: Mapping[str, tuple[tuple[int, ...], np.dtype]], max_shard_bytes: int
                ) -> list[list[str]]:
  """Groups tensors (in order) into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
  shards: list[list[str]] = [[]]
  size = 0
  for name, (shape, dtype) in entries.items():
    n = int(math.prod(shape)) * dtype.itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  return shards


def save_sharded(out_dir: str, entries: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 write: bool = True) -> dict:
  """Streams (name, array) pairs, in the order of `entries`, into ``model-0000i-of-0000n.safetensors``
  files plus ``model.safetensors.index.json``; one tensor is held at a time. Returns the index.
  write=False consumes `tensors` without writing (the other processes of a multi-process export, whose
  iterators take part in gathering what process 0 writes)."""
  shards = plan_shards(entries, max_shard_bytes)
  n = len(shards)
  files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  weight_map = {name: files[i] for i, shard in enumerate(shards) for name in shard}
  total = sum(int(math.prod(s)) * d.itemsize for s, d in entries.values())
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  it = iter(tensors)
  if not write:
    for _, x in it:
      if isinstance(x, RowChunks):
        for _ in x.chunks:  # the chunks' gathers run on every process
          pass
    return index
  os.makedirs(out_dir, exist_ok=True)
  for i, shard in enumerate(shards):
    w = _StreamWriter(os.path.join(out_dir, files[i]), {k: entries[k] for k in shard})
    for _ in shard:
      name, x = next(it)
      w.write(name, x if isinstance(x, RowChunks) else np.asarray(x).astype(entries[name][1], copy=False))
      del x
    w.close()
  leftover = next(it, None)
  if leftover is not None:
    raise RuntimeError(f"tensor {leftover[0]} was not planned")
  with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2)
  return index
