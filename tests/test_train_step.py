"""The sharded train step: same numbers on 1 device and on 8-device meshes, params really sharded."""

import jax
import numpy as np
import pytest

from configs.common import base_config
from nextstep_jax import parallel
from nextstep_jax.training import trainer as trainer_lib
from tests.batches import synthetic_batch
from tests.tolerance import assert_trees_close_fp32


def _config(axes):
  c = base_config("tiny", "tiny")
  c.model.vocab_size = 64
  c.model.hidden_size = 64
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 16
  c.model.intermediate_size = 128
  c.model.num_layers = 2
  c.head.dim = 32
  c.image.latent_channels = 4
  c.image.patch_size = 2
  c.optim.lr = 1e-3
  c.optim.min_lr = 1e-3
  c.steps = 10
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.mesh.axes.update(axes)
  return c


def _run(axes, devices, steps=1):
  c = _config(axes)
  mesh = parallel.make_mesh(c.mesh, devices=devices)
  t = trainer_lib.Trainer(c, mesh)
  state = t.init_state(seed=0)
  losses = []
  for s in range(steps):
    batch = parallel.global_batch(synthetic_batch(8, 32, 64, 16, seed=s), mesh)
    state, metrics = t.step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  return t, state, losses


@pytest.mark.slow
def test_sharded_step_equals_single_device():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (virtual) devices")
  _, ref_state, ref_losses = _run(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  ref_params = jax.tree.map(np.asarray, ref_state["params"])
  for axes in (dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1), dict(data=2, fsdp=2, tensor=2)):
    t, state, losses = _run(axes, jax.devices()[:8])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(axes))
    # Params after Adam steps: rounding differences are update-sized whatever a leaf's magnitude, so one
    # scale for the tree (max |param|, about 1: the norm weights).
    assert_trees_close_fp32(jax.tree.map(np.asarray, state["params"]), ref_params, rtol=1e-5, err_msg=str(axes))
    q_spec = state["params"]["backbone"]["layers"]["q_kernel"].sharding.spec
    embed_spec = state["params"]["backbone"]["embed_tokens"].sharding.spec
    mlp_spec = state["params"]["backbone"]["layers"]["gate_kernel"].sharding.spec
    if axes["fsdp"] > 1:
      assert q_spec[1] == "fsdp" and embed_spec[1] == "fsdp", (axes, q_spec, embed_spec)
    if axes["tensor"] > 1:
      assert q_spec[2] == "tensor" and mlp_spec[2] == "tensor" and embed_spec[0] == "tensor", (axes, q_spec)
    # Really sharded: each device holds 1/(fsdp*tensor) of the attention weights, 1/data of nothing.
    q = state["params"]["backbone"]["layers"]["q_kernel"]
    shard = q.sharding.shard_shape(q.shape)
    assert np.prod(q.shape) // np.prod(shard) == axes["fsdp"] * axes["tensor"], (axes, shard)
    # Adam moments follow their parameters' shardings.
    mu = [x for x in jax.tree.leaves(state["opt_state"]) if x.shape == ref_params["backbone"]["layers"]["q_kernel"].shape]
    assert mu and all(m.sharding.spec == q_spec for m in mu)


def test_non_finite_loss_skips_update():
  c = _config(dict(data=1, fsdp=1, tensor=1))
  mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:1])
  t = trainer_lib.Trainer(c, mesh)
  state = t.init_state(seed=0)
  before = jax.tree.map(np.asarray, state["params"])
  batch = synthetic_batch(8, 32, 64, 16)
  batch["image_tokens"][0, 0, 0] = np.nan
  state, metrics = t.step_fn(state, parallel.global_batch(batch, mesh))
  assert float(metrics["finite"]) == 0.0 and int(state["skipped"]) == 1 and int(state["step"]) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state["params"], before)


def _single(config_updates):
  c = _config(dict(data=1, fsdp=1, tensor=1))
  for k, v in config_updates.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:1])
  return c, mesh, trainer_lib.Trainer(c, mesh)


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch():
  batch = synthetic_batch(8, 32, 64, 16, seed=3)
  results = []
  for k in (1, 4):
    _, mesh, t = _single({"optim.grad_accum": k})
    state = t.init_state(seed=0)
    state, m = t.step_fn(state, parallel.global_batch(batch, mesh))
    results.append((jax.tree.map(np.asarray, state["params"]), {n: float(v) for n, v in m.items()}))
  (p1, m1), (p4, m4) = results
  for n in ("loss", "ce", "fm", "grad_norm", "text_tokens", "image_tokens"):
    np.testing.assert_allclose(m4[n], m1[n], rtol=1e-5, err_msg=n)
  assert_trees_close_fp32(p4, p1, rtol=1e-5)


def test_ema_tracks_params_and_survives_checkpoint(tmp_path):
  from nextstep_jax.training import checkpoint as ckpt_lib
  c, mesh, t = _single({"ema_decay": 0.9})
  state = t.init_state(seed=0)
  init = jax.tree.map(np.asarray, state["params"])
  np.testing.assert_array_equal(state["ema"]["head"]["cond_kernel"], init["head"]["cond_kernel"])
  state, _ = t.step_fn(state, parallel.global_batch(synthetic_batch(8, 32, 64, 16), mesh))
  new = jax.tree.map(np.asarray, state["params"])
  assert_trees_close_fp32(jax.tree.map(np.asarray, state["ema"]),
                          jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, init, new), rtol=1e-6)
  assert not np.allclose(state["ema"]["backbone"]["lm_head_kernel"], new["backbone"]["lm_head_kernel"])
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", every=1, keep=2, async_save=False)
  ck.save(1, state, force=True)
  ck.wait()
  restored, _ = ck.restore(1, parallel.with_shardings(t.abstract_state, t.state_shardings))
  ck.close()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored["ema"], state["ema"])


def test_lora_trains_only_adapters_through_the_train_step():
  c, mesh, t = _single({"lora.rank": 4, "lora.alpha": 8.0})
  state = t.init_state(seed=0)
  assert set(state) >= {"base", "params"}
  base0 = jax.tree.map(np.asarray, state["base"])
  lora0 = jax.tree.map(np.asarray, state["params"])
  n_lora = sum(x.size for x in jax.tree.leaves(lora0))
  n_base = sum(x.size for x in jax.tree.leaves(base0))
  assert n_lora < 0.2 * n_base
  # Only the adapters carry optimizer moments.
  assert sum(x.size for x in jax.tree.leaves(state["opt_state"])) <= 2 * n_lora + 8
  for s in range(2):
    state, m = t.step_fn(state, parallel.global_batch(synthetic_batch(8, 32, 64, 16, seed=s), mesh))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state["base"], base0)
  b_changed = [not np.array_equal(np.asarray(state["params"]["backbone"]["layers"][k]["lora_b"]),
                                  lora0["backbone"]["layers"][k]["lora_b"]) for k in ("q_kernel", "o_kernel")]
  assert all(b_changed)


def _step_temp_bytes(axes, monkeypatch, constrained: bool) -> int:
  c = _config(axes)
  mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:8])
  with monkeypatch.context() as m:
    if not constrained:
      m.setattr(parallel, "constrain", lambda x, logical_axes: x)
    t = trainer_lib.Trainer(c, mesh)
    state = t.init_state(seed=0)
    batch = parallel.global_batch(synthetic_batch(8, 32, 64, 16, seed=0), mesh)
    return t.step_fn.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_activation_constraints_keep_rows_sharded(monkeypatch):
  """Without the activation constraints GSPMD replicates the flow-matching head's rows after the slot
  gather, so per-device temporaries grow with the global batch; with them every device keeps its rows."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (virtual) devices")
  axes = dict(data=1, fsdp=8, tensor=1)
  pinned = _step_temp_bytes(axes, monkeypatch, constrained=True)
  free = _step_temp_bytes(axes, monkeypatch, constrained=False)
  assert pinned * 2 < free, (pinned, free)
