"""Elastic resume: the data iterator's states of M processes re-sharded for N (data/mixture.py,
schedule.reshard, the checkpoint's DataStateHandler), with no sample read twice and none skipped.

What is compared. A sample is identified by its key [component, n, k, j]: record n of the component
(its ordinal in the repeated, shuffled source), at global stream position k, sample j of that
record. Rows are packed, so samples are counted, not rows. For a run (one or several phases, each
with its processes), "consumed" is the multiset of the samples its batches emitted plus the
samples still pending in the final states' packers (read but not yet emitted). Its frontier is the
smallest next unread position of any final stream: every position below it has been read. For an
uninterrupted run and an elastic run of the same number of global batches, below the smaller
frontier F, both consumed multisets equal the ground truth: every sample (that fits a row) of the
global stream's positions 0..F-1, each exactly once. Over the whole run nothing is consumed twice.

The processes are simulated in this one process: iterators built with process_index 0..P-1 of P
(the iterator has no global state), their states fed to the new ones as the checkpoint does.
"""

import collections
import json

import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.batch import validate_batch
from nextstep_jax.data import mixture as M
from nextstep_jax.data import schedule as S
from nextstep_jax.training import checkpoint as ckpt_lib
from nextstep_jax.training import data_state as data_state_lib
from tests.test_mixture import demo_config, mixture_fixtures

TOTAL = 12   # global batches of every run


workdir, tok = mixture_fixtures("elastic")


@pytest.fixture(scope="module")
def truth(workdir, tok):
  """k -> the keys of the usable samples of global position k (the single-host stream)."""
  config = demo_config(workdir)
  elements, _, _, settings = M.build_sample_dataset(config, tok)
  spec = settings.row_spec(tok.pad_id)
  cache = {}

  def samples(k):
    if k not in cache:
      cache[k] = [tuple(s.key) for s in elements[k].samples if spec.reject_reason(s) is None]
    return cache[k]
  return samples


def iterators(workdir, tok, count, states=None, **data):
  its = [M.build_train_iterator(demo_config(workdir, **data), tok, i, count) for i in range(count)]
  if states is not None:
    for it in its:
      it.set_state(M.elastic_envelope(json.loads(json.dumps(states))))
  return its


def run(its, batches):
  """`batches` global batches (one local batch of every process each): the emitted sample keys."""
  emitted = []
  for _ in range(batches):
    for it in its:
      validate_batch(next(it), 128)
      emitted += [tuple(key) for row in it.packer_iterator.last_batch_keys for key in row]
  return emitted


def states_of(its):
  return [json.loads(json.dumps(it.get_state())) for it in its]


def pending(states):
  return [tuple(key) for ps in M._packer_states(states)
          for _, keys in ps["packer"]["open"] + ps["packer"]["full"] for key in keys]


def frontier(states):
  return min(S.Stream(**ps["stream"]).position(ps["parent"]["next_index"])
             for ps in M._packer_states(states))


def check_run(emitted, final_states, truth, against=None):
  """The consumed multiset of a run: no sample twice; below the frontier (or `against`'s, when
  smaller) it is the ground truth. Returns (consumed below F, F)."""
  consumed = collections.Counter(emitted + pending(final_states))
  twice = [key for key, c in consumed.items() if c > 1]
  assert not twice, f"consumed twice: {twice[:5]}"
  f = frontier(final_states) if against is None else min(frontier(final_states), against)
  below = collections.Counter(key for key in consumed if key[2] < f)
  want = collections.Counter(key for k in range(f) for key in truth(k))
  assert below == want, (f"below position {f}: {sorted(want - below)[:5]} skipped, "
                         f"{sorted(below - want)[:5]} extra")
  return below, f


def records_read(final_states):
  return sum(v for ps in M._packer_states(final_states) for name, v in ps["counters"].items()
             if name.startswith("records/"))


@pytest.mark.parametrize("before,after,first", [(2, 1, 5), (1, 2, 5), (2, 4, 3)])
def test_elastic_resume_consumes_what_an_uninterrupted_run_does(workdir, tok, truth, before,
                                                                after, first):
  # Uninterrupted: `before` processes for TOTAL global batches.
  ref = iterators(workdir, tok, before)
  ref_emitted = run(ref, TOTAL)
  ref_states = states_of(ref)
  _, ref_f = check_run(ref_emitted, ref_states, truth)

  # Elastic: `before` processes for `first` batches, then `after` processes resume their states.
  old = iterators(workdir, tok, before)
  emitted = run(old, first)
  saved = states_of(old)
  new = iterators(workdir, tok, after, saved)
  assert new[0].packer_iterator.batch_rows == 8 // after
  resumed = run(new, TOTAL - first)
  final = states_of(new)
  emitted += resumed
  below, f = check_run(emitted, final, truth, against=ref_f)
  ref_below, _ = check_run(ref_emitted, ref_states, truth, against=f)
  assert below == ref_below
  assert f > 0.8 * ref_f, (f, ref_f)   # the comparison covers nearly all of both runs

  # The samples the old processes held unemitted come out after the resume, on the new ones.
  held = set(pending(saved))
  assert held and held <= set(resumed) | set(pending(final))
  # The new streams start where no old one had read; the old streams' stragglers were handed over.
  base = max(S.Stream(**ps["stream"]).position(ps["parent"]["next_index"])
             for ps in M._packer_states(saved))
  for ps in M._packer_states(final):
    stream = S.Stream(**ps["stream"])
    assert stream.stride == after and ps["parent"]["next_index"] >= stream.first_index_at(base)
  # Counters: their sum over processes stays the global total (records = positions read).
  read_after = sum(ps["parent"]["next_index"] - S.Stream(**ps["stream"]).first_index_at(base)
                   for ps in M._packer_states(final))
  assert records_read(final) == base + read_after
  batches = sum(ps["counters"]["batches"] for ps in M._packer_states(final))
  assert batches == first * before + (TOTAL - first) * after
  print(f"{before}->{after}: {len(emitted)} samples emitted ({len(ref_emitted)} uninterrupted), "
        f"compared below position {f}, {len(held)} held samples handed over")


def test_chain_of_resizes_and_back(workdir, tok, truth):
  """2 -> 4 -> 1 -> 2 processes; then a same-count resume stays bitwise exact."""
  its = iterators(workdir, tok, 2)
  emitted = run(its, 3)
  for count, batches in ((4, 2), (1, 3), (2, 2)):
    its = iterators(workdir, tok, count, states_of(its))
    emitted += run(its, batches)
  final = states_of(its)
  check_run(emitted, final, truth)
  # Same process count: each process's own state, exactly as before.
  want = [[next(it) for _ in range(2)] for it in its]
  again = [M.build_train_iterator(demo_config(workdir), tok, i, 2) for i in range(2)]
  for it, state in zip(again, final):
    it.set_state(state)
  for it, batches in zip(again, want):
    for batch in batches:
      got = next(it)
      for k in batch:
        np.testing.assert_array_equal(got[k], batch[k])


def test_states_without_streams_and_refusals(workdir, tok, truth):
  its = iterators(workdir, tok, 2)
  emitted = run(its, 4)
  saved = states_of(its)
  # States written before streams were recorded (no "stream"): process p of M read p::M.
  legacy = [{k: v for k, v in s.items() if k != "stream"} for s in saved]
  a = iterators(workdir, tok, 1, saved)
  b = iterators(workdir, tok, 1, legacy)
  for _ in range(4):
    x, y = next(a[0]), next(b[0])
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
    emitted += [tuple(key) for row in a[0].packer_iterator.last_batch_keys for key in row]
  check_run(emitted, states_of(a), truth)
  # Not the states of one checkpoint: refused, naming why.
  with pytest.raises(ValueError, match="do not partition"):
    iterators(workdir, tok, 1, saved[:1] + saved[:1])
  with pytest.raises(ValueError, match="do not partition"):
    M.build_train_iterator(demo_config(workdir), tok).set_state(
        M.elastic_envelope(saved[1:]))
  with pytest.raises(ValueError, match="cannot be re-sharded"):
    data_state_lib.elastic_data_state([b"grain-dataloader-bytes", {}])
  assert data_state_lib.elastic_data_state([None, None]) is None


def _save(directory, step, identity, state, monkeypatch):
  """A checkpoint step as process `identity` = (index, count) writes it: the train state (one
  real process) and this process's data-state file."""
  monkeypatch.setattr(data_state_lib, "_process_identity", lambda: identity)
  with ckpt_lib.Checkpointer(directory, every=1, keep=3, async_save=False) as ckpt:
    assert ckpt.save(step, {"w": jnp.arange(4.0)}, data_state=state)


def test_through_the_checkpointer(workdir, tok, truth, tmp_path, monkeypatch):
  """DataStateHandler: a step written by 2 processes restored by 1 (it reads both files), then
  that one's step restored by 2 (each reads the one file)."""
  its = iterators(workdir, tok, 2)
  emitted = run(its, 4)
  states = states_of(its)
  directory = tmp_path / "checkpoints"
  _save(directory, 4, (0, 2), states[0], monkeypatch)
  # Process 1's handler writes its file into the same step (as orbax has every process do).
  monkeypatch.setattr(data_state_lib, "_process_identity", lambda: (1, 2))
  data_state_lib.DataStateHandler().save(directory / "4" / ckpt_lib.DATA,
                                   data_state_lib.DataStateSave(states[1]))
  ckpt_lib.write_integrity(directory / "4")
  assert sorted(p.name for p in (directory / "4" / "data").iterdir()
                if p.name.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"]

  monkeypatch.setattr(data_state_lib, "_process_identity", lambda: (0, 1))
  with ckpt_lib.Checkpointer(directory, every=1, keep=3, async_save=False) as ckpt:
    step, restored, data_state = ckpt.restore_latest_good(None)
  assert step == 4 and np.array_equal(np.asarray(restored["w"]), np.arange(4.0))
  assert data_state == M.elastic_envelope(states)
  one = M.build_train_iterator(demo_config(workdir), tok)
  one.set_state(data_state)
  emitted += run([one], 4)
  single = states_of([one])
  _save(directory, 8, (0, 1), single[0], monkeypatch)

  two = [M.build_train_iterator(demo_config(workdir), tok, i, 2) for i in range(2)]
  for i, it in enumerate(two):
    monkeypatch.setattr(data_state_lib, "_process_identity", lambda i=i: (i, 2))
    with ckpt_lib.Checkpointer(directory, every=1, keep=3, async_save=False) as ckpt:
      step, _, data_state = ckpt.restore_latest_good(None)
    assert step == 8 and data_state == M.elastic_envelope(single)
    it.set_state(data_state)
  emitted += run(two, 4)
  check_run(emitted, states_of(two), truth)

  # A step missing one of its processes' files is unreadable, not re-sharded.
  (directory / "4" / "data" / "process_1-of-2.json").unlink()
  monkeypatch.setattr(data_state_lib, "_process_identity", lambda: (0, 1))
  with pytest.raises(FileNotFoundError, match="incomplete"):
    data_state_lib.DataStateHandler().restore(directory / "4" / "data")


def test_grain_worker_states(workdir, tok, truth):
  """data.num_workers = 2: each worker packs its own stream (offset p + w * P, stride P * W).
  2 processes x 2 workers resume on 1 process without workers; then only the worker count
  changes (1 process: 0 -> 2 -> 0 workers), which re-shards the process's own state."""
  def worker_phase(its, batches):
    try:
      for _ in range(batches):
        for it in its:
          validate_batch(next(it), 128)
      return states_of(its)
    finally:
      for it in its:
        it.close()

  def emitted_by_workers(before, after, base=0):
    """What the workers emitted, unseen here: the samples of the positions they read (from base)
    and the samples handed to them, less those they still hold."""
    read = [key for ps in M._packer_states(after) for t in range(
        S.Stream(**ps["stream"]).first_index_at(base), ps["parent"]["next_index"])
        for key in truth(S.Stream(**ps["stream"]).position(t))]
    held = set(pending(after))
    return [key for key in read + pending(before) if key not in held]

  saved = worker_phase(iterators(workdir, tok, 2, num_workers=2), 3)
  streams = sorted((ps["stream"]["offset"], ps["stream"]["stride"]) for ps in M._packer_states(saved))
  assert streams == [(0, 4), (1, 4), (2, 4), (3, 4)]
  emitted = emitted_by_workers([], saved)
  one = iterators(workdir, tok, 1, saved)
  emitted += run(one, 3)
  inproc = states_of(one)
  check_run(emitted, inproc, truth)

  workers = [M.build_train_iterator(demo_config(workdir, num_workers=2), tok)]
  workers[0].set_state(inproc[0])
  after = worker_phase(workers, 2)
  assert sorted(S.Stream(**ps["stream"]).offset for ps in M._packer_states(after)) == [0, 1]
  emitted += emitted_by_workers(inproc, after, base=frontier(inproc))
  last = M.build_train_iterator(demo_config(workdir), tok)
  last.set_state(after[0])
  emitted += run([last], 3)
  check_run(emitted, states_of([last]), truth)
