"""Checkpoints: bitwise round trip into NamedShardings, retention, latest step, init_from."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common
from nextstep_jax import parallel as par
from nextstep_jax.checkpoint import (Checkpointer, decode_data_state, encode_data_state,
                                     restore_params_from)


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (tests/conftest.py sets 8 CPU devices)")
  return par.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:2])


class _Model(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.w_kernel = nnx.Param(jax.random.normal(rngs.params(), (8, 6)), axes=("embed", "mlp"))
    self.w_bias = nnx.Param(jax.random.normal(rngs.params(), (6,)).astype(jnp.bfloat16),
                            axes=("mlp",))
    self.norm_scale = nnx.Param(jax.random.uniform(rngs.params(), (8,)), axes=("embed",))


def _train_state(mesh, seed=0, step=7):
  """A train state like train.py's: params (nnx.State), an optimiser-like tree, a step."""
  params = nnx.state(_Model(nnx.Rngs(seed)), nnx.Param)
  sh = par.shardings_for(params, mesh, par.DEFAULT_RULES)
  params = jax.device_put(params, sh)
  mu = jax.tree.map(lambda x: x * 0.5, params)
  rep = NamedSharding(mesh, P())
  return {"params": params, "opt": {"mu": mu, "count": jax.device_put(jnp.int32(step), rep)},
          "step": jax.device_put(jnp.int32(step), rep)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_bitwise_equal(a, b):
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert x.sharding == y.sharding, (path, x.sharding, y.sharding)
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8), err_msg=str(path))


def test_data_state_envelope():
  for s in (None, b"\x00\xff{json}", {"next_index": 5, "workers": [1, 2]}):
    env = encode_data_state(s)
    assert decode_data_state(json.loads(json.dumps(env))) == s
  with pytest.raises(TypeError, match="data_state"):
    encode_data_state([1, 2])


def test_round_trip_bitwise_with_shardings(mesh, tmp_path):
  state = _train_state(mesh)
  config = common.base_config()
  ckpt = Checkpointer(tmp_path / "ckpt", every=10, keep=3, async_save=True, config=config)
  assert ckpt.latest_step() is None
  assert ckpt.save(10, state, data_state=b"grain-bytes\x00")
  ckpt.wait()
  assert ckpt.latest_step() == 10
  restored, data_state = ckpt.restore(10, _abstract(state))
  _assert_bitwise_equal(restored, state)
  assert data_state == b"grain-bytes\x00"
  q = restored["params"]["w_kernel"].get_value()
  assert q.sharding.spec == P("fsdp", "tensor") and len(q.addressable_shards) == 2
  # Config provenance: in the directory and in the step.
  saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
  assert saved["optim"]["b2"] == 0.95 and saved["model"]["num_layers"] == config.model.num_layers
  ckpt.close()


def test_restore_into_other_shardings(mesh, tmp_path):
  state = _train_state(mesh)
  with Checkpointer(tmp_path, every=1, keep=1) as ckpt:
    ckpt.save(1, state, data_state={"pos": 3})
  rep = NamedSharding(mesh, P())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
  with Checkpointer(tmp_path, every=1, keep=1) as ckpt:
    restored, data_state = ckpt.restore(None, target)
  assert data_state == {"pos": 3}
  w = restored["params"]["w_kernel"].get_value()
  assert w.sharding.spec == P()
  np.testing.assert_array_equal(np.asarray(w), np.asarray(state["params"]["w_kernel"].get_value()))


def test_retention_latest_step_and_schedule(mesh, tmp_path):
  state = _train_state(mesh)
  ckpt = Checkpointer(tmp_path, every=2, keep=2)
  saved = [s for s in range(1, 8) if ckpt.save(s, state, data_state=None)]
  assert saved == [2, 4, 6]
  assert ckpt.save(7, state, force=True)
  assert not ckpt.save(7, state, force=True)  # never twice
  ckpt.wait()
  assert ckpt.all_steps() == [6, 7]
  assert ckpt.latest_step() == 7
  assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["6", "7"]
  _, data_state = ckpt.restore(7, _abstract(state))
  assert data_state is None
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 2"):
    ckpt.restore(2, _abstract(state))
  ckpt.close()
  # A new manager over the same directory resumes from there.
  again = Checkpointer(tmp_path, every=2, keep=2)
  assert again.latest_step() == 7
  again.close()


def test_init_from_reads_params_only(mesh, tmp_path):
  source = _train_state(mesh, seed=1, step=500)
  with Checkpointer(tmp_path / "stage1" / "checkpoints", every=100, keep=2) as ckpt:
    ckpt.save(400, _train_state(mesh, seed=2, step=400))
    ckpt.save(500, source)
  # A fresh run of the next stage: params come from the newest step, nothing else.
  abstract_params = _abstract(_train_state(mesh, seed=3)["params"])
  params = restore_params_from(tmp_path / "stage1" / "checkpoints", abstract_params)
  _assert_bitwise_equal(params, source["params"])
  # A step directory works too.
  older = restore_params_from(tmp_path / "stage1" / "checkpoints" / "400", abstract_params)
  _assert_bitwise_equal(older, _train_state(mesh, seed=2)["params"])
  # The target's dtype wins (e.g. reading fp32 masters as bf16).
  bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding),
                      abstract_params)
  cast = restore_params_from(tmp_path / "stage1" / "checkpoints", bf16)
  assert cast["w_kernel"].get_value().dtype == jnp.bfloat16
  with pytest.raises(FileNotFoundError, match="does not exist"):
    restore_params_from(tmp_path / "nowhere", abstract_params)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    restore_params_from(tmp_path / "empty", abstract_params)


def test_from_config(tmp_path):
  config = common.base_config()
  config.workdir = str(tmp_path / "run")
  config.checkpoint.every = 5
  ckpt = Checkpointer.from_config(config)
  assert str(ckpt.directory) == os.path.join(str(tmp_path / "run"), "checkpoints")
  assert ckpt.should_save(10) and not ckpt.should_save(11)
  ckpt.close()
  with pytest.raises(ValueError, match="checkpoint.every=0"):
    Checkpointer(tmp_path / "x", every=0, keep=1)
