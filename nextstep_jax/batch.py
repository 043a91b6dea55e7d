"""The packed batch: the one contract between the data pipeline and the train step.

Every array has a fixed shape for a given config, so the jitted step never recompiles.
B = rows (local to the process when produced by the pipeline, global inside the step),
L = ``data.seq_len``, d = token dim (= latent_channels * patch_size**2),
M = ``data.max_image_tokens`` (flat buffer of image tokens per row),
N = ``data.max_images`` (pixel path only), H, W = image size (pixel path only).

Keys (all numpy on the host, jax.Array inside the step):
  tokens        int32   (B, L)   token ids; image positions hold ``<|image_placeholder|>``,
                                 padding holds ``[PAD]``.
  targets       int32   (B, L)   next-token target for the CE loss at each position
                                 (pre-shifted, never across a sample boundary);
                                 IGNORE (-100) where there is no CE.
  segment_ids   int32   (B, L)   1, 2, ... per packed sample; 0 on padding.
  positions     int32   (B, L)   RoPE positions, restarting at 0 for every sample.
  image_index   int32   (B, L)   index of the image token at this position in the row's
                                 image-token buffer; -1 on text and padding.
  fm_mask       float32 (B, L)   1 where the image token at this position gets FM loss
                                 (its condition is the hidden state at position - 1).
Exactly one image payload:
  image_tokens  float32 (B, M, d)        latent path: image tokens (patchified latents),
                                         zero where unused.
  images        float32 (B, N, H, W, 3)  pixel path: pixels in [-1, 1]; the frozen VAE
                                         encodes them inside the step; image n's token j
                                         (raster order) is buffer index n * T + j, with
                                         T = tokens per image.
Counters (int32 (B,)), informational: ``num_images``.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -100

TEXT_KEYS = ("tokens", "targets", "segment_ids", "positions", "image_index", "fm_mask")
PAYLOAD_KEYS = ("image_tokens", "images")


def validate_batch(batch: dict, seq_len: int | None = None) -> None:
  """Raises ValueError naming the key when a batch breaks the contract above."""
  missing = [k for k in TEXT_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch is missing keys {missing}; has {sorted(batch)}")
  payload = [k for k in PAYLOAD_KEYS if k in batch]
  if len(payload) != 1:
    raise ValueError(f"batch must carry exactly one of {PAYLOAD_KEYS}, has {payload}")
  shape = np.shape(batch["tokens"])
  if len(shape) != 2:
    raise ValueError(f"batch['tokens'] must be (B, L), got shape {shape}")
  if seq_len is not None and shape[1] != seq_len:
    raise ValueError(f"batch['tokens'] has length {shape[1]}, config data.seq_len is {seq_len}")
  for k in TEXT_KEYS:
    if np.shape(batch[k]) != shape:
      raise ValueError(f"batch[{k!r}] has shape {np.shape(batch[k])}, expected {shape}")
  if "image_tokens" in batch and np.ndim(batch["image_tokens"]) != 3:
    raise ValueError(f"batch['image_tokens'] must be (B, M, d), got {np.shape(batch['image_tokens'])}")
  if "images" in batch and np.ndim(batch["images"]) != 5:
    raise ValueError(f"batch['images'] must be (B, N, H, W, C), got {np.shape(batch['images'])}")


def padded_chunks(array: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
  """(real rows, chunk) over `array` in chunks of exactly `batch_size` rows, the last one padded by
  repeating its last row: a jitted function over them never recompiles."""
  n = len(array)
  if n == 0 or batch_size < 1:
    raise ValueError(f"padded_chunks needs rows and a positive batch size (got {n} rows, {batch_size})")
  for start in range(0, n, batch_size):
    chunk = array[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
    yield real, chunk


# ------------------------------------------------------------------------------------------------
# Pixels: float32 in [-1, 1] in every batch and inside the project; 8-bit only at the borders.
# ------------------------------------------------------------------------------------------------

def to_uint8(images) -> np.ndarray:
  """[-1, 1] pixels -> uint8 [0, 255] (clipped, rounded)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images_u8) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return np.asarray(images_u8, np.float32) / 127.5 - 1.0


def as_rgb(images: np.ndarray | jax.Array, background: float = 1.0) -> np.ndarray | jax.Array:
  """The documented conversion of non-RGB pixels in [-1, 1] to (B, H, W, 3).

  (B, H, W) or (B, H, W, 1) grayscale: replicated to three channels.
  (B, H, W, 4) RGBA: alpha (also in [-1, 1]) composited over a flat ``background`` value
  (1.0 = white, as PIL's RGBA -> RGB on white). (B, H, W, 3) passes through.
  """
  xp = jnp if isinstance(images, jax.Array) else np
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W[, C]), got shape {tuple(images.shape)}")
  c = images.shape[-1]
  if c == 3:
    return images
  if c == 1:
    return xp.repeat(images, 3, axis=-1)
  if c == 4:
    alpha = (images[..., 3:] + 1.0) / 2.0
    return images[..., :3] * alpha + background * (1.0 - alpha)
  raise ValueError(f"cannot convert images with {c} channels to RGB (expected 1, 3 or 4)")
