"""Data on disk: the ArrayRecord datasets (TFDS, no tensorflow) the converters write, and their readers.

One TFDS dataset, ``NextstepRecords``, holds every kind with one schema (a BuilderConfig per
kind: "pair", "edit", "interleaved", "text") under ``{root}/nextstep_records/{kind}/1.0.0``;
``data.source = root`` then feeds the mixture. A record is a small document:

  layout   text   "T"/"I" per segment in order: pair "TI" (caption, image), edit "I..ITI"
                  (sources, instruction, target), interleaved any, text "T"
  texts    [text]       the text segments in order
  images   [bytes]      encoded images (JPEG or PNG), already resized into an aspect bucket
  latents  [bytes]      optional precomputed patch tokens (h, w, d) per image, float16 or float32
                        (told by the size); (h, w) is the image's token grid
  latent_shapes [(h, w, d)]

A split is a list of ArrayRecord shard files (``nextstep_records-{split}.array_record-{i}-of-{n}``)
and its entry in ``dataset_info.json``. Records are serialised deterministically (``ShardWriter``):
the same records give the same shard bytes, which is what makes ``prepare``'s resume and its
multi-process output exact. ``python -m nextstep_jax.data prepare`` (``data/prepare.py``) and the
converters (``data/formats.py``) read image folders, jsonl/csv indexes, webdataset tar shards and
TFDS datasets; every image is decoded, converted to RGB, checked and resized into an aspect bucket
of the stage's area range by the helpers here. The same checks run again when records are read for
training (``RecordDecoder``), so a corrupt record in a shard is skipped and counted by the pipeline
instead of stopping training. On the latent path, a record's stored latents are used as they are:
its images are opened only to check that their token grid is the latents' and one of the stage's
buckets (latents cannot be re-fitted), never decoded.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import shutil
import socket
from typing import Any, Iterable, Sequence

import numpy as np

KINDS = ("pair", "edit", "interleaved", "text")
BUILDER_NAME = "nextstep_records"
VERSION = "1.0.0"
# SPEC §1: aspect buckets at the 256 base in units of 16 px, (h, w); transposes added below.
BASE_BUCKETS = ((8, 32), (9, 28), (10, 25), (11, 23), (12, 21), (13, 19), (14, 18), (15, 17),
                (16, 16))
DEFAULT_MAX_PIXELS = 64_000_000   # larger inputs are skipped as "too_large" before decoding


class BadRecord(Exception):
  """A record that cannot be used; `reason` names the counter it is counted under, `file` the
  offending input file where one is known (a summary names it)."""

  def __init__(self, reason: str, detail: str = "", file: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.file = reason, file


# ---------------------------------------------------------------------------------------------
# Aspect buckets.
# ---------------------------------------------------------------------------------------------

def aspect_buckets(side: int) -> tuple[tuple[int, int], ...]:
  """The (h, w) token grids of one area: SPEC §1's buckets scaled from side 16 (256 tokens) to
  `side` (32: the x2 buckets of 512 px), with their transposes, sorted by aspect h/w."""
  if side < 1:
    raise ValueError(f"bucket side must be >= 1, got {side}")
  scale = side / 16
  out = set()
  for h, w in BASE_BUCKETS:
    hs, ws = max(1, round(h * scale)), max(1, round(w * scale))
    out.add((hs, ws))
    out.add((ws, hs))
  return tuple(sorted(out, key=lambda hw: hw[0] / hw[1]))


def area_sides(min_tokens: int, max_tokens: int) -> tuple[int, ...]:
  """Base grid sides of a stage's area range: sqrt(min_tokens), doubled while the area stays
  within max_tokens (256..1024 tokens -> (16, 32), i.e. 256 px and 512 px at 16 px per token)."""
  side = math.isqrt(int(min_tokens))
  if side < 1 or side * side != min_tokens:
    raise ValueError(f"data.min_image_tokens must be a square number of tokens, got {min_tokens}")
  if max_tokens < min_tokens:
    raise ValueError(f"data.max_image_tokens ({max_tokens}) < data.min_image_tokens ({min_tokens})")
  sides = []
  while side * side <= max_tokens:
    sides.append(side)
    side *= 2
  return tuple(sides)


def choose_bucket(height: int, width: int, sides: Sequence[int], unit: int,
                  min_area_ratio: float = 0.9) -> tuple[int, int] | None:
  """The bucket grid for an image of height x width px: the largest base area the image covers
  (up to a 1/min_area_ratio upscale), then the bucket nearest its aspect. None: too small."""
  area = height * width
  usable = [s for s in sides if (s * unit) ** 2 * min_area_ratio <= area]
  if not usable:
    return None
  target = math.log(height / width)
  return min(aspect_buckets(max(usable)), key=lambda hw: abs(math.log(hw[0] / hw[1]) - target))


# ---------------------------------------------------------------------------------------------
# Decoding and fitting images.
# ---------------------------------------------------------------------------------------------

def _to_rgb(img, notes: list[str]):
  """Any PIL mode -> RGB (alpha composited on white, 16-bit and float scaled), noting the mode."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  mode = img.mode
  if mode == "RGB":
    return img
  notes.append(f"mode_{mode.replace(';', '_')}")
  if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
    x = np.asarray(img, dtype=np.float64)
    hi = 65535.0 if mode.startswith("I;16") else max(1.0, float(x.max()))
    x = np.clip(x / hi * 255.0, 0, 255).astype(np.uint8)
    return Image.fromarray(x, "L").convert("RGB")
  return img.convert("RGB")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
  """Opens encoded image bytes lazily; BadRecord for empty, unreadable or too large input."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if not data:
    raise BadRecord("empty_file")
  try:
    img = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise BadRecord("too_large", str(e)) from e
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
    raise BadRecord("decode_error", str(e)) from e
  w, h = img.size
  if w < 1 or h < 1:
    raise BadRecord("decode_error", f"image size {w}x{h}")
  if w * h > max_pixels:
    raise BadRecord("too_large", f"{w}x{h} px > max_pixels {max_pixels}")
  return img


def fit_image(img, grid: tuple[int, int], unit: int, notes: list[str]) -> np.ndarray:
  """PIL image -> uint8 (grid_h*unit, grid_w*unit, 3): scaled to cover the bucket, centre-cropped."""
  from PIL import Image, ImageOps  # pylint: disable=import-outside-toplevel
  th, tw = grid[0] * unit, grid[1] * unit
  w, h = img.size
  scale = max(tw / w, th / h)
  try:
    if img.format == "JPEG" and scale < 0.5:
      img.draft("RGB", (max(tw, math.ceil(w * scale)), max(th, math.ceil(h * scale))))
    img = ImageOps.exif_transpose(img)
    img.load()
  except Exception as e:  # truncated or corrupt data surfaces here
    raise BadRecord("decode_error", str(e)) from e
  img = _to_rgb(img, notes)
  w, h = img.size
  scale = max(tw / w, th / h)
  cw, ch = tw / scale, th / scale
  left, top = (w - cw) / 2, (h - ch) / 2
  out = img.resize((tw, th), Image.BICUBIC, box=(left, top, left + cw, top + ch), reducing_gap=3.0)
  arr = np.asarray(out, dtype=np.uint8)
  if arr.shape != (th, tw, 3):
    raise BadRecord("decode_error", f"fitted image has shape {arr.shape}")
  return arr


SMALL_POLICIES = ("upscale", "drop")


def prepare_image(data: bytes, sides: Sequence[int], unit: int, notes: list[str],
                  max_pixels: int = DEFAULT_MAX_PIXELS, min_area_ratio: float = 0.9,
                  grid: tuple[int, int] | None = None, small: str = "drop") -> np.ndarray:
  """Encoded bytes -> uint8 RGB image of a bucket of the area range (or of `grid` when given).
  `small`: an image below the smallest area is resized up into its nearest bucket ("upscale",
  noted "upscaled_small") or refused as "too_small" ("drop")."""
  if small not in SMALL_POLICIES:
    raise ValueError(f"small must be one of {SMALL_POLICIES}, got {small!r}")
  img = open_image(data, max_pixels)
  w, h = img.size
  if grid is None:
    grid = choose_bucket(h, w, sides, unit, min_area_ratio)
    if grid is None and small == "upscale":
      grid = choose_bucket(h, w, (min(sides),), unit, 0.0)
      notes.append("upscaled_small")
    if grid is None:
      raise BadRecord("too_small", f"{w}x{h} px < {(min(sides) * unit) ** 2} px area")
    if w * h > 4 * (grid[0] * grid[1] * unit * unit):
      notes.append("downscaled_large")
  return fit_image(img, grid, unit, notes)


def encode_image(arr: np.ndarray, image_format: str = "jpeg", quality: int = 95) -> bytes:
  """uint8 (H, W, 3) -> JPEG or PNG bytes."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  if image_format == "jpeg":
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
  elif image_format == "png":
    Image.fromarray(arr).save(buf, format="PNG")
  else:
    raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
  return buf.getvalue()


def decode_text(value: Any, field: str, notes: list[str]) -> str:
  """bytes/str -> str; non-UTF-8 bytes are read as Windows-1252 / Latin-1 (noted); empty or
  missing -> BadRecord(f"missing_{field}")."""
  if isinstance(value, (bytes, bytearray, np.bytes_)):
    raw = bytes(value)
    try:
      value = raw.decode("utf-8")
    except UnicodeDecodeError:
      notes.append(f"{field}_not_utf8")   # web text that is not UTF-8 is mostly Windows-1252
      try:
        value = raw.decode("cp1252")
      except UnicodeDecodeError:
        value = raw.decode("latin-1")
  if value is None or not isinstance(value, str):
    raise BadRecord(f"missing_{field}")
  value = value.strip()
  if not value:
    raise BadRecord(f"missing_{field}")
  return value


# ---------------------------------------------------------------------------------------------
# The TFDS dataset (ArrayRecord, no tensorflow): shards and dataset_info.json.
# ---------------------------------------------------------------------------------------------

def _builder_class():
  """NextstepRecords, defined lazily so importing this module does not import TFDS. It only
  describes the datasets (features, splits); the shards are written by ``ShardWriter``."""
  global _BUILDER  # pylint: disable=global-statement
  if _BUILDER is not None:
    return _BUILDER
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class NextstepRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Documents of texts and images for the NextStep mixture, one config per kind."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=k) for k in KINDS]
    # No checksums file or package metadata: a None code path keeps TFDS from probing this
    # package's resources (which needs the optional importlib_resources backport).
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=_features())

    def _split_generators(self, dl_manager):
      raise NotImplementedError("records are written with sources.ShardWriter, not by TFDS")

    def _generate_examples(self, **kwargs):
      raise NotImplementedError("records are written with sources.ShardWriter, not by TFDS")

  _BUILDER = NextstepRecords
  return NextstepRecords


_BUILDER = None
SHARD_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"   # TFDS's default file names


def record_dir(root: str, kind: str) -> str:
  """Where the records of `kind` live under a data root."""
  if kind not in KINDS:
    raise ValueError(f"record kind must be one of {KINDS}, got {kind!r}")
  return os.path.join(root, BUILDER_NAME, kind, VERSION)


def shard_name(split: str, index: int, num_shards: int) -> str:
  """The file name of shard `index` of `num_shards` of a split (TFDS's SHARD_TEMPLATE)."""
  return f"{BUILDER_NAME}-{split}.array_record-{index:05d}-of-{num_shards:05d}"


def _builder(root: str, kind: str):
  return _builder_class()(data_dir=root, config=kind, file_format="array_record")


class ShardWriter:
  """Writes records (schema in the module docstring) into one ArrayRecord shard file.

  Serialisation is deterministic (tf.Example with its feature map in sorted order): the same
  records in the same order give the same bytes. ``count`` and ``num_bytes`` (serialised sizes,
  what dataset_info.json records) are known once closed."""

  def __init__(self, path: str):
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    from tensorflow_datasets.core import example_serializer  # pylint: disable=import-outside-toplevel
    self.path, self.count, self.num_bytes = path, 0, 0
    self._features = _features()
    self._serializer = example_serializer.ExampleSerializer(self._features.get_serialized_info())
    self._writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")

  def write(self, record: dict) -> None:
    example = self._serializer.get_tf_example(self._features.encode_example(record))
    data = example.SerializeToString(deterministic=True)
    self._writer.write(data)
    self.count += 1
    self.num_bytes += len(data)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


_FEATURES = None


def _features():
  """The records' tfds FeaturesDict (the same for every kind; schema in the module docstring)."""
  global _FEATURES  # pylint: disable=global-statement
  if _FEATURES is None:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    f = tfds.features
    _FEATURES = f.FeaturesDict({
        "layout": f.Text(),
        "texts": f.Sequence(f.Text()),
        "images": f.Sequence(f.Tensor(shape=(), dtype=np.object_)),
        "latents": f.Sequence(f.Tensor(shape=(), dtype=np.object_)),
        "latent_shapes": f.Sequence(f.Tensor(shape=(3,), dtype=np.int32)),
    })
  return _FEATURES


def write_dataset_info(root: str, kind: str, splits: dict[str, tuple[Sequence[int], int]]) -> str:
  """Writes dataset_info.json and features.json of `kind` (replacing them): `splits` maps each
  split to (records per shard, in shard order; serialised bytes), its shards named by
  ``shard_name``. Each file is written aside and moved into place, so readers never see half a
  file and two processes writing the same content do not collide."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  out = record_dir(root, kind)
  builder = _builder(root, kind)
  infos = []
  for split, (lengths, num_bytes) in sorted(splits.items()):
    template = tfds.core.ShardedFileTemplate(
        data_dir=out, template=SHARD_TEMPLATE, dataset_name=BUILDER_NAME, split=split,
        filetype_suffix="array_record")
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[int(n) for n in lengths],
                                     num_bytes=int(num_bytes), filename_template=template))
  builder.info.set_splits(tfds.core.SplitDict(infos))
  aside = os.path.join(out, f".info-{socket.gethostname()}-{os.getpid()}")
  os.makedirs(aside, exist_ok=True)
  builder.info.features.save_config(aside)      # features.json
  builder.info.write_dataset_info_json(aside)   # dataset_info.json (nothing else: same bytes)
  for name in sorted(os.listdir(aside)):
    os.replace(os.path.join(aside, name), os.path.join(out, name))
  os.rmdir(aside)
  return out


def write_records(root: str, kind: str, splits: dict[str, Iterable[dict]],
                  overwrite: bool = False) -> str:
  """Writes record dicts (schema in the module docstring) of each split as one ArrayRecord shard."""
  out = record_dir(root, kind)
  if os.path.exists(out):
    if not overwrite:
      raise FileExistsError(f"{out} already holds {kind} records; pass overwrite=True to replace")
    shutil.rmtree(out)
  os.makedirs(out)
  written = {}
  for split, records in splits.items():
    with ShardWriter(os.path.join(out, shard_name(split, 0, 1))) as w:
      for record in records:
        w.write(record)
    written[split] = ([w.count], w.num_bytes)
  return write_dataset_info(root, kind, written)


def open_records(root: str, kind: str, split: str = "train"):
  """The random-access data source of one kind and split (None when the split is absent)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  path = record_dir(root, kind)
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"no {kind} records at {path} (write them with python -m "
                            "nextstep_jax.data prepare)")
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    return None
  return builder.as_data_source(split)


def available_kinds(root: str, split: str | None = None) -> list[str]:
  """The kinds with records under `root` (with at least one record in `split`, when given)."""
  out = []
  for kind in KINDS:
    if not os.path.exists(os.path.join(record_dir(root, kind), "dataset_info.json")):
      continue
    if split is not None:
      src = open_records(root, kind, split)
      if src is None or len(src) == 0:
        continue
    out.append(kind)
  return out


# ---------------------------------------------------------------------------------------------
# Reading records for training.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DecodedRecord:
  """A record ready for SequenceBuilder.from_record: texts decoded, images as uint8 RGB arrays
  (None on the latent path where the record's latents are used), their latent tokens (h, w, d)
  where stored, plus notes of what was converted."""
  record: dict
  images: list[np.ndarray | None]
  latents: list[np.ndarray | None]
  notes: list[str]


LATENT_DTYPES = (np.float16, np.float32)


def decode_latent(blob: bytes, shape) -> np.ndarray:
  """Stored latent bytes -> (h, w, d) array; float16 or float32 by the byte count. BadRecord
  ("bad_latents") when the bytes fit neither."""
  shape = tuple(int(v) for v in shape)
  n = int(np.prod(shape))
  for dtype in LATENT_DTYPES:
    if len(blob) == n * np.dtype(dtype).itemsize:
      return np.frombuffer(bytes(blob), dtype).reshape(shape)
  raise BadRecord("bad_latents", f"{len(blob)} bytes for latents of shape {shape}")


class RecordDecoder:
  """Turns a stored record into a DecodedRecord, re-checking everything; BadRecord when unusable.

  Images that are not in a bucket of the stage's area range (another stage's data, or written by
  other tools) are re-fitted into one; on the pixel path every image of a record is fitted to the
  first image's shape.
  """

  def __init__(self, kind: str, unit: int, sides: Sequence[int], pixel: bool,
               max_pixels: int = DEFAULT_MAX_PIXELS):
    self.kind, self.unit, self.sides, self.pixel = kind, unit, tuple(sides), pixel
    self.max_pixels = max_pixels
    self.buckets = frozenset(b for side in self.sides for b in aspect_buckets(side))

  def _image(self, data: bytes, notes: list[str], grid=None) -> np.ndarray:
    img = open_image(bytes(data), self.max_pixels)
    w, h = img.size
    own = (h // self.unit, w // self.unit)
    fitted = w % self.unit == 0 and h % self.unit == 0 and own in self.buckets
    if grid is not None and own != tuple(grid):
      notes.append("refit_shape")
    elif not fitted:
      notes.append("refit_area")
    else:
      try:
        img.load()
      except Exception as e:  # truncated or corrupt data surfaces here
        raise BadRecord("decode_error", str(e)) from e
      return np.asarray(_to_rgb(img, notes), dtype=np.uint8)
    return prepare_image(bytes(data), self.sides, self.unit, notes, self.max_pixels, grid=grid)

  def __call__(self, raw: dict) -> DecodedRecord:
    notes: list[str] = []
    layout = decode_text(raw.get("layout", b""), "layout", notes)
    field = {"pair": "caption", "edit": "instruction"}.get(self.kind, "text")
    texts = [decode_text(t, field, notes) for t in raw.get("texts", [])]
    blobs = list(raw.get("images", []))
    latent_blobs = list(raw.get("latents", []))
    latent_shapes = list(raw.get("latent_shapes", []))
    if layout.count("T") != len(texts) or layout.count("I") != len(blobs) or \
        set(layout) - {"T", "I"}:
      raise BadRecord("bad_layout", f"layout {layout!r} with {len(texts)} texts, {len(blobs)} images")
    record = _record_from_layout(self.kind, layout, texts)
    if not self.pixel and latent_blobs:   # the latent path reads the stored latents
      if len(latent_blobs) != len(blobs) or len(latent_shapes) != len(blobs):
        raise BadRecord("bad_latents", "latents do not match the images")
      latents = [decode_latent(b, shape) for b, shape in zip(latent_blobs, latent_shapes)]
      for blob, lat in zip(blobs, latents):
        self._check_latent_grid(blob, lat)
      return DecodedRecord(record, [None] * len(blobs), list(latents), notes)
    images: list[np.ndarray | None] = []
    for blob in blobs:
      grid = None
      if self.pixel and images:
        grid = (images[0].shape[0] // self.unit, images[0].shape[1] // self.unit)
      images.append(self._image(blob, notes, grid))
    return DecodedRecord(record, images, [None] * len(images), notes)

  def _check_latent_grid(self, data: bytes, latent: np.ndarray) -> None:
    """The image's token grid (its header only) is the latents' and a bucket of the stage."""
    w, h = open_image(bytes(data), self.max_pixels).size
    grid = (h // self.unit, w // self.unit)
    if h % self.unit or w % self.unit or tuple(latent.shape[:2]) != grid:
      raise BadRecord("bad_latents", f"latents {latent.shape} for an image of {w}x{h} px at "
                      f"{self.unit} px per token")
    if grid not in self.buckets:
      raise BadRecord("latents_off_bucket", f"token grid {grid} is not a bucket of the area range")


def _record_from_layout(kind: str, layout: str, texts: list[str]) -> dict:
  n_images = layout.count("I")
  if kind == "text":
    if layout != "T":
      raise BadRecord("bad_layout", f"text record with layout {layout!r}")
    return dict(kind="text", text=texts[0])
  if kind == "pair":
    if layout != "TI":
      raise BadRecord("bad_layout", f"pair record with layout {layout!r}")
    return dict(kind="pair", caption=texts[0])
  if kind == "edit":
    if n_images < 2 or not layout.endswith("TI") or layout[:-2] != "I" * (n_images - 1):
      raise BadRecord("bad_layout", f"edit record with layout {layout!r}")
    return dict(kind="edit", instruction=texts[0])
  if kind == "interleaved":
    segments: list = []
    ti = ii = 0
    for c in layout:
      if c == "T":
        segments.append(texts[ti])
        ti += 1
      else:
        segments.append(ii)
        ii += 1
    if ii == 0:
      raise BadRecord("bad_layout", "interleaved record without images")
    return dict(kind="interleaved", segments=segments)
  raise ValueError(f"unknown record kind {kind!r}")
