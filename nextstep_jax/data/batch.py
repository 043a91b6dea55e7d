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
