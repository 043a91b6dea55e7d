"""Converters: inputs on disk -> the ArrayRecord datasets of ``data/sources.py`` (schema there).

Converters read (a) a folder of images with .txt captions, (b) webdataset-style tar shards
(jpg/png/webp with txt/json), (c) a jsonl of image path and caption, (d) jsonl of editing
triplets and of interleaved documents (and text-only jsonl). Every image is decoded, converted to
RGB, checked (empty, truncated, too small, too large) and resized into an aspect bucket of the
stage's area range. Bad inputs are skipped or converted and counted in the returned counters
(``skipped/<reason>``, ``converted/<what>``, ``written``); nothing raises for a bad record.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import tarfile
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from nextstep_jax.data.sources import (DEFAULT_MAX_PIXELS, BadRecord, decode_text, encode_image,
                                       prepare_image, write_records)


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass
class ConvertOptions:
  """How converters fit images: token unit in px (vae_factor * patch_size), the stage's base grid
  sides (area_sides(min_tokens, max_tokens)), the storage format, and optional latents
  (latent_fn: uint8 (H, W, 3) -> float (h, w, d) patch tokens, stored as float16)."""
  unit: int = 16
  sides: tuple[int, ...] = (16,)
  max_pixels: int = DEFAULT_MAX_PIXELS
  min_area_ratio: float = 0.9
  image_format: str = "jpeg"
  quality: int = 95
  latent_fn: Callable[[np.ndarray], np.ndarray] | None = None


class _Converter:
  """Shared image and text handling of the converters, with the counters."""

  def __init__(self, options: ConvertOptions | None):
    self.opt = options or ConvertOptions()
    self.counters: collections.Counter = collections.Counter()

  def image(self, data: bytes | None, grid=None) -> tuple[bytes, np.ndarray]:
    if data is None:
      raise BadRecord("missing_image")
    notes: list[str] = []
    arr = prepare_image(data, self.opt.sides, self.opt.unit, notes, self.opt.max_pixels,
                        self.opt.min_area_ratio, grid)
    for n in notes:
      self.counters[f"converted/{n}"] += 1
    return encode_image(arr, self.opt.image_format, self.opt.quality), arr

  def text(self, value, field: str) -> str:
    notes: list[str] = []
    out = decode_text(value, field, notes)
    for n in notes:
      self.counters[f"converted/{n}"] += 1
    return out

  def document(self, layout: str, texts: list[str], image_data: list[bytes | None],
               same_shape: bool = False) -> dict:
    blobs, arrays = [], []
    for data in image_data:
      grid = None
      if same_shape and arrays:
        grid = (arrays[0].shape[0] // self.opt.unit, arrays[0].shape[1] // self.opt.unit)
      blob, arr = self.image(data, grid)
      blobs.append(blob)
      arrays.append(arr)
    latents, shapes = [], []
    if self.opt.latent_fn is not None:
      for arr in arrays:
        lat = np.asarray(self.opt.latent_fn(arr), np.float16)
        if lat.ndim != 3 or lat.shape[:2] != (arr.shape[0] // self.opt.unit,
                                               arr.shape[1] // self.opt.unit):
          raise ValueError(f"latent_fn returned shape {lat.shape} for an image of {arr.shape}")
        latents.append(lat.tobytes())
        shapes.append(np.asarray(lat.shape, np.int32))
    return dict(layout=layout, texts=texts, images=blobs, latents=latents,
                latent_shapes=np.asarray(shapes, np.int32).reshape(-1, 3))

  def run(self, items: Iterable[Callable[[], dict]]) -> Iterator[dict]:
    """Builds each record, counting BadRecord reasons instead of raising."""
    for make in items:
      try:
        ex = make()
      except BadRecord as e:
        self.counters[f"skipped/{e.reason}"] += 1
        continue
      self.counters["written"] += 1
      yield ex


def _read(path: str) -> bytes | None:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    return None


def _resolve(path: str, base: str) -> str:
  return path if os.path.isabs(path) else os.path.join(base, path)


def _jsonl(path: str, conv: _Converter) -> Iterator[dict]:
  with open(path, "rb") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError:
        conv.counters["skipped/bad_json"] += 1
        continue
      if not isinstance(obj, dict):
        conv.counters["skipped/bad_json"] += 1
        continue
      yield obj


def _pair_from_bytes(conv: _Converter, image: bytes | None, caption) -> Callable[[], dict]:
  def make():
    if image is None:
      raise BadRecord("missing_image")
    text = conv.text(caption, "caption")
    return conv.document("TI", [text], [image])
  return make


def convert_image_folder(folder: str, root: str, options: ConvertOptions | None = None,
                         split: str = "train", overwrite: bool = False) -> collections.Counter:
  """Pairs from a folder tree of images, each with a caption in ``<same name>.txt``."""
  conv = _Converter(options)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder {folder} does not exist")

  def items():
    for dirpath, dirnames, filenames in os.walk(folder):
      dirnames.sort()
      for name in sorted(filenames):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS:
          continue
        cap_path = os.path.join(dirpath, stem + ".txt")
        caption = _read(cap_path)
        if caption is None:
          conv.counters["skipped/missing_caption"] += 1
          continue
        yield _pair_from_bytes(conv, _read(os.path.join(dirpath, name)), caption)

  write_records(root, "pair", {split: conv.run(items())}, overwrite)
  return conv.counters


def _caption_from_json(data: bytes) -> Any:
  obj = json.loads(data)
  if isinstance(obj, dict):
    for k in ("caption", "text", "txt", "prompt"):
      if k in obj:
        return obj[k]
  return None


def convert_webdataset(shards: Sequence[str], root: str, options: ConvertOptions | None = None,
                       split: str = "train", overwrite: bool = False) -> collections.Counter:
  """Pairs from webdataset-style tar shards: members grouped by key (name up to the first dot),
  an image (jpg/jpeg/png/webp) and a caption in ``.txt`` or ``.json`` ("caption"/"text")."""
  conv = _Converter(options)
  for s in shards:
    if not os.path.exists(s):
      raise FileNotFoundError(f"webdataset shard {s} does not exist")

  def groups(path):
    current, parts = None, {}
    try:
      with tarfile.open(path, "r|*") as tar:
        for member in tar:
          if not member.isfile():
            continue
          base = os.path.basename(member.name)
          if "." not in base:
            continue
          key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
          ext = base.split(".", 1)[1].lower()
          if key != current and current is not None:
            yield current, parts
            parts = {}
          current = key
          f = tar.extractfile(member)
          parts[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError):
      conv.counters["skipped/bad_shard"] += 1
    if current is not None:
      yield current, parts

  def items():
    for shard in shards:
      for _, parts in groups(shard):
        image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
        if image is None:
          conv.counters["skipped/missing_image"] += 1
          continue
        caption = parts.get("txt")
        if caption is None and "json" in parts:
          try:
            caption = _caption_from_json(parts["json"])
          except ValueError:
            caption = None
        if caption is None:
          conv.counters["skipped/missing_caption"] += 1
          continue
        yield _pair_from_bytes(conv, image, caption)

  write_records(root, "pair", {split: conv.run(items())}, overwrite)
  return conv.counters


def convert_pairs_jsonl(jsonl: str, root: str, options: ConvertOptions | None = None,
                        image_root: str | None = None, split: str = "train",
                        overwrite: bool = False) -> collections.Counter:
  """Pairs from a jsonl of {"image": path, "caption": text} (paths relative to `image_root`,
  default the jsonl's folder)."""
  conv = _Converter(options)
  base = image_root or os.path.dirname(os.path.abspath(jsonl))

  def items():
    for obj in _jsonl(jsonl, conv):
      if not obj.get("image"):
        conv.counters["skipped/missing_image"] += 1
        continue
      data = _read(_resolve(str(obj["image"]), base))
      if data is None:
        conv.counters["skipped/missing_file"] += 1
        continue
      yield _pair_from_bytes(conv, data, obj.get("caption"))

  write_records(root, "pair", {split: conv.run(items())}, overwrite)
  return conv.counters


def convert_edits_jsonl(jsonl: str, root: str, options: ConvertOptions | None = None,
                        image_root: str | None = None, split: str = "train",
                        overwrite: bool = False) -> collections.Counter:
  """Editing triplets from a jsonl of {"source": path or [paths], "instruction": text,
  "target": path}; every image is fitted to the first source's bucket."""
  conv = _Converter(options)
  base = image_root or os.path.dirname(os.path.abspath(jsonl))

  def items():
    for obj in _jsonl(jsonl, conv):
      sources = obj.get("source")
      sources = [sources] if isinstance(sources, str) else list(sources or [])
      if not sources or not obj.get("target"):
        conv.counters["skipped/missing_image"] += 1
        continue
      paths = [_resolve(str(p), base) for p in sources + [obj["target"]]]
      data = [_read(p) for p in paths]
      if any(d is None for d in data):
        conv.counters["skipped/missing_file"] += 1
        continue
      instruction = obj.get("instruction")

      def make(data=data, instruction=instruction, n=len(sources)):
        text = conv.text(instruction, "instruction")
        return conv.document("I" * n + "TI", [text], data, same_shape=True)
      yield make

  write_records(root, "edit", {split: conv.run(items())}, overwrite)
  return conv.counters


def convert_interleaved_jsonl(jsonl: str, root: str, options: ConvertOptions | None = None,
                              image_root: str | None = None, split: str = "train",
                              overwrite: bool = False) -> collections.Counter:
  """Interleaved documents from a jsonl of {"segments": [{"text": ...} | {"image": path}, ...]}."""
  conv = _Converter(options)
  base = image_root or os.path.dirname(os.path.abspath(jsonl))

  def items():
    for obj in _jsonl(jsonl, conv):
      segments = obj.get("segments")
      if not isinstance(segments, list) or not segments:
        conv.counters["skipped/bad_layout"] += 1
        continue
      layout, texts, data = "", [], []
      ok = True
      for seg in segments:
        if isinstance(seg, dict) and "image" in seg:
          d = _read(_resolve(str(seg["image"]), base))
          if d is None:
            ok = False
            break
          layout += "I"
          data.append(d)
        elif isinstance(seg, dict) and "text" in seg:
          layout += "T"
          texts.append(seg["text"])
        else:
          ok = False
          break
      if not ok:
        conv.counters["skipped/missing_file"] += 1
        continue
      if "I" not in layout:
        conv.counters["skipped/bad_layout"] += 1
        continue

      def make(layout=layout, texts=texts, data=data):
        return conv.document(layout, [conv.text(t, "text") for t in texts], data)
      yield make

  write_records(root, "interleaved", {split: conv.run(items())}, overwrite)
  return conv.counters


def convert_text_jsonl(jsonl: str, root: str, split: str = "train",
                       overwrite: bool = False) -> collections.Counter:
  """Text-only documents from a jsonl of {"text": ...} (chunked to the row length at read time)."""
  conv = _Converter(None)

  def items():
    for obj in _jsonl(jsonl, conv):
      value = obj.get("text")

      def make(value=value):
        return dict(layout="T", texts=[conv.text(value, "text")], images=[], latents=[],
                    latent_shapes=np.zeros((0, 3), np.int32))
      yield make

  write_records(root, "text", {split: conv.run(items())}, overwrite)
  return conv.counters
