"""DPO: the loss (log 2 at step 0, finite differences, shared noise, no gradient into the reference),
per-token errors against the model's FM loss, preference records and batches (format, errors,
resume), the digit builder, the sharded step, and the demo-sized run end to end with checkpoint and
exact resume."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import base_config
from nextstep_jax.evaluation import preferences as digit_prefs
from nextstep_jax.training import dpo
from nextstep_jax.data import preferences
from nextstep_jax import parallel
from nextstep_jax.data.packing import RowSpec
from nextstep_jax.models import nextstep as ns
from tests.batches import synthetic_batch
from tests.test_sequences import CharTokenizer

LOG2 = math.log(2.0)


def tiny_config():
  c = base_config("tiny", "tiny")
  c.model.vocab_size, c.model.hidden_size, c.model.num_heads, c.model.num_kv_heads = 64, 32, 2, 1
  c.model.head_dim, c.model.intermediate_size, c.model.num_layers = 16, 64, 1
  c.head.dim, c.head.num_layers = 32, 1
  c.image.latent_channels, c.image.patch_size = 4, 2
  c.data.seq_len, c.data.batch_size = 32, 4
  c.optim.lr = c.optim.min_lr = 1e-3
  c.dpo = dpo_section_for_tests()
  return c


def dpo_section_for_tests(beta=10.0):
  from configs.dpo import dpo_section
  return dpo_section(beta=beta)


def random_params(config, seed=0, scale=0.05):
  """A tiny model whose every weight is non-zero (the zero-initialised head layers would hide gradients)."""
  make = lambda: ns.build_model(config, seed=seed)  # noqa: E731
  graphdef, _ = nnx.split(nnx.eval_shape(make), nnx.Param)

  @jax.jit
  def build():
    leaves, tree = jax.tree.flatten(nnx.to_pure_dict(nnx.state(make(), nnx.Param)))
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])

  return graphdef, build()


@pytest.fixture(scope="module")
def tiny():
  config = tiny_config()
  graphdef, params = random_params(config)
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(4, 32, 64, 16, seed=1).items()}
  return config, graphdef, params, batch


def _loss(graphdef, beta=10.0, reduction="mean"):
  def f(params, ref, batch, key):
    return dpo.pair_loss(nnx.merge(graphdef, params), nnx.merge(graphdef, ref), batch, batch["image_tokens"], key,
                         beta, reduction)
  return jax.jit(f)


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------

def test_token_errors_match_the_model_fm_loss(tiny):
  _, graphdef, params, batch = tiny
  model = nnx.merge(graphdef, params)
  key = jax.random.key(5)
  err, weight = jax.jit(lambda b: dpo.fm_token_errors(model, b, b["image_tokens"], key))(batch)
  _, metrics = jax.jit(lambda b: model.loss(b, b["image_tokens"], key))(batch)
  assert err.shape == weight.shape == (4, 16)
  np.testing.assert_array_equal(np.asarray(weight).sum(axis=1), [4, 4, 4, 4])
  np.testing.assert_allclose(float(jnp.sum(err * weight) / jnp.sum(weight)), float(metrics["fm"]), rtol=1e-5)
  per_row = dpo.image_errors(err, weight, "mean")
  np.testing.assert_allclose(dpo.image_errors(err, weight, "sum"), per_row * 4, rtol=1e-6)
  with pytest.raises(ValueError, match="dpo.reduction"):
    dpo.image_errors(err, weight, "max")


def test_loss_is_log2_when_policy_equals_reference(tiny):
  _, graphdef, params, batch = tiny
  loss, m = _loss(graphdef)(params, params, batch, jax.random.key(0))
  assert float(loss) == pytest.approx(LOG2, abs=1e-6)
  assert float(m["margin"]) == pytest.approx(0.0, abs=1e-6) and float(m["pairs"]) == 2.0
  np.testing.assert_allclose(m["fm_chosen"], m["ref_fm_chosen"], rtol=1e-6)


def test_noise_is_shared_between_the_images_of_a_pair_and_the_two_models(tiny):
  _, graphdef, params, batch = tiny
  _, other = random_params(tiny_config(), seed=7)
  fn = _loss(graphdef)
  # Different images: a policy unlike the reference moves the loss away from log 2.
  loss, _ = fn(other, params, batch, jax.random.key(0))
  assert abs(float(loss) - LOG2) > 1e-4
  # Each rejected row a copy of its chosen row: with shared noise the bracket is exactly zero for any policy.
  twin = {k: jnp.repeat(v[::2], 2, axis=0) for k, v in batch.items()}
  loss, m = fn(other, params, twin, jax.random.key(0))
  assert float(loss) == pytest.approx(LOG2, abs=1e-6)
  assert float(m["fm_chosen"]) == pytest.approx(float(m["fm_rejected"]), rel=1e-6)


def test_dpo_loss_formula_and_masks():
  pol = jnp.array([[0.5, 0.9], [1.2, 1.0], [0.3, 0.3]])
  ref = jnp.array([[0.6, 0.8], [1.0, 1.1], [9.0, 9.0]])
  beta = 3.0
  bracket = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
  want = -jax.nn.log_sigmoid(-beta * bracket)
  loss, m = dpo.dpo_loss(pol, ref, beta)
  np.testing.assert_allclose(loss, want.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["reward_accuracy"], 1 / 3, rtol=1e-6)   # only pair 0 ranks the chosen first
  np.testing.assert_allclose(m["margin"], (-beta * bracket).mean(), rtol=1e-5)
  valid = jnp.array([1.0, 1.0, 0.0])
  loss_v, m_v = dpo.dpo_loss(pol, ref, beta, valid)
  np.testing.assert_allclose(loss_v, want[:2].mean(), rtol=1e-6)
  assert float(m_v["pairs"]) == 2.0
  loss_s, m_s = dpo.dpo_loss(pol, ref, beta, valid, sft_weight=0.5)
  np.testing.assert_allclose(loss_s, want[:2].mean() + 0.5 * pol[:2, 0].mean(), rtol=1e-6)
  np.testing.assert_allclose(m_s["dpo_loss"], loss_v, rtol=1e-6)


def _directional_check(fn, grad_fn, params, ref, batch, key, eps=1e-2, seed=0):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  u = [jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  norm = jnp.sqrt(sum(jnp.sum(x * x) for x in u))
  u = jax.tree.unflatten(tree, [x / norm for x in u])
  shifted = lambda s: jax.tree.map(lambda p, d: p + s * d, params, u)  # noqa: E731
  fd = (float(fn(shifted(eps), ref, batch, key)[0]) - float(fn(shifted(-eps), ref, batch, key)[0])) / (2 * eps)
  g = grad_fn(params, ref, batch, key)
  analytic = float(sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(u))))
  return fd, analytic


def test_gradient_matches_finite_differences(tiny):
  _, graphdef, params, batch = tiny
  fn = _loss(graphdef)
  grad_fn = jax.jit(jax.grad(lambda p, r, b, k: fn(p, r, b, k)[0]))
  key = jax.random.key(3)
  # At step 0 (policy = reference) and at a policy that has moved away from the reference.
  moved = jax.tree.map(lambda p: p * 1.05 + 0.01, params)
  for policy in (params, moved):
    for seed in (0, 1):
      fd, analytic = _directional_check(fn, grad_fn, policy, params, batch, key, seed=seed)
      assert abs(analytic) > 1e-3, analytic
      assert fd == pytest.approx(analytic, rel=2e-2, abs=1e-4), (fd, analytic)
  # The reference gets no gradient.
  ref_grad = jax.jit(jax.grad(lambda p, r, b, k: fn(p, r, b, k)[0], argnums=1))(moved, params, batch, key)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(ref_grad))


# ------------------------------------------------------------------------------------------------
# Preference records and batches
# ------------------------------------------------------------------------------------------------

def _pairs(n, size=32, seed=0):
  rng = np.random.default_rng(seed)
  chosen = [rng.integers(0, 255, (size, size), dtype=np.uint8) for _ in range(n)]
  rejected = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]
  return [f"digit {i % 10}" for i in range(n)], chosen, rejected


def test_records_round_trip_and_errors(tmp_path):
  prompts, chosen, rejected = _pairs(5)
  path = preferences.write_preferences(str(tmp_path), "train", prompts, chosen, rejected, [{"i": i} for i in range(5)])
  assert os.path.basename(path) == "train.jsonl"
  recs = preferences.PreferenceRecords(str(tmp_path), "train")
  assert len(recs) == 5
  r = recs[3]
  assert r["prompt"] == "digit 3" and r["meta"] == {"i": 3} and r["index"] == 3
  np.testing.assert_array_equal(r["chosen"], np.repeat(chosen[3][..., None], 3, axis=-1))
  np.testing.assert_array_equal(r["rejected"], rejected[3])
  with pytest.raises(ValueError, match="differ in size"):
    preferences.write_preferences(str(tmp_path), "heldout", prompts[:1], chosen[:1], [np.zeros((16, 16), np.uint8)])
  with pytest.raises(ValueError, match="uint8"):
    preferences.write_preferences(str(tmp_path), "heldout", prompts[:1], [np.zeros((32, 32))], rejected[:1])
  with pytest.raises(FileNotFoundError, match="heldout.jsonl does not exist"):
    preferences.PreferenceRecords(str(tmp_path), "heldout")
  bad = tmp_path / "heldout.jsonl"
  bad.write_text('{"prompt": "x", "chosen": "a.png", "rejected": "b.png"}\n{"prompt": "y", "chosen": ""}\n')
  with pytest.raises(ValueError, match=r"heldout.jsonl:2: field 'chosen'"):
    preferences.PreferenceRecords(str(tmp_path), "heldout")
  bad.write_text("not json\n")
  with pytest.raises(ValueError, match=r"heldout.jsonl:1: not valid JSON"):
    preferences.PreferenceRecords(str(tmp_path), "heldout")
  bad.write_text('{"prompt": "x", "chosen": "missing.png", "rejected": "b.png"}\n')
  with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
    preferences.PreferenceRecords(str(tmp_path), "heldout")[0]
  bad.write_text("\n")
  with pytest.raises(ValueError, match="no preference pairs"):
    preferences.PreferenceRecords(str(tmp_path), "heldout")
  with pytest.raises(ValueError, match="split"):
    preferences.PreferenceRecords(str(tmp_path), "test")


def _builder(seq_len=48):
  spec = RowSpec(seq_len=seq_len, payload="images", max_images=1, max_image_tokens=16, token_dim=16,
                 image_shape=(32, 32), pad_id=0)
  return preferences.PairBuilder(CharTokenizer(), spec, unit=8)


def test_pair_batches_interleave_and_resume_exactly(tmp_path):
  prompts, chosen, rejected = _pairs(7)
  prompts[2] = "x" * 40   # too long for 48-token rows: skipped and counted
  # Two image sizes: 16 px pairs form their own batches (a pixel batch holds one size).
  _, c16, r16 = _pairs(3, size=16, seed=1)
  preferences.write_preferences(str(tmp_path), "train", prompts + ["small"] * 3, chosen + c16, rejected + r16)
  recs = preferences.PreferenceRecords(str(tmp_path), "train")
  it = preferences.PreferenceIterator(recs, _builder(), pairs=2, seed=4)
  first = next(it)
  assert first["tokens"].shape == (4, 48) and first["images"].shape[:2] == (4, 1)
  for i in range(2):
    c, r = 2 * i, 2 * i + 1
    np.testing.assert_array_equal(first["tokens"][c], first["tokens"][r])   # same prompt, same layout
    assert not np.array_equal(first["images"][c], first["images"][r])
    assert first["fm_mask"][c].sum() == first["fm_mask"][r].sum() > 0
  np.testing.assert_array_equal(first["targets"][0][first["targets"][0] != -100][:1], [1])  # CE starts at the area
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(4)]
  again = preferences.PreferenceIterator(recs, _builder(), pairs=2, seed=4)
  again.set_state(state)
  for a, b in zip(want, [next(again) for _ in range(4)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert it.counters["skipped/too_long"] >= 1
  shapes = {b["images"].shape[2] for b in want + [first]}
  assert shapes == {16, 32}
  # Two processes: each decodes its half of every global batch; together they give the one-process batch.
  halves = [preferences.PreferenceIterator(recs, _builder(), pairs=2, seed=4, process_index=p, process_count=2)
            for p in range(2)]
  single = preferences.PreferenceIterator(recs, _builder(), pairs=2, seed=4)
  for _ in range(5):
    parts, whole = [next(h) for h in halves], next(single)
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k], err_msg=k)
  with pytest.raises(ValueError, match="multiple of the 2 processes"):
    preferences.PreferenceIterator(recs, _builder(), pairs=3, process_count=2)
  # A state from other data is refused.
  preferences.write_preferences(str(tmp_path / "other"), "train", *_pairs(3))
  with pytest.raises(ValueError, match="data changed"):
    preferences.PreferenceIterator(preferences.PreferenceRecords(str(tmp_path / "other")), _builder(), 2).set_state(state)
  # Nothing usable: a clear error instead of an endless loop.
  preferences.write_preferences(str(tmp_path / "long"), "train", ["y" * 60] * 2, *_pairs(2)[1:])
  with pytest.raises(RuntimeError, match="no usable preference pair"):
    next(preferences.PreferenceIterator(preferences.PreferenceRecords(str(tmp_path / "long")), _builder(), 2))


def test_digit_preferences_with_a_stand_in_model(tmp_path):
  from nextstep_jax.data import digits
  calls = []

  def generator(prompts, key):
    # Stand-in "model": image values encode the round; the stand-in classifier reads every image as a 0.
    calls.append(len(prompts))
    return np.full((len(prompts), 32, 32, 3), len(calls), np.uint8)

  def classify(images):
    return np.zeros(len(images), np.int64)

  summary = digit_prefs.build_digit_preferences(str(tmp_path), "train", 30, seed=1, generator=generator,
                                        classify=classify, rounds=2)
  recs = preferences.PreferenceRecords(str(tmp_path), "train")
  assert len(recs) == 30 and calls == [30, 3]   # round 1 only for the digit-0 prompts
  metas = [recs[i]["meta"] for i in range(30)]
  assert sorted(m["digit"] for m in metas) == sorted(i % 10 for i in range(30))
  for i, m in enumerate(metas):
    r = recs[i]
    assert r["prompt"] == digits.caption(m["template"], m["digit"]) and m["chosen_source"] == "real"
    assert m["rejected_class"] != m["digit"]
    if m["digit"] == 0:   # the model always drew the right digit: a real digit of another class
      assert m["rejected_source"] == "real"
    else:
      assert m["rejected_source"] == "sample" and m["rejected_round"] == 0
      np.testing.assert_array_equal(r["rejected"], np.full((32, 32, 3), 1, np.uint8))
  assert summary["rejected_from_samples"] == 27 and summary["generated_images"] == 33
  with open(tmp_path / "info.json") as f:
    assert json.load(f)["train"]["pairs"] == 30
  # Real chosen digits are real digits of the prompted class.
  train_u8, labels = digits.load_split("train")
  padded = digits.pad_digits_u8(train_u8, 32)
  m = metas[0]
  np.testing.assert_array_equal(recs[0]["chosen"], padded[m["chosen_index"]])
  assert labels[m["chosen_index"]] == m["digit"]
  # All real: no model needed.
  s = digit_prefs.build_digit_preferences(str(tmp_path), "heldout", 10, rejected="real")
  assert s["rejected_from_samples"] == 0
  with pytest.raises(ValueError, match="need a generator"):
    digit_prefs.build_digit_preferences(str(tmp_path), "heldout", 10)
  with pytest.raises(ValueError, match="templates"):
    digit_prefs.plan_digit_pairs(10, templates=[99])


def test_dpo_settings_errors():
  c = tiny_config()
  c.dpo.beta = 0.0
  c.dpo.reduction = "max"
  c.dpo.data = ""
  with pytest.raises(Exception, match=r"(?s)dpo.beta=0.0.*dpo.reduction='max'.*dpo.data is empty.*data.payload"):
    dpo.dpo_settings(c)
  del c["dpo"]
  with pytest.raises(Exception, match="no 'dpo' section"):
    dpo.dpo_settings(c)


# ------------------------------------------------------------------------------------------------
# The sharded step
# ------------------------------------------------------------------------------------------------

def test_sharded_step_keeps_the_reference_sharded_like_the_policy():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (virtual) devices")
  c = tiny_config()
  c.mesh.axes.update(dict(data=2, fsdp=2, tensor=2))
  mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:8])
  t = dpo.DPOTrainer(c, mesh)
  _, params = random_params(c)
  ref = jax.device_put(params, t.param_shardings)
  state = t.state_from_params(jax.device_put(params, t.param_shardings))
  q = ref["backbone"]["layers"]["q_kernel"]
  assert q.sharding == state["params"]["backbone"]["layers"]["q_kernel"].sharding
  assert np.prod(q.shape) // np.prod(q.sharding.shard_shape(q.shape)) == 4   # fsdp x tensor
  batch = synthetic_batch(8, 32, 64, 16, seed=2)
  losses = []
  for _ in range(2):
    state, m = t.dpo_step_fn(state, ref, parallel.global_batch(batch, mesh))
    losses.append(float(m["loss"]))
  assert losses[0] == pytest.approx(LOG2, abs=1e-6) and losses[1] != losses[0]
  # The reference was not donated (still readable) and did not move; the policy did.
  jax.tree.map(lambda r, p: np.testing.assert_array_equal(np.asarray(r), np.asarray(p)), ref, params)
  assert not np.array_equal(np.asarray(state["params"]["head"]["cond_kernel"]),
                            np.asarray(params["head"]["cond_kernel"]))
  jax.tree.map(lambda a, s: None if a.sharding == s else pytest.fail(f"{a.sharding} != {s}"), state["params"],
               t.param_shardings)


def test_lora_dpo_uses_the_frozen_base_as_reference():
  c = tiny_config()
  c.lora.rank = 2
  c.mesh.axes.update(dict(data=1, fsdp=1, tensor=1))
  mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:1])
  t = dpo.DPOTrainer(c, mesh)
  assert t.ref_shardings is None
  _, params = random_params(c)
  state = t.state_from_params(params)
  batch = parallel.global_batch(synthetic_batch(4, 32, 64, 16, seed=2), mesh)
  state, m = t.dpo_step_fn(state, None, batch)
  assert float(m["loss"]) == pytest.approx(LOG2, abs=1e-6)   # adapters start at zero: policy = base
  state, m = t.dpo_step_fn(state, None, batch)
  assert float(m["loss"]) != pytest.approx(LOG2, abs=1e-6)
  jax.tree.map(lambda b, p: np.testing.assert_array_equal(np.asarray(b), np.asarray(p)), state["base"], params)
  evals = t.dpo_eval_fn(state["params"], None, batch, state["base"])
  assert np.isfinite(float(evals["loss"]))


# ------------------------------------------------------------------------------------------------
# The demo config end to end: preference data, from the SFT checkpoint, checkpoint, exact resume
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dpo_demo_runs_checkpoints_and_resumes_exactly(tmp_path, capsys):
  from configs import dpo_demo
  from nextstep_jax.training import metrics
  from nextstep_jax.training.checkpoint import read_step
  from tests.runs import make_base_run, point_at, shrink
  c = dpo_demo.get_config()
  with c.unlocked():
    shrink(c)
    base, _ = make_base_run(str(tmp_path / "sft"), c)
    point_at(c, base)
    prefs = str(tmp_path / "pairs")
    digit_prefs.build_digit_preferences(prefs, "train", 24, rejected="real")
    digit_prefs.build_digit_preferences(prefs, "heldout", 8, rejected="real")
    c.dpo.data = prefs
    c.dpo.heldout_batches = 1
    c.data.batch_size = 8
    c.steps, c.log_every, c.eval_every, c.optim.warmup_steps = 3, 1, 2, 1
    c.checkpoint.every = 2
    c.checkpoint.keep = 3
  run_a = str(tmp_path / "a")
  last = dpo.train_dpo(c, run_a)
  out = capsys.readouterr().out
  assert "policy initialised from" in out and "reference from" in out
  rows = metrics.read_jsonl(os.path.join(run_a, "metrics.jsonl"))
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  assert train_rows[0]["loss"] == pytest.approx(LOG2, abs=1e-5)   # step 0: policy = reference
  assert any("eval/reward_accuracy" in r for r in rows)
  assert np.isfinite(last["loss"]) and last["pairs"] == 8
  # Resume: a copy of run A's checkpoints whose step 3 is corrupt falls back to step 2 (step 3 moved
  # aside, not deleted), and continuing to step 3 lands on A's step 3 exactly.
  run_b = str(tmp_path / "b")
  shutil.copytree(os.path.join(run_a, "checkpoints"), os.path.join(run_b, "checkpoints"))
  state_dir = os.path.join(run_b, "checkpoints", "3", "state")
  biggest = max((os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  dpo.train_dpo(c, run_b)
  assert "resumed from step 2" in capsys.readouterr().out
  assert os.path.isdir(os.path.join(run_b, "checkpoints", "3.corrupt"))
  step_a, state_a, data_a = read_step(os.path.join(run_a, "checkpoints"))
  step_b, state_b, data_b = read_step(os.path.join(run_b, "checkpoints"))
  assert step_a == step_b == 3 and data_a == data_b
  jax.tree.map(np.testing.assert_array_equal, state_b["params"], state_a["params"])
  with open(os.path.join(run_a, "checkpoints", "config.json")) as f:
    assert json.load(f)["dpo"]["beta"] == c.dpo.beta
