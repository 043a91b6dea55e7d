"""The named weighted mixture of the input pipeline (stage 2 of ``data/mixture.py``).

``NamedMixMapDataset``: global position k -> (component, ordinal n) -> that component's record n.
Positions come in blocks of ``MIX_BLOCK``; every block holds each component's exact quota of the
stage ratios (largest remainder), in a seeded random order, so realised shares match the ratios to
1/MIX_BLOCK. The mapping is pure index arithmetic (``MixSchedule``), re-anchored when a checkpoint
is restored under different ratios.

Also here, the index arithmetic of re-sharding (``reshard``): each packing iterator reads the
positions ``offset + t * stride`` of the global stream (a ``Stream``); given what every old stream
had read and still held unemitted, ``reshard`` says where new streams of another stride start and
which records and samples they must take over, so that no position is read twice or skipped
(the elastic resume of ``data/mixture.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
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

  @classmethod
  def from_state(cls, state: dict, seed: int) -> "MixSchedule":
    return cls(state["weights"], seed, state["anchor_k"], state["anchor_counts"], state["block"])


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


# ---------------------------------------------------------------------------------------------
# Re-sharding the stream for another number of readers (elastic resume).
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stream:
  """The global positions one packing iterator reads: offset + t * stride for t = 0, 1, ...
  (process p of P with worker w of W: offset p + w * P, stride P * W)."""
  offset: int
  stride: int

  def position(self, t: int) -> int:
    return self.offset + int(t) * self.stride

  def first_index_at(self, k: int) -> int:
    """The smallest t with position(t) >= k."""
    return max(0, -((self.offset - int(k)) // self.stride))


@dataclasses.dataclass
class ShardProgress:
  """What one old stream had done at the checkpoint: `next_index` positions read (the next one is
  stream.position(next_index)), with the schedule `mixture` (MixSchedule.state()), and `pending`
  sample keys [component, n, k, j] read but not yet emitted (the packer's rows)."""
  stream: Stream
  next_index: int
  mixture: dict
  pending: list


@dataclasses.dataclass
class Reshard:
  """The hand-over to new streams (``reshard``): they read positions >= base under the schedule
  anchored at (anchor_k, anchor_counts), and share `items` round-robin in the order of `offsets`
  (the new streams that cover what the old ones read, all of `stride`). Items are pending sample
  keys [component, n, k, j] and unread records [component, n, k] below base, sorted by (k, j) (a
  record sorts before its samples)."""
  base: int
  anchor_k: int
  anchor_counts: dict
  items: list
  stride: int
  offsets: list
  rebased: bool

  def share(self, stream: Stream) -> list:
    if stream.stride != self.stride or stream.offset not in self.offsets:
      raise ValueError(f"{stream} is not one of the new streams (stride {self.stride}, offsets "
                       f"{self.offsets})")
    return self.items[self.offsets.index(stream.offset)::len(self.offsets)]


def _item_order(item) -> tuple[int, int]:
  return int(item[2]), int(item[3]) if len(item) == 4 else -1


def _residues(offset: int, stride: int, period: int) -> list[int]:
  return [(offset + i * stride) % period for i in range(period // stride)]


def reshard(old: list[ShardProgress], seed: int, weights: dict[str, float], new_stride: int,
            block: int = MIX_BLOCK) -> Reshard:
  """Hands what the `old` streams read over to the streams of stride `new_stride` that cover the
  same positions (all offsets 0..new_stride-1 when the old streams are every process's of one
  checkpoint; one process's share when only its worker count changed).

  The old streams must have one stride and read disjoint positions; the new streams covering
  them must cover nothing else. base = the largest next unread position of any old stream:
  nothing at or past it was read. Below it, each old stream's unread positions become records to
  take over (resolved to [component, n, k] under that stream's own schedule), and its pending
  samples are taken over as keys. The new schedule keeps the old anchor when every old stream had
  the same one and the weights are unchanged; otherwise it is re-anchored at base with the old
  schedule's counts there (no component ordinal repeats). Deterministic: every new process
  computes the same hand-over from the same old states.
  """
  if not old:
    raise ValueError("no data-iterator states to re-shard")
  if new_stride < 1:
    raise ValueError(f"new stride must be >= 1, got {new_stride}")
  streams = sorted((p.stream.offset, p.stream.stride) for p in old)
  strides = {s for _, s in streams}
  period = math.lcm(min(strides), new_stride)
  covered = [r for o, s in streams for r in _residues(o, s, period)]
  offsets = [o for o in range(new_stride) if set(_residues(o, new_stride, period)) & set(covered)]
  if len(strides) != 1 or len(set(covered)) != len(covered) or sorted(
      r for o in offsets for r in _residues(o, new_stride, period)) != sorted(covered):
    raise ValueError(f"the saved data-iterator states do not partition the stream (streams "
                     f"{streams}): not the states of one checkpoint, or not all of its "
                     f"processes' (or workers') states")
  base = max(p.stream.position(p.next_index) for p in old)
  items, schedules = [], {}
  for p in old:
    sched = schedules.setdefault(repr(sorted(p.mixture.items())),
                                 MixSchedule.from_state(p.mixture, seed))
    t = p.next_index
    while p.stream.position(t) < base:
      k = p.stream.position(t)
      name, n = sched.select(k)
      items.append([name, int(n), int(k)])
      t += 1
    items.extend([str(key[0]), int(key[1]), int(key[2]), int(key[3])] for key in p.pending)
  items.sort(key=_item_order)
  if len({_item_order(item) for item in items}) != len(items):
    raise ValueError("a position or sample is held by two saved states: they are not the states "
                     "of one checkpoint")
  first = old[0].mixture
  names = set(first["weights"]) | set(weights)
  same_weights = all(abs(float(first["weights"].get(n, 0.0)) - float(weights.get(n, 0.0))) <= 1e-9
                     for n in names)
  if all(p.mixture == first for p in old) and same_weights and int(first["block"]) == int(block):
    anchor_k, counts, rebased = int(first["anchor_k"]), dict(first["anchor_counts"]), False
  else:
    sched = MixSchedule.from_state(first, seed)
    anchor_k, counts, rebased = base, sched.counts_at(max(base, sched.anchor_k)), True
  return Reshard(base=int(base), anchor_k=anchor_k,
                 anchor_counts={k: int(v) for k, v in counts.items()}, items=items,
                 stride=int(new_stride), offsets=offsets, rebased=rebased)
