"""Mesh, logical-axis rules, parameter shardings, batch sharding, multi-host detection."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from nextstep_jax import parallel as par

RULES = par.DEFAULT_RULES


def _need(n):
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices (tests/conftest.py sets 8 CPU devices)")


def test_resolve_mesh_axes():
  assert par.resolve_mesh_axes({"data": -1, "fsdp": 1, "tensor": 1}, 8) == {
    "data": 8, "fsdp": 1, "tensor": 1}
  assert par.resolve_mesh_axes({"data": 2, "fsdp": -1, "tensor": 2}, 8)["fsdp"] == 2
  assert par.resolve_mesh_axes({"data": 2, "fsdp": 2, "tensor": 2}, 8)["tensor"] == 2
  assert par.resolve_mesh_axes({"fsdp": -1}, 4) == {"data": 1, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match=r"product 4, but there are 8 devices"):
    par.resolve_mesh_axes({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="product 3 does not divide the 8 devices"):
    par.resolve_mesh_axes({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one -1"):
    par.resolve_mesh_axes({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    par.resolve_mesh_axes({"model": 2}, 8)


def test_make_mesh():
  _need(8)
  cfg = ml_collections.ConfigDict({"axes": {"data": 2, "fsdp": -1, "tensor": 2}})
  mesh = par.make_mesh(cfg)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert tuple(mesh.axis_types) == (AxisType.Auto,) * 3
  small = par.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
  assert small.devices.size == 2
  with pytest.raises(ValueError, match="mesh.axes"):
    par.make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])


def test_logical_to_spec_default_rules():
  assert par.logical_to_spec(("batch", "length", "embed"), RULES) == P(("data", "fsdp"), None, None)
  assert par.logical_to_spec(("vocab", "embed"), RULES) == P("tensor", "fsdp")
  assert par.logical_to_spec(("layers", "embed", "heads", "head_dim"), RULES) == P(
    None, "fsdp", "tensor", None)
  assert par.logical_to_spec(("layers", "norm"), RULES) == P(None, None)
  assert par.logical_to_spec((None, "something_new"), RULES) == P(None, None)
  assert par.logical_to_spec((), RULES) == P()


def test_logical_to_spec_never_reuses_a_mesh_axis():
  # Both dims want 'fsdp': the first keeps it.
  assert par.logical_to_spec(("embed", "embed"), RULES) == P("fsdp", None)
  # 'batch' takes data and fsdp, so 'embed' falls back to replication.
  assert par.logical_to_spec(("batch", "embed"), RULES) == P(("data", "fsdp"), None)
  rules = {"a": ("data", "tensor"), "b": ("tensor", "fsdp")}
  assert par.logical_to_spec(("a", "b"), rules) == P(("data", "tensor"), "fsdp")


def test_logical_to_spec_divisibility_fallback():
  sizes = {"data": 2, "fsdp": 4, "tensor": 2}
  # 6 is not divisible by fsdp=4: replicated.
  assert par.logical_to_spec(("embed", "mlp"), RULES, shape=(6, 8), mesh=sizes) == P(None, "tensor")
  # 7 is not divisible by tensor=2.
  assert par.logical_to_spec(("embed", "mlp"), RULES, shape=(8, 7), mesh=sizes) == P("fsdp", None)
  # batch 2: data fits, data*fsdp=8 does not -> only data.
  assert par.logical_to_spec(("batch", "length"), RULES, shape=(2, 16), mesh=sizes) == P("data", None)
  # batch 4: data (2) fits, data*fsdp (8) does not -> only data.
  assert par.logical_to_spec(("batch",), RULES, shape=(4,), mesh=sizes) == P("data")
  assert par.logical_to_spec(("batch",), RULES, shape=(16,), mesh=sizes) == P(("data", "fsdp"))
  # A skipped axis stays free for a later dim.
  assert par.logical_to_spec(("embed", "embed"), RULES, shape=(6, 8), mesh=sizes) == P(None, "fsdp")


def test_rules_errors():
  with pytest.raises(ValueError, match="not one of"):
    par.logical_to_spec(("embed",), {"embed": "model"})
  with pytest.raises(ValueError, match="twice"):
    par.rules_dict((("embed", "fsdp"), ("embed", None)))
  with pytest.raises(ValueError, match="pairs"):
    par.rules_dict((("embed", "fsdp", "x"),))


class _Model(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    k = rngs.params()
    self.embed_tokens = nnx.Param(jax.random.normal(k, (64, 16)), axes=("vocab", "embed"))
    self.layers = nnx.Dict(
      q_kernel=nnx.Param(jnp.ones((2, 16, 4, 8)), axes=("layers", "embed", "heads", "head_dim")),
      q_bias=nnx.Param(jnp.zeros((2, 4, 8)), axes=("layers", "heads", "head_dim")),
      input_norm_scale=nnx.Param(jnp.ones((2, 16)), axes=("layers", "norm")))
    self.odd_bias = nnx.Param(jnp.zeros((6,)), axes=("embed",))


def _abstract():
  model = nnx.eval_shape(lambda: _Model(nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def test_param_axes_reads_metadata():
  axes = par.param_axes(_abstract())
  assert axes["embed_tokens"] == ("vocab", "embed")
  assert axes["layers"]["q_kernel"] == ("layers", "embed", "heads", "head_dim")
  assert axes["odd_bias"] == ("embed",)


def test_param_axes_errors_name_the_path():
  class Bad(nnx.Module):
    def __init__(self):
      self.good = nnx.Param(jnp.ones((2,)), axes=("embed",))
      self.no_axes = nnx.Param(jnp.ones((2, 3)))
      self.wrong_rank = nnx.Param(jnp.ones((2, 3)), axes=("embed",))

  state = nnx.state(nnx.eval_shape(Bad), nnx.Param)
  with pytest.raises(ValueError, match="no_axes: Param has no `axes` metadata") as e:
    par.param_axes(state)
  assert "wrong_rank: axes ('embed',) do not match the value's rank 2" in str(e.value)
  with pytest.raises(ValueError, match="x.y: a ShapeDtypeStruct, not an nnx.Variable"):
    par.param_axes({"x": {"y": jax.ShapeDtypeStruct((2,), jnp.float32)}})


def test_shardings_for_model_state():
  _need(8)
  mesh = par.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  abstract = _abstract()
  sh = par.shardings_for(abstract, mesh, RULES)
  assert sh["embed_tokens"].spec == P("tensor", "fsdp")
  assert sh["layers"]["q_kernel"].spec == P(None, "fsdp", "tensor", None)
  assert sh["layers"]["q_bias"].spec == P(None, "tensor", None)
  assert sh["layers"]["input_norm_scale"].spec == P(None, None)
  assert sh["odd_bias"].spec == P(None)  # 6 is not divisible by fsdp=4
  # The shardings are usable: materialise the state there and read it back.
  model = _Model(nnx.Rngs(0))
  state = jax.device_put(nnx.state(model, nnx.Param), sh)
  q = state["layers"]["q_kernel"][...]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (2, 4, 2, 8)
  # Explicit axes for a plain tree of ShapeDtypeStructs.
  plain = {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32)}
  out = par.shardings_for(plain, mesh, RULES, axes={"w": ("embed", "mlp")})
  assert out["w"].spec == P("fsdp", "tensor")
  with pytest.raises(ValueError, match="w: logical axes"):
    par.shardings_for(plain, mesh, RULES, axes={"w": ("embed",)})
  # with_shardings gives a restore / jit target carrying the shardings.
  target = par.with_shardings(abstract, sh)
  assert target["embed_tokens"].get_value().sharding.spec == P("tensor", "fsdp")


def test_optimizer_state_follows_params():
  _need(8)
  mesh = par.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract = _abstract()
  sh = par.shardings_for(abstract, mesh, RULES)
  tx = optax.adamw(1e-3)
  opt = jax.eval_shape(tx.init, abstract)
  opt_sh = par.shardings_like_params(opt, abstract, sh, mesh)
  adam = opt_sh[0]
  assert adam.mu["embed_tokens"].get_value().spec == P("tensor", "fsdp")
  assert adam.nu["layers"]["q_kernel"].get_value().spec == P(None, "fsdp", "tensor", None)
  assert adam.count.spec == P()


def test_data_sharding_and_global_batch():
  _need(8)
  mesh = par.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert par.data_sharding(mesh).spec == P(("data", "fsdp"))
  local = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
           "images": np.zeros((8, 2, 4, 4, 3), np.float32)}
  batch = par.global_batch(local, mesh)
  assert batch["tokens"].shape == (8, 5) and batch["images"].shape == (8, 2, 4, 4, 3)
  assert batch["tokens"].sharding.spec == P(("data", "fsdp"))
  assert batch["tokens"].addressable_shards[0].data.shape == (2, 5)
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])


def test_constrain_pins_activations_under_the_context_mesh():
  _need(8)
  x = jnp.ones((8, 6, 16))
  # No context mesh: a no-op (the same array back).
  assert par.constrain(x, ("batch", "length", "embed")) is x
  mesh = par.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  f = jax.jit(lambda a: par.constrain(a * 2, ("batch", "length", "embed")))
  laid_out = lambda a, *spec: a.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(*spec)), a.ndim)
  with jax.set_mesh(mesh):
    # embed would take fsdp, which batch already uses: it stays whole.
    assert laid_out(f(x), ("data", "fsdp"), None, None), f(x).sharding
    with par.activation_rules((("batch", "data"), ("embed", "tensor"))):
      g = jax.jit(lambda a: par.constrain(a * 2, ("batch", "length", "embed")))
      assert laid_out(g(x), "data", None, "tensor"), g(x).sharding
    # A batch that does not divide data x fsdp falls back (here to data alone, then to nothing).
    h = jax.jit(lambda a: par.constrain(a * 2, ("batch", None)))
    assert laid_out(h(jnp.ones((6, 4))), "data", None)
    assert laid_out(h(jnp.ones((3, 4))), None, None)
    assert not laid_out(h(jnp.ones((3, 4))), "data", None)  # the check itself can fail
  np.testing.assert_array_equal(np.asarray(f(x)), 2 * np.asarray(x))


def test_detect_cluster():
  assert par.detect_cluster({}) is None
  assert par.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1234"}) == "env"
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "0"}
  assert par.detect_cluster(slurm) == "slurm"
  assert par.detect_cluster({**slurm, "SLURM_NTASKS": "1"}) is None
  assert par.detect_cluster({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}) == "ompi"
  assert par.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
  assert par.detect_cluster({"TPU_WORKER_HOSTNAMES": "a"}) is None
  assert par.detect_cluster({"MEGASCALE_COORDINATOR_ADDRESS": "c"}) == "tpu"
  assert par.detect_cluster({"NEXTSTEP_DISTRIBUTED": "1"}) == "forced"
  assert par.detect_cluster({**slurm, "NEXTSTEP_DISTRIBUTED": "0"}) is None
  with pytest.raises(ValueError, match="NEXTSTEP_DISTRIBUTED"):
    par.detect_cluster({"NEXTSTEP_DISTRIBUTED": "maybe"})


def test_maybe_initialize_distributed_single_process():
  assert par.maybe_initialize_distributed({}) is False
  assert par.maybe_initialize_distributed({"NEXTSTEP_DISTRIBUTED": "0"}) is False
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    par.maybe_initialize_distributed({"JAX_COORDINATOR_ADDRESS": "localhost:1"})
  assert jax.process_count() == 1
