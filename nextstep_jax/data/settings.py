"""The data pipeline's settings: config.data / config.image read and validated into ``DataSettings``
(the fields and their defaults: ``nextstep_jax/config.py:base_config``); the pipeline itself is
``data/mixture.py``."""

from __future__ import annotations

import dataclasses
import os

from nextstep_jax import storage
from nextstep_jax.data import sources as sources_lib
from nextstep_jax.data.packing import RowSpec
from nextstep_jax.errors import UserError


COMPONENTS = ("text", "pair", "edit", "interleaved")


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Everything the pipeline reads from a config, validated."""
  source: str
  batch_size: int          # global rows
  local_batch: int         # rows per process
  seq_len: int
  ratios: dict
  image_size: int
  unit: int                # pixels per token side: vae_factor * patch_size
  token_dim: int
  min_image_tokens: int
  max_image_tokens: int
  sides: tuple             # base grid sides of the area range (sources.area_sides)
  payload: str
  max_images: int
  max_row_image_tokens: int
  drop_text_prob: float
  num_workers: int
  num_threads: int
  seed: int
  open_rows: int
  workdir: str
  loss_on_prompt: bool = True   # False (SFT): no CE on captions / instructions (sequences.py)

  @property
  def pixel(self) -> bool:
    return self.payload == "images"

  def row_spec(self, pad_id: int) -> RowSpec:
    return RowSpec(seq_len=self.seq_len, payload=self.payload, max_images=self.max_images,
                   max_image_tokens=self.max_row_image_tokens, token_dim=self.token_dim,
                   image_shape=(self.image_size, self.image_size), pad_id=pad_id,
                   open_rows=self.open_rows)


def normalise_ratios(ratios) -> dict[str, float]:
  """Component -> share (positive ones only, summing to 1); clear errors for bad ratio tables."""
  ratios = dict(ratios)
  unknown = sorted(set(ratios) - set(COMPONENTS))
  if unknown:
    raise ValueError(f"data.ratios has unknown components {unknown}; known: {COMPONENTS}")
  for name, v in ratios.items():
    if not isinstance(v, (int, float)) or v < 0 or v != v:
      raise ValueError(f"data.ratios.{name} must be a non-negative number, got {v!r}")
  total = float(sum(ratios.values()))
  if total <= 0:
    raise ValueError(f"data.ratios must have a positive entry, got {ratios}")
  return {n: float(ratios[n]) / total for n in COMPONENTS if ratios.get(n, 0) > 0}


def present_ratios(ratios, source: str, renormalize: bool = False) -> dict[str, float]:
  """The shares of the kinds with a positive ratio (``normalise_ratios``), checked against the
  records under a data directory `source` (its train split): a kind with a positive ratio but no
  records is refused, naming the kind and the directory, unless `renormalize` (data.renormalize),
  which shares the ratios out over the kinds present instead."""
  shares = normalise_ratios(ratios)
  if source == "digits":
    return shares
  if not os.path.isdir(source):
    raise FileNotFoundError(f"data.source {source} is not a directory (nor 'digits'); write one "
                            "with python -m nextstep_jax.data prepare --input=... --out=DIR")
  present = sources_lib.available_kinds(source, "train")
  absent = [k for k in shares if k not in present]
  if not absent:
    return shares
  found = ", ".join(present) or "none"
  if not renormalize:
    k = absent[0]
    raise UserError(
        f"data.ratios.{k}={dict(ratios)[k]} but data.source {source} holds no {k} records "
        f"({sources_lib.record_dir(source, k)}; kinds found: {found}): prepare them "
        f"(python -m nextstep_jax.data prepare --kind={k} ...), set data.ratios.{k}=0, or set "
        "data.renormalize=True to share the ratios out over the kinds present")
  kept = {k: v for k, v in dict(ratios).items() if k in present and v > 0}
  if not kept:
    raise UserError(f"data.source {source} holds records of none of the kinds with a positive "
                    f"ratio ({', '.join(shares)}; kinds found: {found})")
  return normalise_ratios(kept)


def data_settings(config, process_count: int = 1, workdir: str | None = None) -> DataSettings:
  """Reads and validates config.data / config.image (errors name the field; the fields and their
  defaults: ``nextstep_jax/config.py:base_config``). `workdir`: the run's work directory, which holds
  the data cache (default ``config.workdir``). A remote ``data.source`` (gs://, s3://) is read from its
  copy in this host's cache (``storage.local_input``), which ``source`` then names."""
  d, im = config.data, config.image
  unit = int(im.vae_factor) * int(im.patch_size)
  token_dim = int(im.token_dim)
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}")
  if d.batch_size % process_count:
    raise ValueError(f"data.batch_size ({d.batch_size}) must be divisible by the process count "
                     f"({process_count})")
  if d.seq_len < 8:
    raise ValueError(f"data.seq_len must be at least 8, got {d.seq_len}")
  if d.payload not in ("images", "image_tokens"):
    raise ValueError(f"data.payload must be 'images' or 'image_tokens', got {d.payload!r}")
  if not d.source:
    raise ValueError("data.source is empty: 'digits' or a directory written by python -m "
                     "nextstep_jax.data prepare")
  source = str(d.source)
  if storage.is_remote(source):  # the records copied into this host's cache once, read from there
    source = storage.local_input(source, "data.source")
  sides = sources_lib.area_sides(int(d.min_image_tokens), int(d.max_image_tokens))
  if d.source == "digits" or d.payload == "images":
    if d.image_size % unit:
      raise ValueError(f"data.image_size ({d.image_size}) must be a multiple of vae_factor * "
                       f"patch_size ({unit})")
  if d.source == "digits":
    per_image = (d.image_size // unit) ** 2
    if not d.min_image_tokens <= per_image <= d.max_image_tokens:
      raise ValueError(f"digits of {d.image_size} px make {per_image} tokens per image, outside "
                       f"data.min_image_tokens..max_image_tokens ({d.min_image_tokens}.."
                       f"{d.max_image_tokens})")
  return DataSettings(
      source=source, batch_size=int(d.batch_size),
      local_batch=int(d.batch_size) // process_count, seq_len=int(d.seq_len),
      ratios=present_ratios(d.ratios, source, bool(d.renormalize)),
      image_size=int(d.image_size), unit=unit,
      token_dim=token_dim, min_image_tokens=int(d.min_image_tokens),
      max_image_tokens=int(d.max_image_tokens), sides=sides, payload=str(d.payload),
      max_images=int(d.max_images), max_row_image_tokens=int(d.max_row_image_tokens),
      drop_text_prob=float(d.drop_text_prob), num_workers=int(d.num_workers),
      num_threads=int(d.num_threads), seed=int(d.seed), open_rows=int(d.pack_open_rows),
      workdir=str(workdir or config.workdir or ""), loss_on_prompt=bool(d.loss_on_prompt))
