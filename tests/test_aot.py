"""Splash attention against the XLA reference (Pallas interpret mode on CPU), hybrid ICI x DCN meshes, and
compiling the real train step for TPU topologies from this host (skipped without libtpu)."""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from configs.common import base_config  # noqa: E402
from nextstep_jax.training import aot  # noqa: E402
from nextstep_jax import parallel  # noqa: E402
from nextstep_jax.models import attention  # noqa: E402
from tests.tolerance import assert_close_fp32  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Splash attention
# ------------------------------------------------------------------------------------------------
def _qkv(b, length, h, kv, hd, seed):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, length, h, hd)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, length, kv, hd)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, length, kv, hd)), jnp.float32)
  return q, k, v


def _segments(b, length):
  seg = np.ones((b, length), np.int32)
  seg[0, length // 3:] = 2                 # two packed documents
  seg[0, length - 5:] = 0                  # then padding
  if b > 1:
    seg[1, length // 2:] = 2
  return jnp.asarray(seg)


@pytest.mark.parametrize("length,document_mask,grad", [(9, True, True), (300, True, False), (128, False, True)])
def test_splash_matches_xla_forward_and_grad(length, document_mask, grad):
  """Lengths off the kernel's 128 tile are padded with segment 0; 300 pads to 384: a 3 x 3 grid of tiles."""
  q, k, v = _qkv(2, length, 4, 2, 16, seed=length)
  seg = _segments(2, length)
  kw = dict(q_slots=jnp.broadcast_to(jnp.arange(length), (2, length)), q_segments=seg, kv_segments=seg,
            document_mask=document_mask)
  valid = (np.asarray(seg) > 0)[..., None, None]
  ref = attention.attention(q, k, v, implementation="xla", **kw)
  out = attention.attention(q, k, v, implementation="splash", **kw)
  assert_close_fp32(np.where(valid, out, 0), np.where(valid, ref, 0), rtol=1e-5)
  if not grad:
    return

  def loss(impl):
    return lambda q, k, v: jnp.sum(jnp.where(valid, attention.attention(q, k, v, implementation=impl, **kw),
                                             0.0) ** 2)

  g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  g_spl = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_spl, g_ref):
    assert_close_fp32(a, b, rtol=1e-5)


def test_splash_document_mask_matters():
  """Segment ids really reach the kernel: without the document mask the answer changes."""
  q, k, v = _qkv(1, 128, 2, 1, 16, seed=3)
  seg = jnp.asarray(np.repeat([[1, 2]], 64, axis=1))
  kw = dict(q_slots=jnp.arange(128)[None], q_segments=seg, kv_segments=seg)
  with_mask = attention.attention(q, k, v, implementation="splash", document_mask=True, **kw)
  without = attention.attention(q, k, v, implementation="splash", document_mask=False, **kw)
  assert np.abs(np.asarray(with_mask - without))[:, 64:].max() > 1e-2
  assert_close_fp32(with_mask[:, :64], without[:, :64], rtol=1e-6)


def test_splash_under_a_mesh_runs_in_shard_map():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (virtual) devices")
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  q, k, v = _qkv(4, 128, 4, 2, 8, seed=7)
  seg = jnp.asarray(np.r_[np.asarray(_segments(2, 128)), np.ones((2, 128), np.int32)])
  slots = jnp.broadcast_to(jnp.arange(128), (4, 128))
  ref = attention.attention(q, k, v, q_slots=slots, q_segments=seg, kv_segments=seg, implementation="xla")
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  f = jax.jit(lambda q, k, v, s: attention.attention(q, k, v, q_slots=slots, q_segments=s, kv_segments=s,
                                                     implementation="splash"), in_shardings=(rows,) * 4)
  with jax.set_mesh(mesh):
    out = f(q, k, v, seg)
    hlo = f.lower(q, k, v, seg).as_text()
  valid = (np.asarray(seg) > 0)[..., None, None]
  assert_close_fp32(np.where(valid, out, 0), np.where(valid, ref, 0), rtol=1e-5)
  assert "shard_map" in hlo or "sdy.manual_computation" in hlo or "custom_call" in hlo
  assert out.sharding.spec[0] == ("data", "fsdp") and out.sharding.spec[2] == "tensor"


def test_implementations_and_auto():
  assert set(attention.IMPLEMENTATIONS) >= {"xla", "cudnn", "splash"}
  assert attention.resolve_implementation("auto", "tpu") == "splash"
  assert attention.resolve_implementation("auto", "gpu") == "cudnn"
  assert attention.resolve_implementation("auto", "cpu") == "xla"
  assert attention.resolve_implementation("splash", "cpu") == "splash"
  with pytest.raises(ValueError, match="unknown attention implementation"):
    attention.resolve_implementation("flash9")
  # A cached decode step (Lq != Lk) falls back to the reference path under splash.
  q, k, v = _qkv(1, 1, 4, 2, 8, seed=1)
  _, kk, vv = _qkv(1, 6, 4, 2, 8, seed=2)
  seg = jnp.ones((1, 6), jnp.int32)
  kw = dict(q_slots=jnp.asarray([[3]]), q_segments=jnp.ones((1, 1), jnp.int32), kv_segments=seg)
  assert_close_fp32(attention.attention(q, kk, vv, implementation="splash", **kw),
                    attention.attention(q, kk, vv, implementation="xla", **kw), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Topology names and hybrid meshes
# ------------------------------------------------------------------------------------------------
def test_topology_names():
  t = aot.parse_topology("v5p-64")
  assert (t.libtpu_name, t.chips, t.num_devices) == ("v5:2x4x4", 32, 32)
  assert aot.parse_topology("v5p-256").libtpu_name == "v5:4x4x8" and aot.parse_topology("v5p-256").chips == 128
  assert aot.parse_topology("v5p-8").libtpu_name == "v5:2x2x1"
  assert aot.parse_topology("v5e-16").libtpu_name == "v5e:4x4"
  assert aot.parse_topology("v6e-64").libtpu_name == "v6e:8x8"
  assert aot.parse_topology("v4-8").libtpu_name == "v4:2x2x1"
  assert aot.parse_topology("v5p-64", num_slices=2).num_devices == 64
  assert aot.parse_topology("v5:2x4x4").family == "v5p"
  for bad in ("v5p-63", "v5p-12", "tpu-64", "v7x-8"):
    with pytest.raises(ValueError, match="topology"):
      aot.parse_topology(bad)


def test_hybrid_axes_resolution():
  ici, dcn, total = parallel.resolve_hybrid_axes(dict(data=1, fsdp=-1, tensor=1), dict(data=2), 64, 2)
  assert ici == dict(data=1, fsdp=32, tensor=1) and dcn == dict(data=2, fsdp=1, tensor=1)
  assert total == dict(data=2, fsdp=32, tensor=1)
  _, dcn, total = parallel.resolve_hybrid_axes(dict(data=1, fsdp=-1, tensor=2), dict(data=-1), 64, 4)
  assert dcn["data"] == 4 and total == dict(data=4, fsdp=8, tensor=2)
  # Without DCN axes the ICI axes span every device.
  assert parallel.resolve_hybrid_axes(dict(data=-1), None, 8, 2)[2] == dict(data=8, fsdp=1, tensor=1)
  with pytest.raises(ValueError, match="mesh.dcn_axes"):
    parallel.resolve_hybrid_axes(dict(data=-1), dict(data=3), 64, 2)
  with pytest.raises(ValueError, match="mesh.dcn_axes has unknown"):
    parallel.resolve_hybrid_axes(dict(data=-1), dict(pipeline=2), 64, 2)
  with pytest.raises(ValueError, match="per granule"):
    parallel.resolve_hybrid_axes(dict(data=1, fsdp=64), dict(data=2), 64, 2)


def test_hybrid_mesh_single_process_is_the_plain_mesh():
  devices = jax.devices()
  mesh = parallel.make_hybrid_mesh(dict(axes=dict(data=-1, fsdp=1, tensor=1), dcn_axes=dict(data=1)), devices)
  assert dict(mesh.shape) == dict(data=len(devices), fsdp=1, tensor=1)
  with pytest.raises(ValueError, match="mesh.dcn_axes"):
    parallel.make_hybrid_mesh(dict(axes=dict(data=-1), dcn_axes=dict(data=2)), devices)


# ------------------------------------------------------------------------------------------------
# Compiling for TPU topologies (libtpu)
# ------------------------------------------------------------------------------------------------
needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(),
                                  reason='needs libtpu (pip install "jax[tpu]") to describe TPU topologies')


def _small_config(**model):
  c = base_config("tiny", "tiny")
  c.model.update(vocab_size=1024, hidden_size=256, num_heads=2, num_kv_heads=1, head_dim=128,
                 intermediate_size=512, num_layers=2, dtype="bfloat16", remat="full", attention="splash")
  c.model.update(model)
  c.head.update(dim=128, num_layers=2)
  c.data.seq_len = 256
  c.data.max_row_image_tokens = 256
  c.data.source = "digits"
  c.mesh.axes.update(data=1, fsdp=-1, tensor=1)
  return c


@needs_libtpu
@pytest.mark.aot
def test_compile_for_two_v5p_slices_fits_with_a_dcn_data_axis():
  c = _small_config()
  c.mesh.dcn_axes = dict(data=2, fsdp=1, tensor=1)
  topo = aot.parse_topology("v5p-8", num_slices=2)
  devices = aot.topology_devices(topo)
  assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
  config = aot.prepare_config(c, topo, rows_per_device=1)
  assert config.data.batch_size == 8
  r = aot.compile_train_step(config, devices, topology_name="v5p-8 x 2", hbm_bytes=topo.spec.hbm_bytes,
                             num_slices=2)
  assert r.fits and r.verdict().startswith("fits"), aot.format_result(r)
  assert r.mesh == "data=2 (dcn 2) fsdp=4 tensor=1"
  assert 0 < r.total_bytes < 2 * aot.GiB and r.argument_bytes > 0
  assert r.device_kind == "TPU v5"


@needs_libtpu
@pytest.mark.aot
def test_compile_that_does_not_fit_says_so_with_hints():
  # 1.3B parameters of embedding and LM head on one 16 GiB v5e chip: fp32 weights, Adam moments and
  # gradients alone need about 20 GiB.
  c = _small_config(vocab_size=163840, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                    num_layers=1, intermediate_size=1024, remat="none")
  c.tokenizer.vocab_size = 512
  topo = aot.parse_topology("v5e-1")
  config = aot.prepare_config(c, topo, rows_per_device=1)
  r = aot.compile_train_step(config, aot.topology_devices(topo), topology_name="v5e-1",
                             hbm_bytes=topo.spec.hbm_bytes)
  assert not r.fits and r.verdict() == "DOES NOT FIT", aot.format_result(r)
  assert r.error
  text = " ".join(r.hints)
  assert "--config.model.remat=full" in text and "more chips" in text
