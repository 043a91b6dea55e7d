"""Token sequences of the four sample kinds, exactly as SPEC §1 lays them out.

An image of an (h, w) token grid (h = H / (vae_factor * patch_size)) becomes the block
``<|image_area|> "{h}*{w}" <|begin_of_image|> <|image_placeholder|> x h*w <|end_of_image|>``.

- text-to-image ("pair"): ``caption + block + <eos>``; with probability ``drop_text_prob`` the
  order flips to ``block + caption + <eos>`` (unconditional generation and captioning from one
  stream; no null-caption token).
- editing ("edit"): ``[source blocks] + instruction + [target block] + <eos>``; only the last
  image gets flow-matching loss, source images are context.
- interleaved: text segments and image blocks in document order, ``+ <eos>``; every image gets loss.
- text-only: a document ``+ <eos>``, cut into chunks of at most the row length.

Targets are pre-shifted: ``targets[i]`` is the token at ``i + 1`` when position ``i`` gets CE, else
``IGNORE``. No CE where the next token is ``<|begin_of_image|>`` or an image placeholder (so the
BOI position and every image position but the last get none; the last image position predicts
``<|end_of_image|>``), and none at a sample's last position (never across a sample boundary).
``fm_mask[i] = 1`` at the image positions of images that get flow-matching loss.

SFT (``loss_on_prompt=False``, config ``data.loss_on_prompt``): the loss falls on the response
only. The prompt of a text-to-image sample is its caption, that of an editing sample its source
image blocks and instruction; the positions whose next token lies in the prompt get no CE (the
last prompt position still predicts ``<|image_area|>``, the response's first token), and source
images get no flow-matching loss as always. A flipped pair (image first: unconditional generation,
then captioning) and interleaved or text-only samples have no prompt and keep every loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from nextstep_jax.batch import IGNORE


@dataclasses.dataclass
class Image:
  """One image ready for a row buffer.

  payload: pixel path uint8 (H, W, 3) (converted to [-1, 1] floats when the batch is assembled),
  latent path float (h*w, d) patch tokens in raster order. grid: the (h, w) token grid.
  """
  payload: np.ndarray
  grid: tuple[int, int]

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]


@dataclasses.dataclass
class Sample:
  """One sample's token stream, never split across rows.

  tokens, targets: int32 (n,); image_index: int32 (n,) index of the image token at this position
  in the sample's own image tokens (image 0's tokens first), -1 on text; fm_mask: float32 (n,).
  key: a JSON-able identity from which the pipeline can rebuild the sample (for exact resume).
  """
  tokens: np.ndarray
  targets: np.ndarray
  image_index: np.ndarray
  fm_mask: np.ndarray
  images: list[Image]
  source: str = ""
  key: Any = None

  @property
  def length(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def num_images(self) -> int:
    return len(self.images)

  @property
  def num_image_tokens(self) -> int:
    return sum(im.num_tokens for im in self.images)

  @property
  def image_shape(self) -> tuple[int, int] | None:
    """Pixel (H, W) of the images (pixel path; None for text-only or token payloads)."""
    if not self.images or self.images[0].payload.ndim != 3:
      return None
    return tuple(self.images[0].payload.shape[:2])  # type: ignore[return-value]


class SequenceBuilder:
  """Builds `Sample`s from texts and `Image`s with one tokenizer (see module docstring)."""

  def __init__(self, tokenizer, drop_text_prob: float = 0.0, loss_on_prompt: bool = True):
    if not 0.0 <= drop_text_prob <= 1.0:
      raise ValueError(f"drop_text_prob must be in [0, 1], got {drop_text_prob}")
    self.tok = tokenizer
    self.drop_text_prob = float(drop_text_prob)
    self.loss_on_prompt = bool(loss_on_prompt)
    self.eos = tokenizer.eos_id
    self.area, self.boi, self.eoi = tokenizer.area_id, tokenizer.boi_id, tokenizer.eoi_id
    self.placeholder = tokenizer.placeholder_id
    self._area_cache: dict[tuple[int, int], list[int]] = {}

  # -- pieces -----------------------------------------------------------------------------------

  def area_text_ids(self, grid: tuple[int, int]) -> list[int]:
    """Ids of the plain text ``"{h}*{w}"``."""
    if grid not in self._area_cache:
      self._area_cache[grid] = self.tok.encode(f"{grid[0]}*{grid[1]}")
    return self._area_cache[grid]

  def image_block(self, grid: tuple[int, int]) -> tuple[list[int], int]:
    """(ids of the whole block, offset of the first placeholder inside it)."""
    head = [self.area] + self.area_text_ids(grid) + [self.boi]
    return head + [self.placeholder] * (grid[0] * grid[1]) + [self.eoi], len(head)

  def _assemble(self, parts: Sequence[tuple], source: str = "", key: Any = None,
                prompt_parts: int = 0) -> Sample:
    """parts: ("text", str) | ("image", Image, loss: bool); an <eos> is appended. The first
    `prompt_parts` parts are the prompt: without loss_on_prompt no CE predicts their tokens."""
    ids: list[int] = []
    image_slots: list[tuple[int, int, bool]] = []   # (start position, tokens, loss)
    images: list[Image] = []
    prompt_len = 0
    for j, part in enumerate(parts):
      if part[0] == "text":
        if part[1]:
          ids += self.tok.encode(part[1])
      elif part[0] == "image":
        image, loss = part[1], bool(part[2])
        block, offset = self.image_block(image.grid)
        image_slots.append((len(ids) + offset, image.num_tokens, loss))
        images.append(image)
        ids += block
      else:
        raise ValueError(f"unknown sequence part {part[0]!r}")
      if j < prompt_parts:
        prompt_len = len(ids)
    ids.append(self.eos)
    tokens = np.asarray(ids, np.int32)
    sample = self._finish(tokens, image_slots, images, source, key)
    if not self.loss_on_prompt and prompt_len > 1:
      # Position i predicts token i + 1: positions 0 .. prompt_len - 2 predict prompt tokens.
      sample.targets[:prompt_len - 1] = IGNORE
    return sample

  def _finish(self, tokens: np.ndarray, image_slots, images, source, key) -> Sample:
    n = tokens.shape[0]
    targets = np.full((n,), IGNORE, np.int32)
    if n > 1:
      nxt = tokens[1:]
      ce = (nxt != self.boi) & (nxt != self.placeholder)
      targets[:-1] = np.where(ce, nxt, IGNORE)
    image_index = np.full((n,), -1, np.int32)
    fm_mask = np.zeros((n,), np.float32)
    flat = 0
    for start, count, loss in image_slots:
      image_index[start:start + count] = np.arange(flat, flat + count, dtype=np.int32)
      if loss:
        fm_mask[start:start + count] = 1.0
      flat += count
    return Sample(tokens, targets, image_index, fm_mask, list(images), source, key)

  # -- the four kinds ---------------------------------------------------------------------------

  def text_to_image(self, caption: str, image: Image, flip: bool = False, **kw) -> Sample:
    """caption + block + <eos>, or block + caption + <eos> when `flip` (drop_text)."""
    if flip:
      return self._assemble([("image", image, True), ("text", caption)], **kw)
    return self._assemble([("text", caption), ("image", image, True)], prompt_parts=1, **kw)

  def edit(self, sources: Sequence[Image], instruction: str, target: Image, **kw) -> Sample:
    """[source blocks] + instruction + [target block] + <eos>; FM loss on the target only."""
    parts = [("image", s, False) for s in sources] + [("text", instruction), ("image", target, True)]
    return self._assemble(parts, prompt_parts=len(sources) + 1, **kw)

  def interleaved(self, segments: Sequence[str | Image], **kw) -> Sample:
    """Texts and images in document order + <eos>; FM loss on every image."""
    parts = [("image", s, True) if isinstance(s, Image) else ("text", s) for s in segments]
    return self._assemble(parts, **kw)

  def text_chunks(self, text: str, max_len: int, min_len: int = 2, **kw) -> list[Sample]:
    """document + <eos>, cut into chunks of at most `max_len` tokens (shorter than `min_len`:
    dropped). Each chunk is its own sample; key gets the chunk index appended."""
    ids = self.tok.encode(text) + [self.eos]
    key = kw.pop("key", None)
    out = []
    for j, start in enumerate(range(0, len(ids), max_len)):
      chunk = np.asarray(ids[start:start + max_len], np.int32)
      if chunk.shape[0] >= min_len:
        chunk_key = None if key is None else list(key) + [j]
        out.append(self._finish(chunk, [], [], kw.get("source", ""), chunk_key))
    return out

  def flip(self, rng: np.random.Generator) -> bool:
    """The drop_text coin for one text-to-image sample."""
    return bool(self.drop_text_prob > 0 and rng.random() < self.drop_text_prob)

  def from_record(self, record: dict, images: Sequence[Image], rng: np.random.Generator,
                  max_len: int, source: str = "", key: Any = None) -> list[Sample]:
    """Samples of one record (see digits.DigitRecords / sources for the record layout), with
    its images already prepared. Text records may give several chunks, the others one sample."""
    kind = record.get("kind")
    kw = dict(source=source, key=key)
    if kind == "text":
      return self.text_chunks(record["text"], max_len, **kw)
    if kind == "pair":
      if len(images) != 1:
        raise ValueError(f"pair record needs exactly one image, got {len(images)}")
      return [self.text_to_image(record["caption"], images[0], self.flip(rng), **kw)]
    if kind == "edit":
      if len(images) < 2:
        raise ValueError(f"edit record needs a source and a target image, got {len(images)}")
      return [self.edit(images[:-1], record["instruction"], images[-1], **kw)]
    if kind == "interleaved":
      segments = []
      for seg in record["segments"]:
        if isinstance(seg, str):
          segments.append(seg)
        else:
          if not 0 <= int(seg) < len(images):
            raise ValueError(f"interleaved segment refers to image {seg}, record has {len(images)}")
          segments.append(images[int(seg)])
      return [self.interleaved(segments, **kw)]
    raise ValueError(f"unknown record kind {kind!r}")
