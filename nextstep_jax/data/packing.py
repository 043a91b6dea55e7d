"""Greedy packing of variable-length samples into fixed-shape rows and batches (batch.py).

A sample never splits across rows (so neither do an image's tokens); over-long text documents
are chunked before they get here (sequences.text_chunks). Rows hold at most ``seq_len`` tokens
and, on the pixel path, at most ``max_images`` images, all of one pixel shape (the aspect bucket:
``images`` is a fixed (N, H, W, 3) buffer, so a batch holds one bucket); on the latent path at
most ``max_image_tokens`` image tokens in a flat (M, d) buffer, any buckets mixed.

The packer keeps ``open_rows`` rows open and puts each sample in the open row it fills best
(best fit); when none has room, the fullest open row is closed (or a new row opened while fewer
than ``open_rows`` are open). Closed rows queue until ``batch_rows`` rows of one bucket are ready
(text-only rows join any bucket). Everything is deterministic, and ``state()`` describes the
open and queued rows by sample keys only, so a pipeline can rebuild them exactly on resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from nextstep_jax.batch import IGNORE


class Packable(Protocol):
  """What the packer needs from a sample (sequences.Sample has it; tests may use stand-ins)."""
  key: Any

  @property
  def length(self) -> int: ...

  @property
  def num_images(self) -> int: ...

  @property
  def num_image_tokens(self) -> int: ...

  @property
  def image_shape(self) -> tuple[int, int] | None: ...


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """Row capacity and buffer shapes (from config.data / config.image).

  payload: "images" (pixel path) | "image_tokens" (latent path); max_images: N (pixel path);
  max_image_tokens: M (latent path, flat buffer per row); image_shape: pixel (H, W) of the
  buffer for rows without images; open_rows: rows kept open at once (packing window).
  """
  seq_len: int
  payload: str
  max_images: int
  max_image_tokens: int
  token_dim: int
  image_shape: tuple[int, int]
  pad_id: int
  open_rows: int = 8

  def __post_init__(self):
    if self.payload not in ("images", "image_tokens"):
      raise ValueError(f"data.payload must be 'images' or 'image_tokens', got {self.payload!r}")
    for name in ("seq_len", "max_images", "max_image_tokens", "token_dim", "open_rows"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"row spec {name} must be >= 1, got {getattr(self, name)}")

  @property
  def pixel(self) -> bool:
    return self.payload == "images"

  def reject_reason(self, sample: Packable) -> str | None:
    """Why `sample` can never fit an empty row (None when it can)."""
    if sample.length > self.seq_len:
      return "too_long"
    if self.pixel and sample.num_images > self.max_images:
      return "too_many_images"
    if not self.pixel and sample.num_image_tokens > self.max_image_tokens:
      return "too_many_image_tokens"
    return None


class Row:
  """An open or closed row: its samples and their totals."""

  __slots__ = ("samples", "length", "num_images", "num_image_tokens", "group")

  def __init__(self, group: tuple[int, int] | None = None):
    self.samples: list = []
    self.length = self.num_images = self.num_image_tokens = 0
    self.group = group

  def add(self, sample: Packable) -> None:
    self.samples.append(sample)
    self.length += sample.length
    self.num_images += sample.num_images
    self.num_image_tokens += sample.num_image_tokens
    if self.group is None:
      self.group = sample.image_shape

  def keys(self) -> list:
    return [s.key for s in self.samples]


def _group_json(group):
  return None if group is None else [int(group[0]), int(group[1])]


def _group_from_json(group):
  return None if group is None else (int(group[0]), int(group[1]))


class RowPacker:
  """Best-fit packing over a window of open rows; closed rows queue per bucket (module doc)."""

  def __init__(self, spec: RowSpec):
    self.spec = spec
    self.open: list[Row] = []
    self.full: list[Row] = []

  def fits(self, row: Row, sample: Packable) -> bool:
    spec = self.spec
    if row.length + sample.length > spec.seq_len:
      return False
    if spec.pixel:
      shape = sample.image_shape
      if shape is not None and row.group is not None and shape != row.group:
        return False
      return row.num_images + sample.num_images <= spec.max_images
    return row.num_image_tokens + sample.num_image_tokens <= spec.max_image_tokens

  def add(self, sample: Packable) -> None:
    """Places one sample (the caller has checked spec.reject_reason)."""
    best, best_left = None, None
    for row in self.open:
      if self.fits(row, sample):
        left = self.spec.seq_len - row.length - sample.length
        if best is None or left < best_left:
          best, best_left = row, left
    if best is None:
      if len(self.open) >= self.spec.open_rows:
        fullest = max(range(len(self.open)), key=lambda i: (self.open[i].length, -i))
        self.full.append(self.open.pop(fullest))
      best = Row()
      self.open.append(best)
    best.add(sample)
    if best.length >= self.spec.seq_len:
      self.open.remove(best)
      self.full.append(best)

  def flush(self) -> None:
    """Closes every open row (end of a finite stream)."""
    self.full.extend(r for r in self.open if r.samples)
    self.open = []

  def take_batch(self, batch_rows: int) -> list[Row] | None:
    """`batch_rows` closed rows of one bucket (text-only rows fill in), oldest first, or None."""
    counts: dict = {}
    for row in self.full:
      counts[row.group] = counts.get(row.group, 0) + 1
    free = counts.get(None, 0)
    chosen, found = None, False
    for row in self.full:   # groups in order of their oldest queued row
      g = row.group
      if counts[g] + (free if g is not None else 0) >= batch_rows:
        chosen, found = g, True
        break
    if not found:
      return None
    picked, rest = [], []
    for row in self.full:
      if len(picked) < batch_rows and (row.group == chosen or row.group is None):
        picked.append(row)
      else:
        rest.append(row)
    self.full = rest
    return picked

  def state(self) -> dict:
    """Open and queued rows as sample keys (JSON-able)."""
    return dict(open=[[_group_json(r.group), r.keys()] for r in self.open],
                full=[[_group_json(r.group), r.keys()] for r in self.full])

  def load_state(self, state: dict, materialise: Callable[[Any], Packable | None]) -> None:
    """Rebuilds the rows of `state` with `materialise(key) -> sample` (None: drop the sample,
    e.g. its component left the mixture; rows left empty are dropped)."""
    def rows(entries):
      out = []
      for group, keys in entries:
        row = Row(_group_from_json(group))
        for key in keys:
          sample = materialise(key)
          if sample is not None:
            row.add(sample)
        if row.samples:
          out.append(row)
      return out
    self.open = rows(state["open"])
    self.full = rows(state["full"])


def assemble_batch(rows: Sequence[Row], spec: RowSpec,
                   batch_rows: int | None = None) -> dict[str, np.ndarray]:
  """The numpy batch of batch.py for `rows` (padded with empty rows up to `batch_rows`)."""
  b = batch_rows or len(rows)
  if len(rows) > b:
    raise ValueError(f"{len(rows)} rows do not fit a batch of {b}")
  L = spec.seq_len
  tokens = np.full((b, L), spec.pad_id, np.int32)
  targets = np.full((b, L), IGNORE, np.int32)
  segment_ids = np.zeros((b, L), np.int32)
  positions = np.zeros((b, L), np.int32)
  image_index = np.full((b, L), -1, np.int32)
  fm_mask = np.zeros((b, L), np.float32)
  num_images = np.zeros((b,), np.int32)
  if spec.pixel:
    groups = {r.group for r in rows if r.group is not None}
    if len(groups) > 1:
      raise ValueError(f"pixel-path batch mixes image shapes {sorted(groups)}")
    h, w = groups.pop() if groups else spec.image_shape
    images = np.zeros((b, spec.max_images, h, w, 3), np.float32)
  else:
    image_tokens = np.zeros((b, spec.max_image_tokens, spec.token_dim), np.float32)
  for r, row in enumerate(rows):
    pos, n_img, tok_off = 0, 0, 0
    for s_i, sample in enumerate(row.samples):
      n = sample.length
      sl = slice(pos, pos + n)
      tokens[r, sl] = sample.tokens
      targets[r, sl] = sample.targets
      segment_ids[r, sl] = s_i + 1
      positions[r, sl] = np.arange(n, dtype=np.int32)
      idx = sample.image_index
      image_index[r, sl] = np.where(idx >= 0, idx + tok_off, -1)
      fm_mask[r, sl] = sample.fm_mask
      for image in sample.images:
        if spec.pixel:
          px = image.payload
          if px.shape != (h, w, 3):
            raise ValueError(f"image of shape {px.shape} in a batch of {(h, w, 3)} pixels")
          images[r, n_img] = px.astype(np.float32) / 127.5 - 1.0 if px.dtype == np.uint8 else px
        else:
          t = image.num_tokens
          if image.payload.shape != (t, spec.token_dim):
            raise ValueError(f"image tokens of shape {image.payload.shape}, expected "
                             f"{(t, spec.token_dim)}")
          image_tokens[r, tok_off:tok_off + t] = image.payload
        n_img += 1
        tok_off += image.num_tokens
      pos += n
    num_images[r] = n_img
  batch = dict(tokens=tokens, targets=targets, segment_ids=segment_ids, positions=positions,
               image_index=image_index, fm_mask=fm_mask, num_images=num_images)
  if spec.pixel:
    batch["images"] = images
  else:
    batch["image_tokens"] = image_tokens
  return batch


def fill_fraction(batch: dict[str, np.ndarray]) -> float:
  """Non-pad fraction of a batch's positions (packing efficiency)."""
  return float(np.mean(np.asarray(batch["segment_ids"]) > 0))


def pack_lengths(samples: Sequence[Packable], spec: RowSpec) -> tuple[list[Row], float]:
  """Packs a finite list of samples (rejecting those that never fit) and returns the rows and
  the fill fraction over all rows (flushing the last open rows): for efficiency studies."""
  packer = RowPacker(spec)
  for s in samples:
    if spec.reject_reason(s) is None:
      packer.add(s)
  packer.flush()
  rows = packer.full
  used = sum(r.length for r in rows)
  return rows, used / max(1, len(rows) * spec.seq_len)
