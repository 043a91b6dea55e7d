"""Inputs on disk -> records of the ArrayRecord datasets of ``data/sources.py`` (schema there).

Each input format is read as numbered work units of items (``Input``):
  ImageFolder   a folder tree of images, each with its caption in ``<same name>.txt`` (pair)
  JsonlRecords  a jsonl of records of one kind: pair {"image", "caption"}, edit {"source" (path
                or [paths]), "instruction", "target"}, interleaved {"segments": [{"text"} |
                {"image"}, ...]}, text {"text"}; image paths relative to `image_root` (default the
                jsonl's folder)
  CsvIndex      a csv with a header, one image path and caption per row (pair)
  WebDataset    one tar shard (one unit): members grouped by key, plain (``key.jpg`` +
                ``key.txt`` or ``key.json``) or in the official NextStep layout (``key.json``
                whose caption places ``<image_n>``, plus ``key-{n}.jpg``/``.png``), for any kind
  TfdsDataset   a prepared TFDS dataset read through ``tfds.data_source`` (ArrayRecord, no
                tensorflow): an image feature and a caption (text or class label), or a text feature
A unit is a fixed run of ``shard_size`` items (a whole tar for WebDataset), built in order, so a
unit always gives the same records; ``data/prepare.py`` writes one shard per unit, which is what
makes its resume and its split over processes exact. ``open_inputs`` picks the format of a list of
paths (several paths: their units one after another).

Every image is decoded, converted to RGB, checked (empty, truncated, too large) and resized into
an aspect bucket of the stage's area range; an image below the smallest area is resized up into a
bucket (``ConvertOptions.small="upscale"``, the default) or skipped as too small ("drop"). A bad
input is skipped and counted (``skipped/<reason>``, the first FIRST_NAMES by name: the file, or
``index.jsonl:LINE (file)``, ``shard.tar:KEY``, ``tfds:NAME/SPLIT[i]``); conversions are counted
as ``converted/<what>``; nothing raises for a bad record.

Latents (``ConvertOptions.latents``, a ``LatentEncoder``: the VAE enters as a plain batch function,
since ``data/`` imports no model): every fitted image is also encoded into patch tokens, in fixed
batches of one bucket shape (``LatentBatcher``; the last batch of a shape padded, so a jitted
encoder compiles once per shape), and the records come out in input order with their latents; the
stored values' sums per token dimension (``LatentSums``) give the per-channel statistics.

``build_records`` turns items into records (with their latents); the ``convert_*`` functions write
one kind from one input in a single process (one shard per split, ``sources.write_records``) and
return the counters.
"""

from __future__ import annotations

import bisect
import collections
import csv
import dataclasses
import glob
import itertools
import json
import math
import os
import re
import shutil
import tarfile
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from nextstep_jax.data.sources import (DEFAULT_MAX_PIXELS, KINDS, BadRecord, decode_text,
                                       encode_image, prepare_image, write_records)
from nextstep_jax.errors import UserError


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_KEYS = ("image", "file_name", "path")           # jsonl / csv fields of a pair's image path
CAPTION_KEYS = ("caption", "text", "txt", "prompt")  # ... and of its caption
FORMATS = ("folder", "jsonl", "csv", "webdataset", "tfds")
FORMAT_KINDS = {"folder": ("pair",), "csv": ("pair",), "jsonl": KINDS, "webdataset": KINDS,
                "tfds": ("pair", "text")}
FIRST_NAMES = 5       # offending items named per skip reason
PIXELS = "_pixels"    # a record's fitted images, awaiting their latents (LatentBatcher)
_PLACEHOLDER = re.compile(r"<image_(\d+)>")
_NUMBERED = re.compile(r"(.+)-(\d+)")   # the official layout's image n of a sample: key-{n}


LATENT_DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class LatentEncoder:
  """How converters compute latents. `encode`: uint8 (B, H, W, 3) images of one shape, B ==
  `batch_size` -> float (B, H/unit, W/unit, d) patch tokens (e.g. a jitted VAE encoder on the
  devices). `patch_size`: the token's latent patch side p (d = channels * p * p, channel-major),
  for the per-channel statistics. `identity`: what names the encoder in a prepare's plan (a resume
  with another one is refused); `dtype`: how the tokens are stored (sources.py)."""
  encode: Callable[[np.ndarray], np.ndarray]
  batch_size: int
  patch_size: int = 1
  identity: dict = dataclasses.field(default_factory=dict)
  dtype: str = "float16"

  def __post_init__(self):
    if self.batch_size < 1 or self.patch_size < 1:
      raise ValueError(f"batch_size ({self.batch_size}) and patch_size ({self.patch_size}) must be "
                       "positive")
    if self.dtype not in LATENT_DTYPES:
      raise ValueError(f"latent dtype must be one of {LATENT_DTYPES}, got {self.dtype!r}")

  def plan(self) -> dict:
    """What a prepare's plan records of the encoder."""
    return dict(identity=self.identity, batch_size=self.batch_size, patch_size=self.patch_size,
                dtype=self.dtype)


@dataclasses.dataclass
class ConvertOptions:
  """How converters fit images: token unit in px (vae_factor * patch_size), the stage's base grid
  sides (area_sides(min_tokens, max_tokens)), what happens to images below the smallest area
  ("upscale" or "drop"), the storage format, and optional latents (``LatentEncoder``)."""
  unit: int = 16
  sides: tuple[int, ...] = (16,)
  max_pixels: int = DEFAULT_MAX_PIXELS
  min_area_ratio: float = 0.9
  small: str = "upscale"
  image_format: str = "jpeg"
  quality: int = 95
  latents: LatentEncoder | None = None


# An image of a record: (encoded bytes, its file name), or a function that reads them (so a
# record's texts are checked before its files are read).
ImageRef = Any


@dataclasses.dataclass(frozen=True)
class Item:
  """One input item: its name in a summary, and how to build its record (raises BadRecord)."""
  name: str
  make: Callable[[], dict]


class NoRecords(UserError):
  """A conversion that kept no record at all (the message names the counts)."""


def describe_skips(counters: dict, first: dict[str, list[str]] | None = None) -> str:
  """'too_small 20 (a.png, b.png), decode_error 1 (c.png)' from skipped/<reason> counters."""
  parts = []
  for key, n in sorted(counters.items(), key=lambda kv: (-kv[1], kv[0])):
    if key.startswith("skipped/"):
      reason = key[len("skipped/"):]
      names = (first or {}).get(reason, [])
      parts.append(f"{reason} {n}" + (f" ({', '.join(names)})" if names else ""))
  return ", ".join(parts) or "none"


class Converter:
  """Shared image and text handling of the inputs, with the counters and the first offending
  item names per skip reason."""

  def __init__(self, options: ConvertOptions | None):
    self.opt = options or ConvertOptions()
    self.counters: collections.Counter = collections.Counter()
    self.first: dict[str, list[str]] = {}

  def build(self, item: Item) -> dict | None:
    """The item's record, or None when it is skipped (counted with its name)."""
    try:
      record = item.make()
    except BadRecord as e:
      self.counters[f"skipped/{e.reason}"] += 1
      names = self.first.setdefault(e.reason, [])
      if len(names) < FIRST_NAMES:
        names.append(item.name if e.file in ("", item.name) else f"{item.name} ({e.file})")
      return None
    self.counters["written"] += 1
    return record

  def image(self, data: bytes, file: str, grid=None) -> tuple[bytes, np.ndarray]:
    notes: list[str] = []
    try:
      arr = prepare_image(data, self.opt.sides, self.opt.unit, notes, self.opt.max_pixels,
                          self.opt.min_area_ratio, grid, self.opt.small)
    except BadRecord as e:
      e.file = e.file or file
      raise
    for n in notes:
      self.counters[f"converted/{n}"] += 1
    return encode_image(arr, self.opt.image_format, self.opt.quality), arr

  def text(self, value, field: str) -> str:
    notes: list[str] = []
    out = decode_text(value, field, notes)
    for n in notes:
      self.counters[f"converted/{n}"] += 1
    return out

  def document(self, layout: str, texts: list[str], images: Sequence[ImageRef],
               same_shape: bool = False) -> dict:
    """A record of `layout` from decoded texts and images (module doc of ImageRef)."""
    blobs, arrays = [], []
    for ref in images:
      data, file = ref() if callable(ref) else ref
      grid = None
      if same_shape and arrays:
        grid = (arrays[0].shape[0] // self.opt.unit, arrays[0].shape[1] // self.opt.unit)
      blob, arr = self.image(data, file, grid)
      blobs.append(blob)
      arrays.append(arr)
    record = dict(layout=layout, texts=texts, images=blobs, latents=[],
                  latent_shapes=np.zeros((0, 3), np.int32))
    if self.opt.latents is not None:
      record[PIXELS] = arrays   # encoded by a LatentBatcher, which removes them
    return record

  # The kinds. Texts are checked before any image is read or decoded.
  def pair(self, caption, image: ImageRef) -> dict:
    return self.document("TI", [self.text(caption, "caption")], [image])

  def edit(self, instruction, sources: list[ImageRef], target: ImageRef) -> dict:
    """Every image is fitted to the first source's bucket."""
    text = self.text(instruction, "instruction")
    return self.document("I" * len(sources) + "TI", [text], sources + [target], same_shape=True)

  def interleaved(self, segments: Sequence[tuple[str, Any]]) -> dict:
    """From segments in order: ("T", text) or ("I", ImageRef)."""
    layout = "".join(tag for tag, _ in segments)
    if "I" not in layout:
      raise BadRecord("bad_layout", "no image")
    texts = [self.text(v, "text") for tag, v in segments if tag == "T"]
    return self.document(layout, texts, [v for tag, v in segments if tag == "I"])

  def plain_text(self, value) -> dict:
    return dict(layout="T", texts=[self.text(value, "text")], images=[], latents=[],
                latent_shapes=np.zeros((0, 3), np.int32))


# ---------------------------------------------------------------------------------------------
# Latents: encoded in batches of one shape, statistics of what is stored.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LatentSums:
  """Sums over stored latent tokens per token dimension (float64): images, tokens, sum, sum of
  squares. They add up over shards and processes (``add``; in a fixed order they give the same
  floats), and ``stats`` turns them into the per-dimension and per-channel mean and standard
  deviation."""
  images: int = 0
  tokens: int = 0
  total: np.ndarray | None = None     # (d,) sum of the tokens' values
  squares: np.ndarray | None = None   # (d,) sum of their squares

  def update(self, tokens_nd: np.ndarray) -> None:
    """Adds the tokens (N, d) of one image."""
    x = np.asarray(tokens_nd, np.float64)
    self.add(LatentSums(1, x.shape[0], x.sum(0), np.square(x).sum(0)))

  def add(self, other: "LatentSums") -> None:
    if not other.tokens:
      return
    if not self.tokens:
      self.total, self.squares = np.array(other.total), np.array(other.squares)
    elif len(other.total) != len(self.total):
      raise ValueError(f"latents of {len(other.total)} and {len(self.total)} dimensions")
    else:
      self.total, self.squares = self.total + other.total, self.squares + other.squares
    self.images += other.images
    self.tokens += other.tokens

  def to_dict(self) -> dict:
    return dict(images=self.images, tokens=self.tokens,
                total=[] if self.total is None else self.total.tolist(),
                squares=[] if self.squares is None else self.squares.tolist())

  @classmethod
  def from_dict(cls, d: dict) -> "LatentSums":
    if not d["tokens"]:
      return cls()
    return cls(int(d["images"]), int(d["tokens"]), np.asarray(d["total"], np.float64),
               np.asarray(d["squares"], np.float64))

  def stats(self, patch_size: int) -> dict:
    """num_images, num_tokens, token_dim; token_mean / token_std per token dimension (d values);
    channel_mean / channel_std per latent channel (d / p^2 values; a token's dimension c*p*p +
    pi*p + pj belongs to channel c), the names ``vae_tokens.latent_stats`` uses."""
    if not self.tokens:
      raise ValueError("no latent tokens")
    n, pp = self.tokens, patch_size * patch_size
    mean, sq = self.total / n, self.squares / n
    if mean.size % pp:
      raise ValueError(f"{mean.size}-d tokens do not split into channels of {patch_size}x"
                       f"{patch_size} patches")
    ch_mean, ch_sq = mean.reshape(-1, pp).mean(-1), sq.reshape(-1, pp).mean(-1)
    return dict(num_images=self.images, num_tokens=n, token_dim=int(mean.size),
                token_mean=mean.tolist(), token_std=np.sqrt(np.maximum(sq - mean ** 2, 0)).tolist(),
                channel_mean=ch_mean.tolist(),
                channel_std=np.sqrt(np.maximum(ch_sq - ch_mean ** 2, 0)).tolist())


class _Pending:
  """A record waiting for the latents of its images."""
  __slots__ = ("record", "latents", "missing")

  def __init__(self, record: dict, n: int):
    self.record, self.latents, self.missing = record, [None] * n, n


class LatentBatcher:
  """Fills records' latents with a LatentEncoder, in batches of `batch_size` images of one shape.

  ``add(record)`` takes a record whose fitted images wait under PIXELS and returns the records now
  complete, in the order they were added; ``flush()`` encodes what is left (each shape's last
  batch padded by repeating its last image) and returns the rest. At most `max_pending` records
  wait (default 4 batches): past it, the batch of the oldest waiting image is encoded, padded. The
  batches depend only on the sequence of records, so the same records give the same latents.
  ``sums``: LatentSums of the stored tokens."""

  def __init__(self, encoder: LatentEncoder, unit: int, max_pending: int | None = None):
    self.enc, self.unit = encoder, unit
    self.max_pending = max_pending or 4 * encoder.batch_size
    self.queue: collections.deque[_Pending] = collections.deque()
    self.groups: dict[tuple, list[tuple[_Pending, int, np.ndarray]]] = {}
    self.sums = LatentSums()
    self.batches = 0

  def add(self, record: dict) -> list[dict]:
    pixels = record.pop(PIXELS)
    entry = _Pending(record, len(pixels))
    self.queue.append(entry)
    for i, px in enumerate(pixels):
      group = self.groups.setdefault(px.shape, [])
      group.append((entry, i, px))
      if len(group) == self.enc.batch_size:
        self._encode(px.shape)
    out = self._ready()
    while len(self.queue) > self.max_pending:
      oldest = self.queue[0]
      shape = next(shape for shape, group in self.groups.items()
                   if any(e is oldest for e, _, _ in group))
      self._encode(shape)
      out += self._ready()
    return out

  def flush(self) -> list[dict]:
    for shape in list(self.groups):
      self._encode(shape)
    return self._ready()

  def _encode(self, shape: tuple) -> None:
    group = self.groups.pop(shape)
    real, b = len(group), self.enc.batch_size
    x = np.stack([px for _, _, px in group] + [group[-1][2]] * (b - real))   # (B, H, W, 3)
    lat = np.asarray(self.enc.encode(x))
    grid = (shape[0] // self.unit, shape[1] // self.unit)
    if lat.ndim != 4 or lat.shape[:3] != (b,) + grid:
      raise ValueError(f"the latent encoder returned shape {lat.shape} for images {x.shape} "
                       f"(expected ({b}, {grid[0]}, {grid[1]}, d) at {self.unit} px per token)")
    lat = lat[:real].astype(self.enc.dtype)
    self.batches += 1
    for (entry, i, _), tokens in zip(group, lat):
      entry.latents[i] = tokens
      entry.missing -= 1
      self.sums.update(tokens.reshape(-1, tokens.shape[-1]))

  def _ready(self) -> list[dict]:
    out = []
    while self.queue and not self.queue[0].missing:
      entry = self.queue.popleft()
      entry.record["latents"] = [np.ascontiguousarray(t).tobytes() for t in entry.latents]
      entry.record["latent_shapes"] = np.asarray([t.shape for t in entry.latents],
                                                 np.int32).reshape(-1, 3)
      out.append(entry.record)
    return out


def build_records(items: Iterable[Item], conv: Converter,
                  on_item: Callable[[bool], None] | None = None,
                  batcher: LatentBatcher | None = None) -> Iterator[dict]:
  """The records of `items` in order (skipped ones counted by `conv`; `on_item(kept)` after each
  item); with latents (conv's options), their latents filled by `batcher` (default: a new
  LatentBatcher), flushed at the end."""
  if conv.opt.latents is not None and batcher is None:
    batcher = LatentBatcher(conv.opt.latents, conv.opt.unit)
  for item in items:
    record = conv.build(item)
    if on_item is not None:
      on_item(record is not None)
    if record is None:
      continue
    if batcher is None:
      yield record
    else:
      yield from batcher.add(record)
  if batcher is not None:
    yield from batcher.flush()


def read_file(path: str, missing: str = "missing_file") -> bytes:
  """A file's bytes; BadRecord naming it when it is absent (`missing`), a directory, unreadable."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError as e:
    raise BadRecord(missing, file=path) from e
  except IsADirectoryError as e:
    raise BadRecord("is_directory", file=path) from e
  except OSError as e:
    raise BadRecord("unreadable", e.strerror or str(e), file=path) from e


def _raise(reason: str, detail: str = "") -> Callable[[], dict]:
  def make():
    raise BadRecord(reason, detail)
  return make


def _first_key(obj: dict, keys: Sequence[str]) -> str | None:
  return next((k for k in keys if k in obj), None)


def _first_string(value) -> Any:
  """A caption field's text: a string as is; the first string of a list or of a dict's values."""
  if isinstance(value, dict):
    value = list(value.values())
  if isinstance(value, list):
    return next((v for v in value if isinstance(v, str)), None)
  return value


# ---------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------

class Input:
  """A format's reader: records of `kind` in `num_units` units, the items of a unit in order."""
  kind: str = "pair"
  num_units: int = 0

  def items(self, unit: int, conv: Converter) -> Iterator[Item]:
    raise NotImplementedError

  def describe(self) -> dict:
    """What identifies the input (format, paths, sizes): a prepare resumes only the same input."""
    raise NotImplementedError


def _units(num_items: int, shard_size: int) -> int:
  if shard_size < 1:
    raise ValueError(f"shard_size must be >= 1, got {shard_size}")
  return max(1, math.ceil(num_items / shard_size))


class ImageFolder(Input):
  """Pairs from a folder tree of images, each with a caption in ``<same name>.txt``."""

  def __init__(self, folder: str, shard_size: int = 1000):
    if not os.path.isdir(folder):
      raise UserError(f"image folder {folder} does not exist" if not os.path.exists(folder)
                      else f"{folder} is not a folder")
    self.folder, self.shard_size = folder, shard_size
    self.files = []
    for dirpath, dirnames, filenames in os.walk(folder):
      dirnames.sort()
      self.files += [os.path.join(dirpath, n) for n in sorted(filenames)
                     if os.path.splitext(n)[1].lower() in IMAGE_EXTS]
    if not self.files:
      raise UserError(f"{folder} holds no images ({', '.join(IMAGE_EXTS)})")
    self.num_units = _units(len(self.files), shard_size)

  def items(self, unit, conv):
    for path in self.files[unit * self.shard_size:(unit + 1) * self.shard_size]:

      def make(path=path):
        caption = read_file(os.path.splitext(path)[0] + ".txt", missing="missing_caption")
        return conv.pair(caption, lambda: (read_file(path), path))
      yield Item(path, make)

  def describe(self):
    return dict(format="folder", input=self.folder, images=len(self.files),
                shard_size=self.shard_size)


def _record_from_json(conv: Converter, kind: str, obj: dict, base: str, keys: dict) -> dict:
  """A jsonl or csv row -> a record of `kind` (module doc for the fields)."""
  def image(path) -> ImageRef:
    path = str(path)
    path = path if os.path.isabs(path) else os.path.join(base, path)
    return lambda: (read_file(path), path)

  if kind == "text":
    return conv.plain_text(obj.get(keys.get("text") or "text"))
  if kind == "pair":
    key = keys.get("image") or _first_key(obj, IMAGE_KEYS)
    if key is None or not obj.get(key):
      raise BadRecord("missing_image")
    cap = keys.get("caption") or _first_key(obj, CAPTION_KEYS)
    return conv.pair(obj.get(cap) if cap else None, image(obj[key]))
  if kind == "edit":
    sources = obj.get("source")
    sources = [sources] if isinstance(sources, str) else list(sources or [])
    if not sources or not obj.get("target"):
      raise BadRecord("missing_image")
    return conv.edit(obj.get("instruction"), [image(p) for p in sources], image(obj["target"]))
  if kind == "interleaved":
    segments = obj.get("segments")
    if not isinstance(segments, list) or not segments:
      raise BadRecord("bad_layout", "no segments")
    if not all(isinstance(seg, dict) and ("image" in seg or "text" in seg) for seg in segments):
      raise BadRecord("bad_layout", "a segment is neither {'text': ...} nor {'image': ...}")
    return conv.interleaved([("I", image(seg["image"])) if "image" in seg else ("T", seg["text"])
                             for seg in segments])
  raise ValueError(f"unknown record kind {kind!r}")


class JsonlRecords(Input):
  """Records of one kind from a jsonl (module doc); a unit is `shard_size` lines."""

  def __init__(self, path: str, kind: str = "pair", image_root: str | None = None,
               shard_size: int = 1000, keys: dict | None = None):
    _check_file(path)
    self.path, self.kind, self.shard_size = path, kind, shard_size
    self.base = image_root if image_root is not None else os.path.dirname(path)
    self.keys = dict(keys or {})
    self.offsets, self.lines = [], 0   # byte offset of each unit's first line
    with open(path, "rb") as f:
      while True:
        if self.lines % shard_size == 0:
          self.offsets.append(f.tell())
        if not f.readline():
          break
        self.lines += 1
    if not self.lines:
      raise UserError(f"{path} is empty")
    self.num_units = _units(self.lines, shard_size)

  def items(self, unit, conv):
    with open(self.path, "rb") as f:
      f.seek(self.offsets[unit])
      for i in range(unit * self.shard_size, min(self.lines, (unit + 1) * self.shard_size)):
        line = f.readline()
        if not line.strip():
          continue
        name = f"{self.path}:{i + 1}"
        try:
          obj = json.loads(line)
        except ValueError:
          obj = None
        if not isinstance(obj, dict):
          yield Item(name, _raise("bad_json"))
          continue
        yield Item(name, lambda obj=obj: _record_from_json(conv, self.kind, obj, self.base,
                                                            self.keys))

  def describe(self):
    return dict(format="jsonl", input=self.path, bytes=os.path.getsize(self.path),
                lines=self.lines, image_root=self.base, keys=self.keys, shard_size=self.shard_size)


class CsvIndex(Input):
  """Pairs from a csv with a header row: an image path column (IMAGE_KEYS, or keys["image"]) and
  a caption column (CAPTION_KEYS, or keys["caption"]); paths relative to `image_root` (default
  the csv's folder)."""

  def __init__(self, path: str, image_root: str | None = None, shard_size: int = 1000,
               keys: dict | None = None):
    _check_file(path)
    self.path, self.kind, self.shard_size = path, "pair", shard_size
    self.base = image_root if image_root is not None else os.path.dirname(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      self.rows = list(reader)
      columns = list(reader.fieldnames or [])
    keys = dict(keys or {})
    self.keys = dict(image=keys.get("image") or _first_key(dict.fromkeys(columns), IMAGE_KEYS),
                     caption=keys.get("caption") or _first_key(dict.fromkeys(columns),
                                                               CAPTION_KEYS))
    for what, names in (("image", IMAGE_KEYS), ("caption", CAPTION_KEYS)):
      if self.keys[what] not in columns:
        raise UserError(f"{path}: no {what} column (looked for "
                        f"{keys.get(what) or ', '.join(names)}; the header has {columns})")
    if not self.rows:
      raise UserError(f"{path} has a header but no rows")
    self.num_units = _units(len(self.rows), shard_size)

  def items(self, unit, conv):
    for i in range(unit * self.shard_size, min(len(self.rows), (unit + 1) * self.shard_size)):
      row = self.rows[i]
      yield Item(f"{self.path}:{i + 2}", lambda row=row: _record_from_json(
          conv, "pair", row, self.base, self.keys))

  def describe(self):
    return dict(format="csv", input=self.path, bytes=os.path.getsize(self.path),
                rows=len(self.rows), image_root=self.base, keys=self.keys,
                shard_size=self.shard_size)


class WebDataset(Input):
  """Records of one kind from one tar shard (one unit). Members are grouped by key: the name up
  to its first dot, and ``key-{n}.<image>`` joins the sample ``key`` as its image n (the official
  NextStep layout, whose keys hold no dot or hyphen). The text is ``key.txt``, or the "caption"
  (a string, or the first string of a list or dict) or "text" of ``key.json``; ``<image_n>`` in it
  places image n. Without placeholders: pair = the text and ``key.<image>`` (or image 0); edit =
  images but the last, the instruction, the last image; interleaved = the text, then the images."""

  def __init__(self, path: str, kind: str = "pair"):
    _check_file(path)
    self.path, self.kind, self.num_units = path, kind, 1

  def _groups(self) -> Iterator[tuple[str, dict, dict]]:
    """(key, {ext: (bytes, member)}, {n: (bytes, member)}) per sample; raises BadRecord for a
    shard that cannot be read (after the samples read so far).

    A member answers to its stem, and an image ``B-{n}.<ext>`` also to B; consecutive members
    sharing an answer form a sample, keyed by what they all answer to. So ``key.json``,
    ``key-0.png`` group in either order, and the plain ``000-1.jpg``, ``000-1.txt`` stay one
    sample."""
    names: set[str] = set()
    members: list[tuple[str, str, bytes, str]] = []

    def sample():
      key = min(names, key=lambda k: (len(k), k))
      parts, images = {}, {}
      for stem, ext, data, member in members:
        if stem == key:
          parts[ext] = (data, member)
        else:
          images[int(stem[len(key) + 1:])] = (data, member)
      return key, parts, images

    try:
      with tarfile.open(self.path, "r|*") as tar:
        for member in tar:
          if not member.isfile():
            continue
          base = os.path.basename(member.name)
          if "." not in base:
            continue
          stem, ext = base.split(".", 1)
          stem, ext = os.path.join(os.path.dirname(member.name), stem), ext.lower()
          answers = {stem}
          numbered = _NUMBERED.fullmatch(stem)
          if numbered and "." + ext in IMAGE_EXTS:
            answers.add(numbered.group(1))
          f = tar.extractfile(member)
          data = f.read() if f is not None else b""
          if names & answers:
            names &= answers
          else:
            if members:
              yield sample()
            names, members = answers, []
          members.append((stem, ext, data, member.name))
    except (tarfile.TarError, OSError, EOFError) as e:
      if members:
        yield sample()
      raise BadRecord("bad_shard", str(e), file=self.path) from e
    if members:
      yield sample()

  def items(self, unit, conv):
    del unit
    groups = self._groups()
    while True:
      try:
        key, parts, images = next(groups)
      except StopIteration:
        return
      except BadRecord as e:
        yield Item(self.path, _raise(e.reason, str(e)))
        return
      yield Item(f"{self.path}:{key}",
                 lambda key=key, parts=parts, images=images: self._record(conv, parts, images))

  def _record(self, conv: Converter, parts: dict, images: dict) -> dict:
    text = parts["txt"][0] if "txt" in parts else None
    if text is None and "json" in parts:
      try:
        obj = json.loads(parts["json"][0])
      except ValueError as e:
        raise BadRecord("bad_json", file=parts["json"][1]) from e
      if isinstance(obj, dict):
        key = _first_key(obj, CAPTION_KEYS)
        text = _first_string(obj[key]) if key else None
    if self.kind == "text":
      return conv.plain_text(text)
    plain = next((parts[e[1:]] for e in IMAGE_EXTS if e[1:] in parts), None)
    if not images and plain is not None:
      images = {0: plain}
    if not images:
      raise BadRecord("missing_image")
    text = conv.text(text, {"pair": "caption", "edit": "instruction"}.get(self.kind, "text"))
    pieces = _PLACEHOLDER.split(text)   # text, n, text, n, ..., text
    if len(pieces) == 1:                # no placeholders: the kind's default places
      order = sorted(images)
      segments: list = {"pair": [text, order[0]], "edit": order[:-1] + [text, order[-1]],
                        "interleaved": [text] + order}[self.kind]
    elif self.kind == "pair":           # a caption naming its one image
      named = sorted({int(n) for n in pieces[1::2]})
      if len(named) != 1:
        raise BadRecord("bad_layout", f"a pair caption naming images {named}")
      segments = [" ".join(p.strip() for p in pieces[::2] if p.strip()), named[0]]
    else:
      segments = [int(p) if i % 2 else p.strip() for i, p in enumerate(pieces)]
      segments = [s for s in segments if not isinstance(s, str) or s]
    missing = [s for s in segments if not isinstance(s, str) and s not in images]
    if missing:
      raise BadRecord("missing_image", f"<image_{missing[0]}>")
    tagged = [("T", s) if isinstance(s, str) else ("I", images[s]) for s in segments]
    layout = "".join(tag for tag, _ in tagged)
    if self.kind == "pair":
      return conv.pair(tagged[0][1], tagged[1][1])
    if self.kind == "edit":
      if len(layout) < 3 or layout[-2:] != "TI" or layout[:-2] != "I" * (len(layout) - 2):
        raise BadRecord("bad_layout", f"edit with layout {layout}")
      return conv.edit(tagged[-2][1], [v for _, v in tagged[:-2]], tagged[-1][1])
    return conv.interleaved(tagged)

  def describe(self):
    return dict(format="webdataset", input=self.path, bytes=os.path.getsize(self.path))


class TfdsDataset(Input):
  """Pairs (an image feature and a caption: text, or a class label's name) or text records from
  a prepared TFDS dataset, read through ``tfds.data_source`` (ArrayRecord files, no tensorflow,
  never downloaded). `name`: a dataset name (under `data_dir`, default TFDS's) or the directory
  of a prepared dataset version. Features: `keys` "image" / "caption" / "text", by default the
  first image feature and the first of CAPTION_KEYS (else "label")."""

  def __init__(self, name: str, kind: str = "pair", split: str = "train",
               data_dir: str | None = None, shard_size: int = 1000, keys: dict | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self.name, self.kind, self.split, self.shard_size = name, kind, split, shard_size
    self.data_dir = data_dir
    try:
      if os.path.isfile(os.path.join(name, "dataset_info.json")):
        builder = tfds.builder_from_directory(name)
      else:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except  # TFDS: DatasetNotFoundError, ...
      raise UserError(f"tfds:{name}: no such TFDS dataset under "
                      f"{data_dir or 'the default TFDS data directory'} "
                      f"({str(e).splitlines()[0]})") from e
    features = builder.info.features
    if split not in builder.info.splits:
      raise UserError(f"tfds:{name} has no split {split!r} (it has "
                      f"{', '.join(sorted(builder.info.splits))})")
    keys = dict(keys or {})
    kinds = {k: type(v).__name__ for k, v in features.items()}
    if kind == "pair":
      image = keys.get("image") or next((k for k, t in kinds.items() if t == "Image"), None)
      caption = keys.get("caption") or _first_key(kinds, CAPTION_KEYS + ("label",))
      self.keys = dict(image=image, caption=caption)
    else:
      self.keys = dict(text=keys.get("text") or _first_key(kinds, ("text",) + CAPTION_KEYS))
    for what, key in self.keys.items():
      if key not in kinds:
        raise UserError(f"tfds:{name}: no {what} feature {key or ''} (features: "
                        f"{', '.join(f'{k} ({t})' for k, t in kinds.items())})")
    self.labels = (features[self.keys["caption"]] if kind == "pair" and
                   kinds[self.keys["caption"]] == "ClassLabel" else None)
    # Images stay encoded: a pair's is decoded and fitted by the Converter, a text's is unread.
    decoders = {k: tfds.decode.SkipDecoding() for k, t in kinds.items() if t == "Image"} or None
    try:
      self.source = builder.as_data_source(split, decoders=decoders)
    except Exception as e:  # pylint: disable=broad-except  # not prepared, not ArrayRecord, ...
      raise UserError(f"tfds:{name}/{split} cannot be read as ArrayRecord (prepare it with "
                      f"file_format='array_record'): {str(e).splitlines()[0]}") from e
    if not len(self.source):
      raise UserError(f"tfds:{name}/{split} holds no examples")
    self.num_units = _units(len(self.source), shard_size)

  def items(self, unit, conv):
    for i in range(unit * self.shard_size, min(len(self.source), (unit + 1) * self.shard_size)):
      name = f"tfds:{self.name}/{self.split}[{i}]"
      yield Item(name, lambda i=i, name=name: self._record(conv, i, name))

  def _record(self, conv: Converter, i: int, name: str) -> dict:
    try:
      ex = self.source[i]
    except Exception as e:  # pylint: disable=broad-except  # a corrupt record in the dataset
      raise BadRecord("read_error", str(e)) from e
    if self.kind == "text":
      return conv.plain_text(ex[self.keys["text"]])
    caption = ex[self.keys["caption"]]
    if self.labels is not None:
      caption = self.labels.int2str(int(caption))
    return conv.pair(caption, (bytes(ex[self.keys["image"]]), name))

  def describe(self):
    return dict(format="tfds", input=self.name, split=self.split, data_dir=self.data_dir,
                items=len(self.source), keys=self.keys, shard_size=self.shard_size)


class Inputs(Input):
  """Several inputs of one kind, their units one after another."""

  def __init__(self, parts: Sequence[Input]):
    kinds = {p.kind for p in parts}
    if len(kinds) != 1:
      raise ValueError(f"inputs of one kind expected, got {sorted(kinds)}")
    self.parts, self.kind = list(parts), kinds.pop()
    self.starts = list(itertools.accumulate([p.num_units for p in self.parts], initial=0))
    self.num_units = self.starts[-1]

  def items(self, unit, conv):
    j = bisect.bisect_right(self.starts, unit) - 1
    return self.parts[j].items(unit - self.starts[j], conv)

  def describe(self):
    return dict(inputs=[p.describe() for p in self.parts])


def _check_file(path: str) -> None:
  if not os.path.exists(path):
    raise UserError(f"input {path} does not exist")
  if os.path.isdir(path):
    raise UserError(f"input {path} is a folder, not a file")


def detect_format(path: str) -> str:
  """The format of an input path: tfds:NAME, a folder (of images, or a prepared TFDS dataset),
  or by suffix .jsonl / .csv / .tar (.tar.gz, .tgz)."""
  if path.startswith("tfds:"):
    return "tfds"
  if os.path.isdir(path):
    return "tfds" if os.path.isfile(os.path.join(path, "dataset_info.json")) else "folder"
  low = path.lower()
  for suffixes, fmt in (((".jsonl",), "jsonl"), ((".csv",), "csv"),
                        ((".tar", ".tar.gz", ".tgz"), "webdataset")):
    if low.endswith(suffixes):
      return fmt
  if not os.path.exists(path):
    raise UserError(f"input {path} does not exist")
  raise UserError(f"input {path}: cannot tell its format from the name (give the format: "
                  f"{', '.join(FORMATS)})")


def open_inputs(paths: Sequence[str], kind: str = "pair", fmt: str = "auto", *,
                shard_size: int = 1000, image_root: str | None = None,
                keys: dict | None = None, tfds_split: str = "train",
                tfds_data_dir: str | None = None) -> Input:
  """The Input of a list of paths of one format (globs expanded, sorted); UserError naming the
  path for a missing or unreadable input, an unknown format, or a kind the format cannot give."""
  if kind not in KINDS:
    raise UserError(f"unknown record kind {kind!r} (known: {', '.join(KINDS)})")
  if fmt != "auto" and fmt not in FORMATS:
    raise UserError(f"unknown input format {fmt!r} (known: auto, {', '.join(FORMATS)})")
  expanded: list[str] = []
  for p in paths:
    if not p.startswith("tfds:") and glob.has_magic(p):
      found = sorted(glob.glob(p))
      if not found:
        raise UserError(f"input {p} matches no file")
      expanded += found
    else:
      expanded.append(p)
  if not expanded:
    raise UserError("no input given")
  formats = {p: detect_format(p) if fmt == "auto" else fmt for p in expanded}
  if len(set(formats.values())) != 1:
    raise UserError("inputs of one format expected, got " +
                    ", ".join(f"{p} ({f})" for p, f in formats.items()))
  fmt = formats[expanded[0]]
  if kind not in FORMAT_KINDS[fmt]:
    raise UserError(f"{fmt} input gives {' or '.join(FORMAT_KINDS[fmt])} records, not {kind}")
  parts: list[Input] = []
  for p in expanded:
    if fmt == "folder":
      parts.append(ImageFolder(p, shard_size))
    elif fmt == "jsonl":
      parts.append(JsonlRecords(p, kind, image_root, shard_size, keys))
    elif fmt == "csv":
      parts.append(CsvIndex(p, image_root, shard_size, keys))
    elif fmt == "webdataset":
      parts.append(WebDataset(p, kind))
    else:
      parts.append(TfdsDataset(p[len("tfds:"):] if p.startswith("tfds:") else p, kind,
                               tfds_split, tfds_data_dir, shard_size, keys))
  return parts[0] if len(parts) == 1 else Inputs(parts)


# ---------------------------------------------------------------------------------------------
# One-process converters (the Python API; ``python -m nextstep_jax.data prepare`` is the command).
# ---------------------------------------------------------------------------------------------

def convert(source: Input, root: str, options: ConvertOptions | None = None,
            split: str = "train", overwrite: bool = False) -> collections.Counter:
  """Writes every record of `source` as one shard of `split`; the counters (module doc). Raises
  NoRecords, naming the counts, when no record was kept (and leaves nothing behind)."""
  conv = Converter(options)
  items = (item for unit in range(source.num_units) for item in source.items(unit, conv))
  out = write_records(root, source.kind, {split: build_records(items, conv)}, overwrite)
  if not conv.counters["written"]:
    shutil.rmtree(out)
    raise NoRecords(f"no {source.kind} records kept; skipped: "
                    f"{describe_skips(conv.counters, conv.first)}")
  return conv.counters


def convert_image_folder(folder: str, root: str, options: ConvertOptions | None = None,
                         split: str = "train", overwrite: bool = False) -> collections.Counter:
  """Pairs from a folder tree of images, each with a caption in ``<same name>.txt``."""
  return convert(ImageFolder(folder), root, options, split, overwrite)


def convert_webdataset(shards: Sequence[str], root: str, options: ConvertOptions | None = None,
                       split: str = "train", overwrite: bool = False) -> collections.Counter:
  """Pairs from webdataset tar shards (``WebDataset``: plain or official NextStep layout)."""
  return convert(Inputs([WebDataset(s, "pair") for s in shards]), root, options, split, overwrite)


def convert_pairs_jsonl(jsonl: str, root: str, options: ConvertOptions | None = None,
                        image_root: str | None = None, split: str = "train",
                        overwrite: bool = False) -> collections.Counter:
  """Pairs from a jsonl of {"image": path, "caption": text} (paths relative to `image_root`,
  default the jsonl's folder)."""
  return convert(JsonlRecords(jsonl, "pair", image_root), root, options, split, overwrite)


def convert_edits_jsonl(jsonl: str, root: str, options: ConvertOptions | None = None,
                        image_root: str | None = None, split: str = "train",
                        overwrite: bool = False) -> collections.Counter:
  """Editing triplets from a jsonl of {"source": path or [paths], "instruction": text,
  "target": path}; every image is fitted to the first source's bucket."""
  return convert(JsonlRecords(jsonl, "edit", image_root), root, options, split, overwrite)


def convert_interleaved_jsonl(jsonl: str, root: str, options: ConvertOptions | None = None,
                              image_root: str | None = None, split: str = "train",
                              overwrite: bool = False) -> collections.Counter:
  """Interleaved documents from a jsonl of {"segments": [{"text": ...} | {"image": path}, ...]}."""
  return convert(JsonlRecords(jsonl, "interleaved", image_root), root, options, split, overwrite)


def convert_text_jsonl(jsonl: str, root: str, split: str = "train",
                       overwrite: bool = False) -> collections.Counter:
  """Text-only documents from a jsonl of {"text": ...} (chunked to the row length at read time)."""
  return convert(JsonlRecords(jsonl, "text"), root, None, split, overwrite)
