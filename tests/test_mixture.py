"""The grain mixture: stage ratios realised, exact resume in a fresh process, host sharding,
ratio changes on restore, held-out batches, global arrays."""

import collections
import importlib
import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from nextstep_jax.data import mixture as M
from nextstep_jax.data import schedule as schedule_lib
from nextstep_jax.data import settings as settings_lib
from nextstep_jax.data import tokenizer as T
from nextstep_jax.batch import validate_batch
from configs import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SPEC §7 ratios (text-only, image-text pairs, image-to-image, interleaved), written out here
# independently of configs/common.py's STAGES table, which the stage configs are built from.
SPEC_RATIOS = {
    "stage1": dict(text=0.2, pair=0.6, edit=0.0, interleaved=0.2),
    "stage2": dict(text=0.2, pair=0.6, edit=0.0, interleaved=0.2),
    "anneal": dict(text=0.2, pair=0.6, edit=0.1, interleaved=0.1),
    "sft": dict(text=0.0, pair=0.9, edit=0.1, interleaved=0.0),
}


def stage_ratios(stage):
  """data.ratios of the stage's config file, configs/<stage>.py (no fallback: it must import)."""
  return dict(importlib.import_module(f"configs.{stage}").get_config().data.ratios)


def demo_config(workdir, ratios=None, **data):
  """The demo's data settings (digits, 32 px pixel path, 8 x 128 rows)."""
  d = dict(source="digits", batch_size=8, seq_len=128,
           ratios=ratios or dict(text=0.1, pair=0.6, edit=0.1, interleaved=0.2),
           image_size=32, min_image_tokens=16, max_image_tokens=16, max_images=5,
           max_row_image_tokens=80, drop_text_prob=0.3, payload="images", num_workers=0, num_threads=0,
           pack_open_rows=8, loss_on_prompt=True, renormalize=False, seed=0)
  d.update(data)
  return ml_collections.ConfigDict(dict(
      seed=0, workdir=str(workdir), data=d,
      image=dict(latent_channels=4, patch_size=2, vae_factor=4, token_dim=16),
      model=dict(vocab_size=512),
      tokenizer=dict(kind="sentencepiece", path="", vocab_size=512)))


def mixture_fixtures(name: str):
  """The module-scoped fixtures of a test module of the mixture (this one, tests/test_elastic_resume.py):
  `workdir`, a fresh temporary directory `name`N, and `tok`, the tokenizer of `demo_config(workdir)`.
  Assign them under those names: ``workdir, tok = mixture_fixtures("mix")``."""

  @pytest.fixture(scope="module")
  def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp(name)

  @pytest.fixture(scope="module")
  def tok(workdir):
    return T.tokenizer_from_config(demo_config(workdir))

  return workdir, tok


workdir, tok = mixture_fixtures("mix")


def test_spec_ratios_match_stage_configs():
  for stage, want in SPEC_RATIOS.items():
    want = {k: pytest.approx(v) for k, v in want.items()}
    assert want == dict(common.STAGES[stage]["ratios"]), stage
    assert want == stage_ratios(stage), stage


@pytest.mark.parametrize("stage", ["stage1", "stage2", "anneal", "sft"])
def test_realised_shares_match_stage_ratios(stage, workdir, tok):
  ratios = stage_ratios(stage)
  elements, _, _, _ = M.build_sample_dataset(demo_config(workdir, ratios), tok)
  n = 10_000
  counts = collections.Counter()
  for k in range(n):
    el = elements[k]
    assert el.bad is None, el
    counts[el.key[0]] += 1
  total = sum(ratios.values())
  for name in settings_lib.COMPONENTS:
    share = counts[name] / n
    assert abs(share - ratios.get(name, 0.0) / total) <= 0.015, (stage, name, share)
  print(stage, {k: round(v / n, 4) for k, v in counts.items()})


def test_block_quotas_exact():
  q = schedule_lib.block_quotas({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 1000)
  assert sorted(q.values()) == [333, 333, 334] and sum(q.values()) == 1000
  assert schedule_lib.block_quotas({"pair": 0.9, "edit": 0.1}, 1000) == {"pair": 900, "edit": 100}
  with pytest.raises(ValueError, match="unknown components"):
    settings_lib.normalise_ratios({"video": 1.0})
  with pytest.raises(ValueError, match="non-negative"):
    settings_lib.normalise_ratios({"pair": -1.0})
  with pytest.raises(ValueError, match="positive entry"):
    settings_lib.normalise_ratios({"pair": 0.0})


def test_batches_follow_the_contract(workdir, tok):
  it = M.build_train_iterator(demo_config(workdir), tok)
  fills = []
  for _ in range(20):
    batch = next(it)
    validate_batch(batch, 128)
    assert batch["images"].shape == (8, 5, 32, 32, 3)
    assert batch["images"].min() >= -1.0 and batch["images"].max() <= 1.0
    seg = batch["segment_ids"]
    # Every image position points at a token of an image the row carries.
    idx = batch["image_index"]
    assert np.all(idx[idx >= 0] < 16 * batch["num_images"][:, None].repeat(128, 1)[idx >= 0])
    assert np.all((idx >= 0) == (batch["tokens"] == tok.placeholder_id))
    assert np.all(batch["fm_mask"][idx < 0] == 0)
    assert np.all(batch["tokens"][seg == 0] == tok.pad_id)
    fills.append(np.mean(seg > 0))
  print(f"demo packing: non-pad fraction {np.mean(fills):.3f}")
  assert np.mean(fills) > 0.85
  counters = it.counters
  assert counters["batches"] == 20 and not any(k.startswith("skipped/") for k in counters)


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from nextstep_jax.data import mixture as M, tokenizer as T
    from tests.test_mixture import demo_config
    workdir, state_file, out_file, m, hosts, host = sys.argv[1:7]
    config = demo_config(workdir)
    tok = T.tokenizer_from_config(config)
    it = M.build_train_iterator(config, tok, int(host), int(hosts))
    with open(state_file) as f:
      it.set_state(json.load(f))
    batches = [next(it) for _ in range(int(m))]
    np.savez(out_file, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
""")


@pytest.mark.parametrize("hosts,host", [(1, 0), (2, 1)])
def test_exact_resume_in_fresh_process(workdir, tok, tmp_path, hosts, host):
  n, m = 6, 5
  it = M.build_train_iterator(demo_config(workdir), tok, host, hosts)
  for _ in range(n):
    next(it)
  state_file = tmp_path / "state.json"
  state_file.write_text(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(m)]
  script = tmp_path / "resume.py"
  script.write_text(RESUME_SCRIPT)
  out = tmp_path / "resumed.npz"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, str(script), str(workdir), str(state_file), str(out),
                         str(m), str(hosts), str(host)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out)
  for i, batch in enumerate(expected):
    for k, v in batch.items():
      np.testing.assert_array_equal(got[f"{i}/{k}"], v, err_msg=f"batch {i} key {k}")


def test_two_hosts_partition_the_single_host_stream(workdir, tok):
  config = demo_config(workdir)
  elements, _, _, _ = M.build_sample_dataset(config, tok)
  single = [tuple(elements[k].key) for k in range(1000)]
  shards = [[tuple(e.key) for e in (elements[h::2][i] for i in range(500))] for h in (0, 1)]
  assert len(set(single)) == 1000
  union = shards[0] + shards[1]
  assert len(set(union)) == len(union) == 1000, "no record twice"
  assert set(union) == set(single)
  records = [(name, n) for name, n, _ in single]
  assert len(set(records)) == 1000, "(component, record ordinal) identifies a record"

  # Through packing: every packed sample of host h comes from a position h mod 2 of the single
  # stream, with the same record there; no sample appears on both hosts.
  schedule = M.build_sample_dataset(config, tok)[1].schedule
  seen = set()
  for h in (0, 1):
    it = M.build_train_iterator(config, tok, h, 2)
    for _ in range(10):
      batch = next(it)
      assert batch["tokens"].shape == (4, 128), "local rows = batch_size // process_count"
      for row in it.packer_iterator.last_batch_keys:
        for name, n, k, j in row:
          assert k % 2 == h and schedule.select(k) == (name, n)
          assert (name, n, j) not in seen
          seen.add((name, n, j))


def test_restore_under_new_ratios_keeps_positions(workdir, tok):
  before = demo_config(workdir)
  it = M.build_train_iterator(before, tok)
  consumed = collections.defaultdict(set)
  for _ in range(10):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  elements, _, _, _ = M.build_sample_dataset(before, tok)
  for k in range(state["last_k"] + 1):
    name, n, _ = elements[k].key
    consumed[name].add(n)
  after = demo_config(workdir, dict(text=0.0, pair=0.5, edit=0.3, interleaved=0.2))
  it2 = M.build_train_iterator(after, tok)
  it2.set_state(state)
  for _ in range(10):
    next(it2)
    for row in it2.packer_iterator.last_batch_keys:
      for name, n, k, _ in row:
        assert name != "text", "a component with ratio 0 is gone"
        if k > state["last_k"]:
          assert n not in consumed[name], f"{name} record {n} repeated after the ratio change"
  new_state = it2.get_state()
  assert new_state["mixture"]["anchor_k"] == state["last_k"] + 1
  assert new_state["mixture"]["anchor_counts"]["text"] == len(consumed["text"])
  # Shares after the change follow the new ratios.
  after_counts = collections.Counter()
  sched = it2.packer_iterator.mixture.schedule
  for k in range(sched.anchor_k, sched.anchor_k + 2000):
    after_counts[sched.select(k)[0]] += 1
  assert after_counts == {"pair": 1000, "edit": 600, "interleaved": 400}


def test_eval_batches_fixed_and_heldout(workdir, tok):
  config = demo_config(workdir)
  evals = M.build_eval_batches(config, tok, 2)
  assert sorted(evals) == sorted(["text", "pair", "edit", "interleaved"])
  again = M.build_eval_batches(config, tok, 2)
  for name, batches in evals.items():
    assert len(batches) == 2
    for a, b in zip(batches, again[name]):
      validate_batch(a, 128)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  # Pair samples never flip: each segment starts with caption text, not an image block.
  pair = evals["pair"][0]
  for r in range(8):
    for s in range(1, pair["segment_ids"][r].max() + 1):
      first = pair["tokens"][r][pair["segment_ids"][r] == s][0]
      assert first != tok.area_id
  text = evals["text"][0]
  assert text["num_images"].sum() == 0 and text["fm_mask"].sum() == 0


def test_config_errors(workdir, tok):
  with pytest.raises(ValueError, match="divisible by the process count"):
    M.build_train_iterator(demo_config(workdir), tok, 0, 3)
  with pytest.raises(ValueError, match="image_encoder"):
    M.build_train_iterator(demo_config(workdir, payload="image_tokens"), tok)
  with pytest.raises(ValueError, match="outside data.min_image_tokens"):
    M.build_train_iterator(demo_config(workdir, min_image_tokens=64, max_image_tokens=64), tok)
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    M.build_train_iterator(demo_config(workdir, source=str(workdir / "missing")), tok)


def test_latent_path_with_encoder(workdir, tok):
  def encoder(img):   # uint8 (32, 32, 3) -> (16, 16) patch tokens: mean of each 8x8 patch
    x = img.astype(np.float32).reshape(4, 8, 4, 8, 3).mean(axis=(1, 3))
    return np.repeat(x.reshape(16, 3), 6, axis=1)[:, :16] / 255.0
  it = M.build_train_iterator(demo_config(workdir, payload="image_tokens"), tok,
                              image_encoder=encoder)
  batch = next(it)
  validate_batch(batch, 128)
  assert batch["image_tokens"].shape == (8, 80, 16)
  used = batch["image_index"] >= 0
  assert batch["image_tokens"].sum() > 0 and used.sum() == 16 * batch["num_images"].sum()


def test_to_global(workdir, tok):
  import jax
  from jax.sharding import Mesh, PartitionSpec
  batch = next(M.build_train_iterator(demo_config(workdir), tok))
  devices = np.array(jax.devices())
  n = max(d for d in (1, 2, 4, 8) if d <= len(devices))   # 8 with tests/conftest.py
  mesh = Mesh(devices[:n], ("data",))
  out = M.to_global(batch, mesh)
  for k, v in batch.items():
    assert out[k].shape == v.shape
    np.testing.assert_array_equal(np.asarray(out[k]), v)
  assert out["tokens"].sharding.spec == PartitionSpec(("data",))


def test_worker_process_matches_in_process(workdir, tok):
  """data.num_workers=1: packing runs in a grain worker process; same batches, resumable."""
  inproc = M.build_train_iterator(demo_config(workdir), tok)
  want = [next(inproc) for _ in range(6)]
  it = M.build_train_iterator(demo_config(workdir, num_workers=1), tok)
  try:
    got = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    assert it.counters["batches"] >= 3
  finally:
    it.close()
  resumed = M.build_train_iterator(demo_config(workdir, num_workers=1), tok)
  try:
    resumed.set_state(state)
    got += [next(resumed) for _ in range(3)]
  finally:
    resumed.close()
  for a, b in zip(want, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_digit_records_and_pixels(workdir, tok):
  from nextstep_jax.data import digits as D
  pairs = D.DigitRecords("pair", "train")
  images, labels = D.load_split("train")
  t = len(D.CAPTION_TEMPLATES)
  for digit in (0, 1234, 4499):
    rec = pairs[digit * t]   # template 0: the evaluation prompt
    assert rec["caption"] == f"a handwritten digit {labels[digit]}"
    np.testing.assert_array_equal(
        rec["images"][0].astype(np.float32) / 127.5 - 1.0, D.to_pixels(images[digit:digit + 1])[0])
  assert {D.caption(0, d) for d in range(10)} == {f"a handwritten digit {d}" for d in range(10)}
  train_idx, held_idx = D.split_indices("train"), D.split_indices("heldout")
  assert len(train_idx) == 4500 and len(held_idx) == 500 and not set(train_idx) & set(held_idx)
  assert not set(D.text_split("train")) & set(D.text_split("heldout"))
  edits = D.DigitRecords("edit", "heldout")
  assert len(edits) == 500 * len(D.EDITS)
  inv = edits[0]
  np.testing.assert_array_equal(inv["images"][1][2:30, 2:30], 255 - inv["images"][0][2:30, 2:30])
  inter = D.DigitRecords("interleaved", "train")[7]
  assert sum(isinstance(s, int) for s in inter["segments"]) == len(inter["images"]) >= 2
  # A pair in a batch carries exactly the digit's pixels.
  it = M.build_train_iterator(demo_config(workdir, dict(pair=1.0), drop_text_prob=0.0), tok)
  batch = next(it)
  name, n, _, _ = it.packer_iterator.last_batch_keys[0][0]
  record = it.packer_iterator.mixture.sources[name][n]
  np.testing.assert_array_equal(batch["images"][0, 0],
                                record["images"][0].astype(np.float32) / 127.5 - 1.0)
  assert tok.decode(batch["tokens"][0][:batch["positions"][0].tolist().index(0, 1)].tolist()) \
      .startswith(record["caption"])


def test_grain_checkpoint_handler_roundtrip(workdir, tok, tmp_path):
  """train.py saves the iterator with grain's orbax CheckpointHandler: JSON state per process."""
  import grain
  from etils import epath
  it = M.build_train_iterator(demo_config(workdir), tok)
  for _ in range(3):
    next(it)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), it)
  want = [next(it) for _ in range(3)]
  fresh = M.build_train_iterator(demo_config(workdir), tok)
  handler.restore(epath.Path(tmp_path), fresh)
  for a in want:
    b = next(fresh)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
