"""Preference pairs for DPO: the directory format, random access to it, and the pair batches.

A preference directory holds ``train.jsonl`` (and optionally ``heldout.jsonl``), one JSON object per
line {"prompt": str, "chosen": png path, "rejected": png path, "meta": {...}}, image paths relative to
the directory. ``write_preferences`` writes one split, ``PreferenceRecords`` reads one, and
``PreferenceIterator`` makes the pair batches of the DPO step: one global stream grouped by image
size, each process decoding its slice; exact resume through ``get_state`` / ``set_state``.

A batch of P pairs holds 2P rows, interleaved: row 2i is pair i's chosen sequence, row 2i + 1 its
rejected one, each ``prompt + image block + <eos>`` (data/sequences.py, one sample per row), so the
per-process batches concatenate into a global batch with the same layout.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from nextstep_jax.data.packing import Row, RowSpec, assemble_batch
from nextstep_jax.data.sequences import Image, SequenceBuilder

SPLITS = ("train", "heldout")
RECORD_FIELDS = ("prompt", "chosen", "rejected")
STATE_VERSION = 1


def split_file(directory: str, split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"preference split must be one of {SPLITS}, got {split!r}")
  return os.path.join(directory, f"{split}.jsonl")


def _to_rgb_u8(image: np.ndarray, what: str) -> np.ndarray:
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise ValueError(f"{what}: images must be uint8, got {a.dtype}")
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=-1)
  if a.ndim != 3 or a.shape[-1] not in (1, 3):
    raise ValueError(f"{what}: images must be (H, W), (H, W, 1) or (H, W, 3), got {a.shape}")
  return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def write_preferences(directory: str, split: str, prompts: Sequence[str], chosen: Sequence[np.ndarray],
                      rejected: Sequence[np.ndarray], meta: Sequence[dict] | None = None) -> str:
  """Writes one split of a preference set: PNGs under ``images/<split>/`` and ``<split>.jsonl``.

  chosen / rejected: uint8 images (H, W[, 3]), one pair per prompt (the two of a pair of one size).
  Returns the jsonl path; the file appears atomically (written aside, then renamed)."""
  n = len(prompts)
  if len(chosen) != n or len(rejected) != n or (meta is not None and len(meta) != n):
    raise ValueError(f"{n} prompts but {len(chosen)} chosen, {len(rejected)} rejected images"
                     + ("" if meta is None else f", {len(meta)} meta entries"))
  from PIL import Image as PILImage  # pylint: disable=import-outside-toplevel
  image_dir = os.path.join(directory, "images", split)
  os.makedirs(image_dir, exist_ok=True)
  path = split_file(directory, split)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for i in range(n):
      if not isinstance(prompts[i], str):
        raise ValueError(f"pair {i}: the prompt must be a string, got {type(prompts[i]).__name__}")
      c = _to_rgb_u8(chosen[i], f"pair {i} chosen")
      r = _to_rgb_u8(rejected[i], f"pair {i} rejected")
      if c.shape != r.shape:
        raise ValueError(f"pair {i}: chosen {c.shape} and rejected {r.shape} differ in size")
      rec = {"prompt": prompts[i], "chosen": f"images/{split}/{i:06d}_chosen.png",
             "rejected": f"images/{split}/{i:06d}_rejected.png"}
      PILImage.fromarray(c).save(os.path.join(directory, rec["chosen"]))
      PILImage.fromarray(r).save(os.path.join(directory, rec["rejected"]))
      if meta is not None:
        rec["meta"] = meta[i]
      f.write(json.dumps(rec) + "\n")
  os.replace(tmp, path)
  return path


class PreferenceRecords:
  """Random access to one split of a preference directory (format in the module docstring).

  The jsonl is read and checked when opened (every line a JSON object with string fields prompt,
  chosen, rejected; errors name file and line); images are read on access as uint8 RGB
  (H, W, 3), with errors naming the image file. ``record[i]`` -> {"prompt", "chosen", "rejected",
  "meta", "index"}."""

  def __init__(self, directory: str, split: str = "train"):
    self.directory = directory
    self.path = split_file(directory, split)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"preference file {self.path} does not exist (dpo.data={directory!r}: a "
                              "directory with train.jsonl, see nextstep_jax/dpo.py)")
    self.entries: list[dict] = []
    self._sizes: dict[int, tuple[int, int]] = {}
    with open(self.path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{self.path}:{lineno}"
        try:
          obj = json.loads(line)
        except ValueError as e:
          raise ValueError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(obj, dict):
          raise ValueError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
        for field in RECORD_FIELDS:
          if not isinstance(obj.get(field), str) or (field != "prompt" and not obj[field]):
            kind = "a string" if field == "prompt" else "a non-empty string (an image path)"
            raise ValueError(f"{where}: field {field!r} must be {kind}, got {obj.get(field)!r}")
        self.entries.append(obj)
    if not self.entries:
      raise ValueError(f"{self.path} holds no preference pairs")

  def __len__(self) -> int:
    return len(self.entries)

  def _image(self, rel: str, where: str) -> np.ndarray:
    from PIL import Image as PILImage  # pylint: disable=import-outside-toplevel
    path = rel if os.path.isabs(rel) else os.path.join(self.directory, rel)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{where}: image file {path} does not exist")
    try:
      with PILImage.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, ValueError) as e:
      raise ValueError(f"{where}: cannot read image {path} ({e})") from e

  def image_size(self, i: int) -> tuple[int, int]:
    """(H, W) of record i's chosen image, read from the file header only (no decoding)."""
    from PIL import Image as PILImage  # pylint: disable=import-outside-toplevel
    if i not in self._sizes:
      rel = self.entries[int(i)]["chosen"]
      path = rel if os.path.isabs(rel) else os.path.join(self.directory, rel)
      where = f"{self.path} record {int(i)}"
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image file {path} does not exist")
      try:
        with PILImage.open(path) as im:
          self._sizes[i] = (int(im.size[1]), int(im.size[0]))
      except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read image {path} ({e})") from e
    return self._sizes[i]

  def __getitem__(self, i: int) -> dict:
    e = self.entries[int(i)]
    where = f"{self.path} record {int(i)}"
    chosen, rejected = self._image(e["chosen"], where), self._image(e["rejected"], where)
    if chosen.shape != rejected.shape:
      raise ValueError(f"{where}: chosen {chosen.shape} and rejected {rejected.shape} images differ in size")
    return {"prompt": e["prompt"], "chosen": chosen, "rejected": rejected, "meta": e.get("meta", {}),
            "index": int(i)}


# Pair batches

def pair_row_spec(config, pad_id: int) -> RowSpec:
  """One sequence per row, one image per sequence (the pixel path: images encoded in the step)."""
  d = config.data
  return RowSpec(seq_len=int(d.seq_len), payload="images", max_images=1,
                 max_image_tokens=int(d.max_image_tokens), token_dim=int(config.image.token_dim),
                 image_shape=(int(d.image_size), int(d.image_size)), pad_id=pad_id)


class PairBuilder:
  """Preference record -> (chosen Sample, rejected Sample): ``prompt + image block + <eos>`` each, CE
  only on the response (the loss ignores CE; the rows follow the batch contract)."""

  def __init__(self, tokenizer, spec: RowSpec, unit: int):
    self.seq = SequenceBuilder(tokenizer, 0.0, loss_on_prompt=False)
    self.spec, self.unit = spec, int(unit)

  def reject_reason(self, prompt: str, size: tuple[int, int]) -> str | None:
    """Why a pair of this prompt and image size (H, W) cannot be a row (None when it can)."""
    if size[0] % self.unit or size[1] % self.unit:
      return "bad_image_size"
    grid = (size[0] // self.unit, size[1] // self.unit)
    if grid[0] * grid[1] > self.spec.max_image_tokens:
      return "too_many_image_tokens"
    length = len(self.seq.tok.encode(prompt)) + len(self.seq.image_block(grid)[0]) + 1
    return "too_long" if length > self.spec.seq_len else None

  def samples(self, record: dict) -> tuple:
    """The two Samples of a (usable) record."""
    img = record["chosen"]
    reason = self.reject_reason(record["prompt"], img.shape[:2])
    if reason is not None:
      raise ValueError(f"preference record {record.get('index')} cannot be used: {reason}")
    grid = (img.shape[0] // self.unit, img.shape[1] // self.unit)
    return tuple(self.seq.text_to_image(record["prompt"], Image(record[k], grid), key=[record["index"], j])
                 for j, k in enumerate(("chosen", "rejected")))


def pair_batch(pairs: Sequence[tuple], spec: RowSpec) -> dict[str, np.ndarray]:
  """The numpy batch of `pairs` (chosen, rejected) Samples: 2P rows, row 2i chosen, 2i + 1 rejected."""
  rows = []
  for pair in pairs:
    for sample in pair:
      row = Row()
      row.add(sample)
      rows.append(row)
  return assemble_batch(rows, spec, len(rows))


class PreferenceIterator:
  """Endless batches of preference pairs, one process's share of each global batch, exactly resumable.

  Every process walks the same global stream: epoch e visits the records in a permutation seeded by
  (seed, e); records are grouped by image size (a pixel batch holds one size; sizes come from the
  file headers), and a group that reaches ``pairs`` (global) records is the next global batch.
  Process p of P decodes and returns only its slice of it (pairs / P pairs, rows interleaved as in
  the module docstring), so the processes' batches always agree in shape. A record that cannot be a
  row (too long for data.seq_len, image size not a multiple of the token size, too many tokens) is
  skipped and counted. ``get_state()`` (JSON) holds the epoch, the position and the records waiting
  in each size group."""

  def __init__(self, records: PreferenceRecords, builder: PairBuilder, pairs: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    if pairs < 1 or pairs % process_count:
      raise ValueError(f"pairs per batch ({pairs}) must be a positive multiple of the {process_count} processes")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    self.records, self.builder, self.pairs, self.seed = records, builder, int(pairs), int(seed)
    self.local = self.pairs // int(process_count)
    self.first = int(process_index) * self.local   # this process's first pair of a global batch
    self.epoch, self.pos = 0, 0
    self.pending: dict[str, list[int]] = {}   # size group -> record indices waiting for a batch
    self.counters: dict[str, int] = {}
    self._order = self._epoch_order(0)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch, 0x44504F]).permutation(len(self.records))

  def _count(self, name: str) -> None:
    self.counters[name] = self.counters.get(name, 0) + 1

  def __iter__(self) -> "PreferenceIterator":
    return self

  def next_indices(self) -> list[int]:
    """The record indices of the next global batch (advances the stream)."""
    barren = 0
    while True:
      if self.pos >= len(self._order):
        self.epoch, self.pos = self.epoch + 1, 0
        self._order = self._epoch_order(self.epoch)
      index = int(self._order[self.pos])
      self.pos += 1
      size = self.records.image_size(index)
      reason = self.builder.reject_reason(self.records.entries[index]["prompt"], size)
      if reason is not None:
        self._count(f"skipped/{reason}")
        barren += 1
        if barren > 2 * len(self.records) + 1:
          raise RuntimeError(f"no usable preference pair in {self.records.path} (skipped: {self.counters}); "
                             "check data.seq_len and the image sizes")
        continue
      barren = 0
      name = f"{size[0]}x{size[1]}"
      group = self.pending.setdefault(name, [])
      group.append(index)
      if len(group) == self.pairs:
        del self.pending[name]
        self._count("batches")
        return group

  def __next__(self) -> dict[str, np.ndarray]:
    mine = self.next_indices()[self.first:self.first + self.local]
    return pair_batch([self.builder.samples(self.records[i]) for i in mine], self.builder.spec)

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "epoch": self.epoch, "pos": self.pos,
            "pending": {k: list(v) for k, v in self.pending.items()}, "counters": dict(self.counters),
            "seed": self.seed, "records": len(self.records)}

  def set_state(self, state: dict) -> None:
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"preference iterator state has version {state.get('version')}, this code reads "
                       f"{STATE_VERSION}")
    if state.get("records") != len(self.records):
      raise ValueError(f"the checkpointed preference iterator saw {state.get('records')} records, "
                       f"{self.records.path} now holds {len(self.records)}: the data changed")
    self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
    self.pending = {k: [int(i) for i in v] for k, v in state["pending"].items()}
    self.counters = dict(state.get("counters", {}))
    self._order = self._epoch_order(self.epoch)


def heldout_batches(records: PreferenceRecords, builder: PairBuilder, pairs: int, num_batches: int,
                    process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Fixed evaluation batches (this process's share): the first `num_batches` global batches of a
  seeded order (fewer when the split holds fewer pairs)."""
  it = PreferenceIterator(records, builder, pairs, seed=12345, process_index=process_index,
                          process_count=process_count)
  return [next(it) for _ in range(min(num_batches, max(len(records) // pairs, 1)))]


# Preference pairs for the embedded digits
# ------------------------------------------------------------------------------------------------
