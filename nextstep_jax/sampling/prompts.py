"""Prompts for the sampler: token rows, left-padded into buckets, with the image prefix and, for
editing, the source image's tokens (the batch contract of ``nextstep_jax/batch.py``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, Union

import jax
import numpy as np



class TokenizerLike(Protocol):
  """What sampling needs from a tokenizer (``nextstep_jax.data.tokenizer.Tokenizer`` has it)."""

  special: dict[str, int]

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def pad_id(self) -> int: ...


def special_id(tokenizer: Any, name: str) -> int:
  special = getattr(tokenizer, "special", None)
  if not isinstance(special, dict) or name not in special:
    raise ValueError(f"tokenizer {tokenizer!r} has no special token {name!r} in its `special` map")
  return int(special[name])


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Prompt:
  """A batch of left-padded prompts.

  tokens (B, P) int32; mask (B, P) 1 on real tokens, 0 on the left padding; optional source-image
  tokens image_tokens (B, M, d) with image_index (B, P) (buffer index at image positions, -1
  elsewhere; the token id there is ignored).
  """
  tokens: np.ndarray
  mask: np.ndarray
  image_tokens: np.ndarray | None = None
  image_index: np.ndarray | None = None


PromptLike = Union[Prompt, np.ndarray, jax.Array, tuple]


def as_prompt(p: PromptLike, *, pad_id: int = 0, image_tokens=None, image_index=None,
              name: str = "prompt") -> Prompt:
  """A Prompt from a Prompt, a (tokens, mask) pair, or bare tokens (mask = tokens != pad_id);
  checks shapes and the left padding, naming `name` in errors."""
  if isinstance(p, Prompt):
    if image_tokens is not None or image_index is not None:
      p = dataclasses.replace(p, image_tokens=image_tokens if image_tokens is not None else p.image_tokens,
                              image_index=image_index if image_index is not None else p.image_index)
  elif isinstance(p, tuple):
    if len(p) != 2:
      raise ValueError(f"{name}: a tuple prompt must be (tokens, mask), got {len(p)} items")
    p = Prompt(np.asarray(p[0]), np.asarray(p[1]), image_tokens, image_index)
  else:
    tokens = np.asarray(p)
    p = Prompt(tokens, tokens != pad_id, image_tokens, image_index)
  tokens = np.asarray(p.tokens)
  mask = np.asarray(p.mask).astype(bool)
  if tokens.ndim != 2:
    raise ValueError(f"{name}: tokens must be (B, P), got shape {tokens.shape}")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{name}: tokens must be integers, got {tokens.dtype}")
  if mask.shape != tokens.shape:
    raise ValueError(f"{name}: mask has shape {mask.shape}, tokens {tokens.shape}")
  for r in range(tokens.shape[0]):
    real = np.flatnonzero(mask[r])
    if real.size == 0:
      raise ValueError(f"{name}: row {r} has no real token")
    if real[0] + real.size != tokens.shape[1]:
      raise ValueError(f"{name}: row {r} is not left-padded (real tokens must be contiguous and end "
                       f"at the last position)")
  img, index = p.image_tokens, p.image_index
  if (img is None) != (index is None):
    raise ValueError(f"{name}: image_tokens and image_index go together")
  if img is not None:
    img = np.asarray(img, np.float32)
    index = np.asarray(index)
    if img.ndim != 3 or img.shape[0] != tokens.shape[0]:
      raise ValueError(f"{name}: image_tokens must be (B={tokens.shape[0]}, M, d), got {img.shape}")
    if index.shape != tokens.shape:
      raise ValueError(f"{name}: image_index has shape {index.shape}, tokens {tokens.shape}")
    if index.max(initial=-1) >= img.shape[1]:
      raise ValueError(f"{name}: image_index points past the {img.shape[1]} image tokens")
    if np.any((index >= 0) & ~mask):
      raise ValueError(f"{name}: image_index marks padding positions")
    index = index.astype(np.int32)
  return Prompt(tokens.astype(np.int32), mask, img, index)


def image_prefix_ids(tokenizer: TokenizerLike, h: int, w: int) -> list[int]:
  """``<|image_area|>{h}*{w}<|begin_of_image|>`` (SPEC §1) as ids."""
  return ([special_id(tokenizer, "<|image_area|>")] + list(tokenizer.encode(f"{h}*{w}"))
          + [special_id(tokenizer, "<|begin_of_image|>")])


def image_prompt_ids(tokenizer: TokenizerLike, text: str, h: int, w: int) -> list[int]:
  """Caption then the image prefix: the prompt of one text-to-image row."""
  return list(tokenizer.encode(text)) + image_prefix_ids(tokenizer, h, w)


def bucket_length(n: int, bucket: int) -> int:
  """n rounded up to a multiple of `bucket` (bucket <= 0: n itself)."""
  return n if bucket <= 0 else -(-n // bucket) * bucket


def pad_prompts(rows: Sequence[Sequence[int]], *, pad_id: int, length: int | None = None,
                bucket: int = 32) -> Prompt:
  """Left-pads id lists to one length (given, or the longest rounded up to `bucket`)."""
  if not rows:
    raise ValueError("pad_prompts needs at least one row")
  longest = max(len(r) for r in rows)
  length = length if length is not None else bucket_length(longest, bucket)
  if longest > length:
    raise ValueError(f"a prompt has {longest} tokens, more than the length {length}")
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for r, ids in enumerate(rows):
    if len(ids):
      tokens[r, length - len(ids):] = ids
      mask[r, length - len(ids):] = True
  return Prompt(tokens, mask)


def image_prompts(tokenizer: TokenizerLike, texts: Sequence[str], h: int, w: int, *,
                  negative: str | Sequence[str] | None = "", bucket: int = 32
                  ) -> tuple[Prompt, Prompt | None]:
  """(conditional, negative) prompts for ``sample_images``: each text (and the negative text, ""
  by default; None for no guidance) followed by the image prefix, left-padded to a bucket."""
  cond = pad_prompts([image_prompt_ids(tokenizer, t, h, w) for t in texts], pad_id=tokenizer.pad_id,
                     bucket=bucket)
  if negative is None:
    return cond, None
  negs = [negative] * len(texts) if isinstance(negative, str) else list(negative)
  if len(negs) != len(texts):
    raise ValueError(f"{len(negs)} negative prompts for {len(texts)} prompts")
  neg = pad_prompts([image_prompt_ids(tokenizer, t, h, w) for t in negs], pad_id=tokenizer.pad_id,
                    bucket=bucket)
  return cond, neg


def stack_groups(prompts: Sequence[Prompt]) -> dict[str, np.ndarray | None]:
  """Stacks G prompt groups of B rows into (G*B, P) arrays, left-padding all to the longest."""
  b = prompts[0].tokens.shape[0]
  for g, p in enumerate(prompts):
    if p.tokens.shape[0] != b:
      raise ValueError(f"prompt group {g} has {p.tokens.shape[0]} rows, group 0 has {b}")
  length = max(p.tokens.shape[1] for p in prompts)
  with_img = [p for p in prompts if p.image_tokens is not None]
  m = max((p.image_tokens.shape[1] for p in with_img), default=0)
  d = with_img[0].image_tokens.shape[2] if with_img else 0
  for p in with_img:
    if p.image_tokens.shape[2] != d:
      raise ValueError(f"prompt image tokens have dims {p.image_tokens.shape[2]} and {d}")
  toks, masks, imgs, idxs = [], [], [], []
  for p in prompts:
    pad = length - p.tokens.shape[1]
    toks.append(np.pad(p.tokens, ((0, 0), (pad, 0))))
    masks.append(np.pad(p.mask, ((0, 0), (pad, 0))))
    if with_img:
      if p.image_tokens is None:
        imgs.append(np.zeros((b, m, d), np.float32))
        idxs.append(np.full((b, length), -1, np.int32))
      else:
        imgs.append(np.pad(p.image_tokens, ((0, 0), (0, m - p.image_tokens.shape[1]), (0, 0))))
        idxs.append(np.pad(p.image_index, ((0, 0), (pad, 0)), constant_values=-1))
  out = {"tokens": np.concatenate(toks), "mask": np.concatenate(masks).astype(np.int32),
         "image_tokens": np.concatenate(imgs) if with_img else None,
         "image_index": np.concatenate(idxs) if with_img else None}
  return out


def edit_prompts(tokenizer, source_tokens: np.ndarray, instruction: str, negative: str, h: int, w: int):
  """The three prompt groups of editing for one source image (T, d), each a batch of one row."""
  t = source_tokens.shape[0]
  block = (image_prefix_ids(tokenizer, h, w) + [tokenizer.placeholder_id] * t + [tokenizer.eoi_id])

  def with_image(text: str) -> Prompt:
    ids = block + image_prompt_ids(tokenizer, text, h, w)
    index = [-1] * len(ids)
    start = len(image_prefix_ids(tokenizer, h, w))
    index[start:start + t] = range(t)
    p = pad_prompts([ids], pad_id=tokenizer.pad_id)
    full = np.full(p.tokens.shape, -1, np.int32)
    full[0, p.tokens.shape[1] - len(ids):] = index
    return Prompt(p.tokens, p.mask, source_tokens[None].astype(np.float32), full)

  neg_only = pad_prompts([image_prompt_ids(tokenizer, negative, h, w)], pad_id=tokenizer.pad_id)
  return with_image(instruction), with_image(negative), neg_only
