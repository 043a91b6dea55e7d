"""The named weighted mixture of the input pipeline (stage 2 of ``data/mixture.py``).

``NamedMixMapDataset``: global position k -> (component, ordinal n) -> that component's record n.
Positions come in blocks of ``MIX_BLOCK``; every block holds each component's exact quota of the
stage ratios (largest remainder), in a seeded random order, so realised shares match the ratios to
1/MIX_BLOCK. The mapping is pure index arithmetic (``MixSchedule``), re-anchored when a checkpoint
is restored under different ratios.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from typing import Any

import grain
import numpy as np


MIX_BLOCK = 1000
_log = logging.getLogger(__name__)


def block_quotas(weights: dict[str, float], block: int = MIX_BLOCK) -> dict[str, int]:
  """Records per component in one block: floor(w * block), remainders by largest fraction."""
  names = list(weights)
  raw = np.array([weights[n] * block for n in names])
  q = np.floor(raw).astype(np.int64)
  order = sorted(range(len(names)), key=lambda i: (-(raw[i] - q[i]), i))
  for i in order[:block - int(q.sum())]:
    q[i] += 1
  return {n: int(v) for n, v in zip(names, q)}


class MixSchedule:
  """Global position k -> (component, ordinal n), anchored at (anchor_k, anchor_counts).

  Position k >= anchor_k is offset r = k - anchor_k in block r // block. Each block holds every
  component's quota in a random order seeded by (seed, anchor_k, block index), so
  n = anchor_counts[c] + blocks_before * quota[c] + (earlier positions of c in the block).
  """

  def __init__(self, weights: dict[str, float], seed: int, anchor_k: int = 0,
               anchor_counts: dict[str, int] | None = None, block: int = MIX_BLOCK):
    if not weights:
      raise ValueError("the mixture needs at least one component with a positive ratio")
    self.weights = dict(weights)
    self.names = tuple(weights)
    self.seed, self.block = int(seed), int(block)
    self.quota = block_quotas(self.weights, self.block)
    self.anchor_k = int(anchor_k)
    self.anchor_counts = {n: 0 for n in self.names}
    self.anchor_counts.update({n: int(v) for n, v in (anchor_counts or {}).items()})
    self._cache: dict = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(component index per position, ordinal among that component's positions in the block)."""
    key = (self.anchor_k, b)
    with self._lock:
      hit = self._cache.get(key)
    if hit is not None:
      return hit
    counts = np.array([self.quota[n] for n in self.names])
    sel = np.repeat(np.arange(len(self.names)), counts)
    rng = np.random.default_rng([self.seed, self.anchor_k, b, 0x6D6978])
    sel = rng.permutation(sel)
    within = np.zeros(self.block, np.int64)
    for c in range(len(self.names)):
      idx = np.flatnonzero(sel == c)
      within[idx] = np.arange(idx.size)
    with self._lock:
      if len(self._cache) >= 16:
        self._cache.clear()
      self._cache[key] = (sel, within)
    return sel, within

  def select(self, k: int) -> tuple[str, int]:
    r = int(k) - self.anchor_k
    if r < 0:
      raise IndexError(f"mixture position {k} precedes the anchor {self.anchor_k}")
    b, o = divmod(r, self.block)
    sel, within = self._block(b)
    name = self.names[int(sel[o])]
    return name, self.anchor_counts[name] + b * self.quota[name] + int(within[o])

  def counts_at(self, k: int) -> dict[str, int]:
    """Records of each component at global positions anchor_k..k-1 plus the anchor counts."""
    r = int(k) - self.anchor_k
    if r < 0:
      raise IndexError(f"mixture position {k} precedes the anchor {self.anchor_k}")
    b, o = divmod(r, self.block)
    sel, _ = self._block(b)
    out = dict(self.anchor_counts)
    for c, n in enumerate(self.names):
      out[n] = out.get(n, 0) + b * self.quota[n] + int(np.count_nonzero(sel[:o] == c))
    return out

  def rebase(self, anchor_k: int, anchor_counts: dict[str, int]) -> None:
    self.anchor_k = int(anchor_k)
    self.anchor_counts = {n: 0 for n in self.names}
    self.anchor_counts.update({n: int(v) for n, v in anchor_counts.items()})
    with self._lock:
      self._cache.clear()

  def state(self) -> dict:
    return dict(weights=dict(self.weights), anchor_k=self.anchor_k,
                anchor_counts=dict(self.anchor_counts), block=self.block)


@dataclasses.dataclass
class MixItem:
  """One position of the mixed stream: component, its record ordinal n, global position k."""
  name: str
  n: int
  k: int
  record: Any = None
  error: str | None = None


class NamedMixMapDataset(grain.MapDataset):
  """Infinite random-access mixture of named per-source MapDatasets (module docstring).

  Not strictly immutable: the pipeline's iterator re-anchors the schedule on restore.
  """

  def __init__(self, parents: dict[str, grain.MapDataset], schedule: MixSchedule):
    missing = [n for n in schedule.names if n not in parents]
    if missing:
      raise ValueError(f"mixture components {missing} have a positive ratio but no source")
    super().__init__([parents[n] for n in schedule.names])
    self.sources = {n: parents[n] for n in schedule.names}
    self.schedule = schedule

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"NamedMixMapDataset({self.schedule.weights})"

  def item(self, name: str, n: int, k: int) -> MixItem:
    """The record of component `name` at ordinal n (read errors become a counted marker)."""
    try:
      return MixItem(name, n, k, self.sources[name][n])
    except Exception as e:  # a corrupt shard must not stop training
      _log.warning("reading %s record %d failed: %s", name, n, e)
      return MixItem(name, n, k, None, "read_error")

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    name, n = self.schedule.select(index)
    return self.item(name, n, int(index))
