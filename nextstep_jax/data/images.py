"""Images on the host: pixel conventions, image folders, single image files, grids.

Pixels are float32 in [-1, 1] everywhere inside the project (the VAE's range; ``batch.to_uint8`` and
``batch.from_uint8`` are the one conversion to and from 8-bit). ``load_images`` reads the
embedded digits or a folder of images (recursive; centre-cropped and resized), ``load_image`` one file.
"""

from __future__ import annotations

import glob
import math
import os

import numpy as np

from nextstep_jax.batch import as_rgb, from_uint8, to_uint8
from nextstep_jax.data import digits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


def _load_folder(directory: str, split: str, size: int, heldout_every: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Images of a folder (recursive), centre-cropped and resized to size x size, in [-1, 1].

  Documented conversions: grayscale is replicated to RGB; an alpha channel is composited over
  white (``batch.as_rgb``). Split: sorted files, every ``heldout_every``-th held out.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel  # optional
  files = sorted(p for p in glob.glob(os.path.join(directory, "**", "*"), recursive=True)
                 if p.lower().endswith(IMAGE_SUFFIXES))
  if not files:
    raise ValueError(f"data.source={directory!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
  keep = [i for i in range(len(files))
          if split == "all" or ((i % heldout_every == heldout_every - 1) == (split == "heldout"))]
  out = []
  for i in keep:
    with Image.open(files[i]) as im:
      im = im.convert("RGBA")
      w, h = im.size
      side = min(w, h)
      im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
      im = im.resize((size, size), Image.BICUBIC)
      out.append(from_uint8(np.asarray(im)))
  x = as_rgb(np.stack(out), background=1.0).astype(np.float32)
  return x, np.full((len(x),), -1, np.int32)


def load_images(source: str, split: str, image_size: int, heldout_every: int = 10
                ) -> tuple[np.ndarray, np.ndarray]:
  """(float32 (N, S, S, 3) in [-1, 1], int32 labels (N,), -1 when unknown) of a split
  ('train', 'heldout' or 'all')."""
  if split not in ("train", "heldout", "all"):
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
  if source == "digits":
    parts = ["train", "heldout"] if split == "all" else [split]
    imgs, labels = zip(*[digits.load_split(p) for p in parts])
    return digits.to_pixels(np.concatenate(imgs), size=image_size), np.concatenate(labels)
  if not os.path.isdir(source):
    raise ValueError(f"image source {source!r} is neither 'digits' nor a directory")
  return _load_folder(source, split, image_size, heldout_every)


def batch_indices(num: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Rows of the global batch of ``step``: a function of (seed, step) only, so resuming is exact."""
  rng = np.random.default_rng([seed, step])
  return rng.choice(num, size=batch_size, replace=batch_size > num)


def load_image(path: str, size: int) -> np.ndarray:
  """A PNG/JPEG as float32 (size, size, 3) in [-1, 1]; grayscale/RGBA/CMYK converted to RGB."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--image {path}: no such file")
  try:
    with Image.open(path) as im:
      im = im.convert("RGB").resize((size, size), Image.BICUBIC)
      x = np.asarray(im)
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"--image {path}: not a readable image ({e})") from e
  return from_uint8(x)


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
  """(N, H, W, C) or (H, W, C) or (H, W) uint8 -> one (H', W', C) uint8 image (a grid)."""
  x = np.asarray(images)
  if x.dtype != np.uint8:
    raise TypeError(f"images must be uint8, got {x.dtype}")
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim == 3:
    return x
  if x.ndim != 4:
    raise ValueError(f"images must be (H, W), (H, W, C) or (N, H, W, C), got shape {x.shape}")
  n, h, w, c = x.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = x[i]
  return grid


def recon_grid(originals: np.ndarray, reconstructions: np.ndarray, cols: int = 8) -> np.ndarray:
  """uint8 grid: rows of originals, each followed by the row of their reconstructions."""
  n = (len(originals) // cols) * cols or len(originals)
  cols = min(cols, n)
  rows = []
  for r in range(0, n, cols):
    rows.append(to_uint8(originals[r:r + cols]))
    rows.append(to_uint8(reconstructions[r:r + cols]))
  h, w = originals.shape[1:3]
  grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
  return grid.reshape(len(rows) * h, cols * w, -1)
