"""The training input pipeline (grain): sources -> named weighted mixture -> host shard -> samples
-> packed rows -> per-process numpy batches (batch.py), with an exactly resumable iterator.

The stream, stage by stage:
1. Per source (named component: "text", "pair", "edit", "interleaved"): records, shuffled with a
   per-source seed and repeated forever with a fresh shuffle each epoch
   (``MapDataset.source(...).shuffle(seed).repeat()``).
2. The named mixture (``NamedMixMapDataset``): global position k -> (component, ordinal n) ->
   that component's record n. Positions come in blocks of ``MIX_BLOCK``; every block holds each
   component's exact quota of the stage ratios (largest remainder), in a seeded random order, so
   realised shares match the ratios to 1/MIX_BLOCK. The mapping is pure index arithmetic
   (schedule.py).
3. Host sharding: process p of P takes global positions p, p+P, p+2P, ... (``ds[p::P]``), so the
   hosts' shards are disjoint and their union is the single-host stream, record for record.
   With grain worker processes (data.num_workers = W), worker w of process p reads positions
   p + w*P + t*P*W (grain slices the shard once more). Each packing iterator thus reads one
   ``schedule.Stream``: offset + t * stride.
4. ``ElementBuilder`` (grain map, parallel in threads or worker processes): decode the record
   (bad ones become counted markers, never exceptions), prepare images, build the sample
   sequences (sequences.py).
5. ``PackedBatchDataset``: best-fit packing into rows and batches of ``batch_size //
   process_count`` rows (packing.py); counters of skipped and converted records.

Checkpointing: the iterator's state (JSON) holds the position in the stream, the open and queued
rows as sample keys ``[component, n, k, j]`` (samples are rebuilt from keys on restore), the
counters, the mixture's anchor and ratios by component name, and the stream it reads (offset,
stride). Restoring under different ratios (a later stage) keeps each component's position (no
record repeats) and re-anchors the block schedule at the restore point; components absent from
the new ratios keep their counts.

Elastic resume (another process count): ``TrainIterator.set_state`` also takes
``{"elastic_states": [state of process 0, ..., of process M-1]}`` (``elastic_envelope``; what
training/checkpoint.py returns for a step written by M processes and read by N), and re-shards a
process's own state when only data.num_workers changed. Each new process computes the same
hand-over from the old states (``schedule.reshard``): base = the largest next unread position of
any old stream; positions >= base are sharded as in a fresh run (process q of N, worker w, from
their first position >= base). Positions below base that an old stream had not reached yet (the
streams are ragged: each packs at its own pace) and the samples an old stream had read but not
emitted (its open and queued rows) are handed out round-robin, in stream order, to the new
streams, which pack them first. The old counters are summed into the first new stream (process 0,
worker 0), so their sum over processes stays the global total.
Exact: every position is read once over the whole run and each of its samples (that fits a row)
emitted once, so the multiset of samples (component, n, j) consumed is that of an uninterrupted
run over the same positions; the schedule (the record at each position) is unchanged; with
M == N (same workers) the resume is bitwise exact, as the elastic path is not taken.
Changed: the rows and batches the samples land in, and their order. Ratios changed in the same
restore re-anchor the schedule at base, alike for every new process. Needs dict states (not grain
DataLoader bytes).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import zlib
from typing import Any, Callable, Sequence

import grain
import numpy as np

from nextstep_jax.data import digits as digits_lib
from nextstep_jax.data import sources as sources_lib
from nextstep_jax.batch import validate_batch
from nextstep_jax.data.packing import RowPacker, RowSpec, assemble_batch
from nextstep_jax.data.schedule import (MixItem, MixSchedule, NamedMixMapDataset, ShardProgress,
                                        Stream, reshard)
from nextstep_jax.data.sequences import Image, Sample, SequenceBuilder
from nextstep_jax.data.settings import DataSettings, data_settings
from nextstep_jax.errors import UserError

STATE_VERSION = 1
# The key of an elastic envelope: the states of all M processes of a checkpoint, in process order
# (training/checkpoint.py writes the same key; data/ imports nothing of training/).
ELASTIC_STATES = "elastic_states"
_log = logging.getLogger(__name__)


def _per_source_seed(seed: int, name: str) -> int:
  return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 32)


# ---------------------------------------------------------------------------------------------
# Records -> samples.
# ---------------------------------------------------------------------------------------------

def _digits_decode(record: dict) -> sources_lib.DecodedRecord:
  images = list(record.get("images", []))
  return sources_lib.DecodedRecord(record, images, [None] * len(images), [])


@dataclasses.dataclass
class Element:
  """The samples of one mixture position, or why it was skipped."""
  key: list
  samples: list
  bad: str | None = None
  notes: tuple = ()


class ElementBuilder:
  """MixItem -> Element: decode, prepare images (pixel or latent payload), build sequences.

  image_encoder (latent path without stored latents): uint8 (H, W, 3) -> (h*w, d) or (h, w, d).
  """

  def __init__(self, builder: SequenceBuilder, decoders: dict[str, Callable], settings: DataSettings,
               image_encoder: Callable[[np.ndarray], np.ndarray] | None = None):
    self.builder, self.decoders, self.settings = builder, decoders, settings
    self.image_encoder = image_encoder

  def _prepare(self, img: np.ndarray | None, latent: np.ndarray | None) -> Image:
    """An image as the row needs it: pixels (pixel path) or tokens (latent path: the stored
    latents, whose grid the decoder checked when it left `img` None, else `img` encoded)."""
    s = self.settings
    if img is None:
      grid = (int(latent.shape[0]), int(latent.shape[1]))
    elif img.ndim != 3 or img.shape[2] != 3 or img.shape[0] % s.unit or img.shape[1] % s.unit:
      raise sources_lib.BadRecord("bad_image_shape", f"{img.shape} (unit {s.unit} px)")
    else:
      grid = (img.shape[0] // s.unit, img.shape[1] // s.unit)
    if s.pixel:
      return Image(img, grid)
    if latent is None:
      if self.image_encoder is None:
        raise sources_lib.BadRecord("no_latents")
      latent = np.asarray(self.image_encoder(img))
    tokens = np.asarray(latent, np.float32).reshape(-1, latent.shape[-1])
    if tokens.shape != (grid[0] * grid[1], s.token_dim):
      raise sources_lib.BadRecord("bad_latents", f"{latent.shape} for grid {grid}, d {s.token_dim}")
    return Image(tokens, grid)

  def samples(self, item: MixItem) -> tuple[list[Sample], tuple]:
    if item.error:
      raise sources_lib.BadRecord(item.error)
    decoded = self.decoders[item.name](item.record)
    images = [self._prepare(im, lat) for im, lat in zip(decoded.images, decoded.latents)]
    rng = np.random.default_rng([self.settings.seed, int(item.k), 0x666C6970])
    out = self.builder.from_record(decoded.record, images, rng, self.settings.seq_len,
                                   source=item.name)
    for j, s in enumerate(out):
      s.key = [item.name, int(item.n), int(item.k), j]
    return out, tuple(decoded.notes)

  def __call__(self, item: MixItem) -> Element:
    key = [item.name, int(item.n), int(item.k)]
    try:
      samples, notes = self.samples(item)
    except sources_lib.BadRecord as e:
      return Element(key, [], e.reason)
    except Exception as e:  # pylint: disable=broad-except
      _log.warning("building %s record %d failed: %r", item.name, item.n, e)
      return Element(key, [], f"error_{type(e).__name__}")
    return Element(key, samples, None, notes)


# ---------------------------------------------------------------------------------------------
# Packing into batches, with a resumable iterator.
# ---------------------------------------------------------------------------------------------

class PackedBatchDataset(grain.IterDataset):
  """Elements -> packed numpy batches of `batch_rows` rows (see packing.py)."""

  def __init__(self, parent: grain.IterDataset, mixture: NamedMixMapDataset,
               builder: ElementBuilder, spec: RowSpec, batch_rows: int,
               process_index: int = 0, process_count: int = 1):
    super().__init__(parent)
    self.mixture, self.builder, self.spec, self.batch_rows = mixture, builder, spec, batch_rows
    self.process_index, self.process_count = int(process_index), int(process_count)

  def __iter__(self) -> "PackedBatchIterator":
    return PackedBatchIterator(self._parent.__iter__(), self.mixture, self.builder, self.spec,
                               self.batch_rows, self.process_index, self.process_count)

  def __str__(self) -> str:
    return f"PackedBatchDataset(rows={self.batch_rows}, seq_len={self.spec.seq_len})"


class PackedBatchIterator(grain.DatasetIterator):
  """Packs elements from the parent into batches; state = stream position + rows as keys."""

  def __init__(self, parent, mixture: NamedMixMapDataset, builder: ElementBuilder, spec: RowSpec,
               batch_rows: int, process_index: int = 0, process_count: int = 1):
    super().__init__(parent)
    self.mixture, self.builder, self.spec, self.batch_rows = mixture, builder, spec, batch_rows
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.packer = RowPacker(spec)
    self.counters: collections.Counter = collections.Counter()
    self.last_k: int | None = None
    self.last_batch_keys: list[list] = []   # sample keys per row of the last batch (debugging)
    self._barren = 0   # consecutive records without a usable sample
    self._next_t = 0   # index in the stream of the parent's next element
    self._stream_ok = True

  MAX_BARREN = 10_000   # that many unusable records in a row: the data is broken, say so

  @property
  def stream(self) -> Stream:
    """The global positions this iterator reads (module doc, stage 3). The grain worker, if any,
    is read from the iterator context grain sets in worker processes."""
    ctx = getattr(getattr(self, "_ctx", None), "mp_context", None)
    w, workers = (int(ctx.process_index), int(ctx.process_count)) if ctx is not None else (0, 1)
    return Stream(self.process_index + w * self.process_count, self.process_count * workers)

  def _pull(self) -> Element:
    """The parent's next element, checked against the stream this iterator says it reads."""
    element = next(self._parent)
    expected = self.stream.position(self._next_t)
    if self._stream_ok and element.key[2] != expected:
      self._stream_ok = False
      _log.warning("data stream: position %d read where %s expects %d; this iterator's state "
                   "cannot be re-sharded (elastic resume)", element.key[2], self.stream, expected)
    self._next_t += 1
    return element

  def consume(self, element: Element) -> None:
    self.last_k = element.key[2]
    self.counters[f"records/{element.key[0]}"] += 1
    self._barren += 1
    if self._barren > self.MAX_BARREN:
      skipped = {k: v for k, v in self.counters.items() if k.startswith("skipped/")}
      raise RuntimeError(f"{self.MAX_BARREN} records in a row gave no usable sample; the data "
                         f"source looks broken (skipped so far: {skipped})")
    if element.bad:
      self.counters[f"skipped/{element.bad}"] += 1
      return
    for note in element.notes:
      self.counters[f"converted/{note}"] += 1
    for sample in element.samples:
      reason = self.spec.reject_reason(sample)
      if reason:
        self.counters[f"skipped/{reason}"] += 1
        continue
      self.counters[f"samples/{sample.key[0]}"] += 1
      self.packer.add(sample)
      self._barren = 0

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    while True:
      rows = self.packer.take_batch(self.batch_rows)
      if rows is not None:
        batch = assemble_batch(rows, self.spec, self.batch_rows)
        self.last_batch_keys = [r.keys() for r in rows]
        self.counters["batches"] += 1
        self.counters["tokens"] += int(np.count_nonzero(batch["segment_ids"]))
        return batch
      self.consume(self._pull())

  def materialise(self, key) -> Sample | None:
    """The sample of a checkpointed key (None when its component left the mixture)."""
    name, n, k, j = key
    if name not in self.mixture.sources:
      self.counters["skipped/component_removed"] += 1
      return None
    samples, _ = self.builder.samples(self.mixture.item(name, int(n), int(k)))
    if j >= len(samples):
      raise ValueError(f"checkpointed sample {key} no longer exists: the data changed")
    return samples[j]

  def get_state(self) -> dict:
    stream = self.stream
    return dict(version=STATE_VERSION, parent=self._parent.get_state(),
                packer=self.packer.state(), counters=dict(self.counters),
                mixture=self.mixture.schedule.state(), last_k=self.last_k,
                stream=dict(offset=stream.offset, stride=stream.stride) if self._stream_ok else None)

  def set_state(self, state: dict) -> None:
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"data iterator state has version {state.get('version')}, this code "
                       f"reads version {STATE_VERSION}")
    if "elastic" in state:
      self._take_over(state["elastic"])
      return
    schedule = self.mixture.schedule
    saved = state["mixture"]
    if _same_weights(saved["weights"], schedule.weights) and saved["block"] == schedule.block:
      schedule.rebase(saved["anchor_k"], saved["anchor_counts"])
    else:
      # New ratios (a later stage): keep every component's position, re-anchor at the resume point.
      old = MixSchedule(saved["weights"], schedule.seed, saved["anchor_k"], saved["anchor_counts"],
                        saved["block"])
      resume_k = saved["anchor_k"] if state["last_k"] is None else state["last_k"] + 1
      schedule.rebase(resume_k, old.counts_at(resume_k))
      _log.info("data mixture ratios changed from %s to %s: re-anchored at position %d",
                saved["weights"], schedule.weights, resume_k)
    self._parent.set_state(state["parent"])
    self.counters = collections.Counter(state["counters"])
    self.packer = RowPacker(self.spec)
    self.packer.load_state(state["packer"], self.materialise)
    self.last_k = state["last_k"]
    parent = state["parent"]
    self._next_t = int(parent.get("next_index", 0)) if isinstance(parent, dict) else 0
    self._stream_ok, self._barren = state.get("stream", {}) is not None, 0

  def _take_over(self, hand: dict) -> None:
    """Elastic resume (module doc): this stream's share of a ``schedule.Reshard``."""
    self.mixture.schedule.rebase(hand["anchor_k"], hand["anchor_counts"])
    parent = self._parent.get_state()
    if not isinstance(parent, dict) or "next_index" not in parent:
      raise ValueError(f"cannot position the record stream {parent!r} for an elastic resume")
    self._parent.set_state(dict(parent, next_index=int(hand["next_index"])))
    self._next_t, self._stream_ok, self._barren = int(hand["next_index"]), True, 0
    self.counters = collections.Counter(hand["counters"])
    self.packer = RowPacker(self.spec)
    for item in hand["items"]:
      if len(item) == 3:   # a record position no old stream had read
        if item[0] in self.mixture.sources:
          self.consume(self.builder(self.mixture.item(item[0], int(item[1]), int(item[2]))))
        else:
          self.counters.update([f"records/{item[0]}", "skipped/component_removed"])
        continue
      sample = self.materialise(item)   # a sample read but not emitted by an old stream
      reason = sample is not None and self.spec.reject_reason(sample)
      if reason:
        self.counters[f"skipped/{reason}"] += 1
      elif sample is not None:
        self.packer.add(sample)
    self.last_k = int(hand["base"]) - 1 if int(hand["base"]) > 0 else None

  def __str__(self) -> str:
    return f"PackedBatchIterator(rows={self.batch_rows})"


def _same_weights(a: dict, b: dict, tol: float = 1e-9) -> bool:
  names = set(a) | set(b)
  return all(abs(float(a.get(n, 0.0)) - float(b.get(n, 0.0))) <= tol for n in names)


def collect_counters(state: Any) -> dict[str, int]:
  """Sums the counters of every packing iterator state found in an iterator state (in-process or
  grain worker states)."""
  total: collections.Counter = collections.Counter()
  for ps in _packer_states(state):
    total.update(ps["counters"])
  return dict(total)


def _is_packer_state(node: Any) -> bool:
  return (isinstance(node, dict) and node.get("version") == STATE_VERSION and "packer" in node
          and "counters" in node)


def _map_packer_states(node: Any, fn: Callable[[dict], Any]) -> Any:
  """A copy of an iterator state with every packing-iterator state (itself, or grain workers'
  states) replaced by fn(state)."""
  if _is_packer_state(node):
    return fn(node)
  if isinstance(node, dict):
    return {k: _map_packer_states(v, fn) for k, v in node.items()}
  if isinstance(node, (list, tuple)):
    return type(node)(_map_packer_states(v, fn) for v in node)
  if isinstance(node, (str, bytes)):   # a state serialised as JSON (grain's DataLoader)
    try:
      parsed = json.loads(node)
    except (ValueError, TypeError):
      return node
    return _map_packer_states(parsed, fn) if isinstance(parsed, (dict, list)) else node
  return node


def _packer_states(state: Any) -> list[dict]:
  found: list[dict] = []
  _map_packer_states(state, found.append)
  return found


def _stream_of(ps: dict) -> Stream | None:
  s = ps.get("stream")
  return Stream(int(s["offset"]), int(s["stride"])) if s else None


def elastic_envelope(states: Sequence[Any]) -> dict:
  """What ``TrainIterator.set_state`` takes to resume from the states of all processes of a
  checkpoint (in process order) with another process count (training/data_state.py builds it from
  the files of a step)."""
  return {ELASTIC_STATES: list(states)}


class TrainIterator(grain.DatasetIterator):
  """What train.py holds: ``next(it)`` -> numpy batch (batch.py, local rows), ``get_state()`` /
  ``set_state()`` (JSON; grain's orbax CheckpointHandler saves it beside the model; an elastic
  envelope re-shards, see the module doc), and ``counters`` (records, samples per component,
  skipped/<reason>, converted/<what>, batches, tokens) for the train loop to log."""

  def __init__(self, inner: grain.DatasetIterator, settings: DataSettings,
               process_index: int = 0, process_count: int = 1):
    super().__init__(inner)
    self.settings = settings
    self.process_index, self.process_count = int(process_index), int(process_count)

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict:
    return self._parent.get_state()

  @property
  def streams(self) -> set[Stream]:
    """The streams this process's packing iterators read (module doc, stage 3)."""
    p, n, w = self.process_index, self.process_count, max(1, self.settings.num_workers)
    return {Stream(p + i * n, n * w) for i in range(w)}

  def set_state(self, state: dict) -> None:
    if isinstance(state, dict) and ELASTIC_STATES in state:
      self._reshard(list(enumerate(state[ELASTIC_STATES])), len(state[ELASTIC_STATES]))
      return
    saved = [_stream_of(ps) for ps in _packer_states(state)]
    workers_changed = (set(saved) != self.streams or
                       _is_packer_state(state) != isinstance(self._parent, PackedBatchIterator))
    if saved and None not in saved and workers_changed:   # data.num_workers changed
      self._reshard([(self.process_index, state)], self.process_count)
    else:
      self._parent.set_state(state)

  def _reshard(self, states: list[tuple[int, Any]], saved_count: int) -> None:
    """Resumes from (process index, state) of old processes (module doc, elastic resume)."""
    old, total = [], collections.Counter()
    for p, state in states:
      found = _packer_states(state)
      if not isinstance(state, dict) or not found:
        raise ValueError(f"process {p}'s data-iterator state ({type(state).__name__}) holds no "
                         "packing-iterator state: it cannot be re-sharded (elastic resume)")
      for ps in found:
        stream = _stream_of(ps)
        if stream is None and "stream" not in ps and ps is state:   # saved before streams
          stream = Stream(p, saved_count)
        if stream is None or not isinstance(ps["parent"], dict) or "next_index" not in ps["parent"]:
          raise ValueError(f"process {p}'s data-iterator state does not say which positions it "
                           "read: it cannot be re-sharded (elastic resume)")
        pending = [key for _, keys in ps["packer"]["open"] + ps["packer"]["full"] for key in keys]
        old.append(ShardProgress(stream, int(ps["parent"]["next_index"]), ps["mixture"], pending))
        total.update(ps["counters"])
    stride = next(iter(self.streams)).stride
    plan = reshard(old, self.settings.seed, self.settings.ratios, stride)
    _log.info("data: elastic resume from %d stream(s) to stride %d: new streams from position %d%s,"
              " %d records and samples handed over", len(old), stride, plan.base,
              " (mixture re-anchored there)" if plan.rebased else "", len(plan.items))

    def hand_over(ps: dict) -> dict:
      stream = _stream_of(ps)
      return dict(version=STATE_VERSION, elastic=dict(
          base=plan.base, anchor_k=plan.anchor_k, anchor_counts=plan.anchor_counts,
          next_index=stream.first_index_at(plan.base), items=plan.share(stream),
          counters=dict(total) if stream.offset == plan.offsets[0] else {}))
    self._parent.set_state(_map_packer_states(self._parent.get_state(), hand_over))

  @property
  def counters(self) -> dict[str, int]:
    if isinstance(self._parent, PackedBatchIterator):
      return dict(self._parent.counters)
    return collect_counters(self._parent.get_state())

  @property
  def packer_iterator(self) -> PackedBatchIterator | None:
    """The in-process packing iterator (None with worker processes)."""
    return self._parent if isinstance(self._parent, PackedBatchIterator) else None

  def __str__(self) -> str:
    return f"TrainIterator({self._parent})"


# ---------------------------------------------------------------------------------------------
# Building the pipeline.
# ---------------------------------------------------------------------------------------------

def _cache_dir(settings: DataSettings) -> str | None:
  return os.path.join(settings.workdir, "cache") if settings.workdir else None


def build_record_sources(settings: DataSettings, split: str = "train",
                         names: Sequence[str] | None = None,
                         image_encoder=None) -> dict[str, tuple[Any, Callable]]:
  """name -> (random-access records, decoder) for the components in `names` (default: those
  with a positive ratio). Components without data in `split` are left out for held-out splits
  and are an error for training."""
  names = list(names if names is not None else settings.ratios)
  out: dict[str, tuple[Any, Callable]] = {}
  if settings.source == "digits":
    if not settings.pixel and image_encoder is None:
      raise ValueError("data.payload='image_tokens' with the digits needs an image_encoder "
                       "(pixels -> patch tokens); use data.payload='images' for the demo")
    for name in names:
      out[name] = (digits_lib.DigitRecords(name, split, settings.image_size,
                                           cache_dir=_cache_dir(settings)), _digits_decode)
    return out
  root = settings.source
  if not os.path.isdir(root):
    raise FileNotFoundError(f"data.source {root} is not a directory (nor 'digits')")
  for name in names:
    src = sources_lib.open_records(root, name, split)
    if src is None or len(src) == 0:
      if split == "train":
        raise ValueError(f"data.source {root}: component {name!r} has a positive ratio but no "
                         f"records in split {split!r}")
      continue
    if not settings.pixel and image_encoder is None and name != "text":
      _check_latents(root, name, src[0], settings.token_dim)
    out[name] = (src, sources_lib.RecordDecoder(name, settings.unit, settings.sides,
                                                settings.pixel))
  return out


def _check_latents(root: str, name: str, first: dict, token_dim: int) -> None:
  """The latent path reads a kind's stored latents: refuses records without them, or with tokens
  of another size than image.token_dim (another VAE), naming the directory and the command."""
  shapes = np.asarray(first.get("latent_shapes", np.zeros((0, 3))))
  if not list(first.get("latents", [])) or not shapes.size:
    raise UserError(f"data.source {root}: {name} records carry no latents, needed by "
                    "data.payload='image_tokens': write them with python -m nextstep_jax.data "
                    "prepare --vae=VAE_DIR, or train on the pixels with data.payload='images' and "
                    "vae.checkpoint set")
  if int(shapes.reshape(-1, 3)[0, 2]) != token_dim:
    raise UserError(f"data.source {root}: {name} latents are {int(shapes.reshape(-1, 3)[0, 2])}-d "
                    f"tokens, the config's image.token_dim is {token_dim}: prepared with another "
                    f"VAE ({os.path.join(root, 'latent_stats.json')} names it)")


def _mixture(settings: DataSettings, sources: dict[str, tuple[Any, Callable]],
             weights: dict[str, float], seed: int) -> NamedMixMapDataset:
  parents = {name: grain.MapDataset.source(src).shuffle(seed=_per_source_seed(seed, name)).repeat()
             for name, (src, _) in sources.items()}
  return NamedMixMapDataset(parents, MixSchedule(weights, seed))


def build_sample_dataset(config, tokenizer, *, split: str = "train", image_encoder=None,
                         drop_text_prob: float | None = None, process_count: int = 1,
                         workdir: str | None = None) -> tuple[grain.MapDataset, NamedMixMapDataset,
                                                              ElementBuilder, DataSettings]:
  """The global element stream (position k -> Element) before sharding and packing, plus the
  pieces the packer needs. Used by build_train_iterator and by tests of shares and sharding.
  `workdir`: the run's work directory, holding the data cache (default config.workdir)."""
  settings = data_settings(config, process_count, workdir)
  sources = build_record_sources(settings, split, image_encoder=image_encoder)
  mixture = _mixture(settings, sources, settings.ratios, settings.seed)
  builder = ElementBuilder(
      SequenceBuilder(tokenizer, settings.drop_text_prob if drop_text_prob is None
                      else drop_text_prob, settings.loss_on_prompt),
      {name: dec for name, (_, dec) in sources.items()}, settings, image_encoder)
  return mixture.map(builder), mixture, builder, settings


def build_train_iterator(config, tokenizer, process_index: int = 0, process_count: int = 1, *,
                         image_encoder=None, workdir: str | None = None) -> TrainIterator:
  """The training iterator of one process: local batches of data.batch_size // process_count
  rows. With data.num_workers > 0 the per-sample work and packing run in grain worker processes
  (the launching script needs a ``__main__`` guard; absl flags parsed as grain requires)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  elements, mixture, builder, settings = build_sample_dataset(
      config, tokenizer, image_encoder=image_encoder, process_count=process_count, workdir=workdir)
  spec = settings.row_spec(tokenizer.pad_id)
  shard = elements[process_index::process_count]
  read = grain.ReadOptions(num_threads=settings.num_threads,
                           prefetch_buffer_size=64 if settings.num_threads else 0)
  ds: grain.IterDataset = PackedBatchDataset(shard.to_iter_dataset(read), mixture, builder, spec,
                                             settings.local_batch, process_index, process_count)
  if settings.num_workers > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():   # grain reads its absl flags; keep defaults when unparsed
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=settings.num_workers,
                                                     per_worker_buffer_size=2))
  return TrainIterator(iter(ds), settings, process_index, process_count)


def build_eval_batches(config, tokenizer, num_batches: int, *, image_encoder=None,
                       workdir: str | None = None, settings: DataSettings | None = None
                       ) -> dict[str, list[dict[str, np.ndarray]]]:
  """Fixed held-out batches per component: source name -> `num_batches` batches of
  data.batch_size rows (global; evaluation runs them as given). Digits: the held-out split
  (500 digits, every 20th stdlib docstring); a data directory: its 'heldout' split where one
  exists. Captions are never flipped (drop_text_prob 0), so pair loss measures text-to-image;
  data.loss_on_prompt applies as in training. Components with a positive ratio are evaluated.
  `settings`: the training iterator's (``TrainIterator.settings``), so its data.source, staged from a URL
  once, is not listed again; the batches are global whatever its process count."""
  if settings is None:
    settings = data_settings(config, workdir=workdir)
  else:
    settings = dataclasses.replace(settings, local_batch=settings.batch_size)
  sources = build_record_sources(settings, "heldout", image_encoder=image_encoder)
  spec = settings.row_spec(tokenizer.pad_id)
  seq = SequenceBuilder(tokenizer, 0.0, settings.loss_on_prompt)
  out: dict[str, list[dict[str, np.ndarray]]] = {}
  for name, (src, decoder) in sources.items():
    mixture = _mixture(settings, {name: (src, decoder)}, {name: 1.0}, settings.seed + 7919)
    builder = ElementBuilder(seq, {name: decoder}, settings, image_encoder)
    packer, batches, k = RowPacker(spec), [], 0
    limit = 1000 * max(1, num_batches) * settings.batch_size
    while len(batches) < num_batches:
      if k >= limit:
        raise ValueError(f"held-out {name}: no usable samples after {k} records")
      element = builder(mixture[k])
      k += 1
      for sample in element.samples:
        if spec.reject_reason(sample) is None:
          packer.add(sample)
      rows = packer.take_batch(settings.batch_size)
      if rows is not None:
        batch = assemble_batch(rows, spec, settings.batch_size)
        validate_batch(batch, settings.seq_len)
        batches.append(batch)
    out[name] = batches
  return out


def to_global(batch: dict[str, np.ndarray], mesh, spec=None) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over `mesh` along the rows.

  spec: a PartitionSpec for every key (its first entry shards the rows), a dict key -> spec, or
  None for the mesh's data-parallel axes ("data", "fsdp" where present) on the rows.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  if spec is None:
    axes = tuple(a for a in mesh.axis_names if a in ("data", "fsdp"))
    spec = PartitionSpec(axes if axes else None)
  out = {}
  for key, value in batch.items():
    s = spec[key] if isinstance(spec, dict) else spec
    out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, s), np.asarray(value))
  return out
