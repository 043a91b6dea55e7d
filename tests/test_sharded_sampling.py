"""An imported official directory restored sharded on a 2 x 4 (fsdp x tensor) CPU mesh and sampled under it:
the same tokens as on one device; and the bf16 path (``--dtype=bfloat16``)."""

import jax
import numpy as np
import pytest

from nextstep_jax import parallel
from nextstep_jax import run as run_lib
from nextstep_jax import sampling
from nextstep_jax.interop import runs
from nextstep_jax.sampling import runner
from tests.test_official_import import official_dir
from tests.tolerance import assert_close_fp32

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets them)")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp("official")
  src, _, _ = official_dir(root, "1.0")
  work = str(root / "run")
  runs.import_run(src, work)
  return work


def _prompts(tok, h, w):
  return sampling.image_prompts(tok, ["a photo of a cat", "a cat number 3"], h, w, negative="")


def test_sharded_import_and_sampling_equal_one_device(imported):
  mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  one = run_lib.load_run(imported)
  many = run_lib.load_run(imported, mesh=mesh)
  q = many.model.backbone.layers.q_kernel[...]  # (layers, embed, heads, head_dim): embed over fsdp, heads over tensor
  assert q.sharding.spec[1:3] == ("fsdp", "tensor")
  assert {s.data.shape for s in q.addressable_shards} == {(q.shape[0], q.shape[1] // 2, q.shape[2] // 4, q.shape[3])}
  head = many.model.head.mlp_in_kernel[...]
  assert len({s.data.shape for s in head.addressable_shards}) == 1 and head.addressable_shards[0].data.size < head.size

  h = w = 2
  cond, neg = _prompts(one.tokenizer, h, w)
  key = jax.random.key(0)
  kw = dict(cfg=7.5, steps=4, pad_id=one.tokenizer.pad_id)
  ref = np.asarray(sampling.sample_images(one.model, cond, neg, h, w, key, **kw))
  got = sampling.sample_images(many.model, cond, neg, h, w, key, mesh=mesh, rules=many.config.mesh.rules, **kw)
  assert_close_fp32(np.asarray(got), ref, rtol=1e-5)
  assert np.abs(ref[0] - ref[1]).max() > 1e-2  # the prompts matter

  # The weights laid out once for the sampler keep the model's placement, less the layers axis, and the
  # model's own copy is freed.
  ada_spec = tuple(many.model.head.ada_kernel.sharding.spec)  # (layers, fm_embed, fm_mlp)
  weights = sampling.sampler_weights(many.model, consume=True)
  assert q.is_deleted()
  q0 = weights.layers[0]["q_kernel"]
  assert tuple(q0.sharding.spec)[:2] == ("fsdp", "tensor")
  assert {s.data.shape for s in q0.addressable_shards} == {(q.shape[1] // 2, q.shape[2] // 4, q.shape[3])}
  b0 = weights.head_blocks[0]["mlp_in_kernel"]
  assert tuple(b0.sharding.spec) == tuple(head.sharding.spec)[1:]
  ada = weights.head_ada[0]  # the fused (D, (3n + 2) D) projection, placed as the blocks' (n, D, 3D) one
  assert tuple(ada.sharding.spec) == ada_spec[1:] and ada.addressable_shards[0].data.size < ada.size, ada_spec
  heard = []  # the loop's progress reported once per step under the mesh, not once per device
  with sampling.reporting(lambda done, total: heard.append((done, total))):
    from_weights = jax.block_until_ready(sampling.sample_images(weights, cond, neg, h, w, key, mesh=mesh,
                                                                rules=many.config.mesh.rules, progress_every=2, **kw))
  assert_close_fp32(np.asarray(from_weights), ref, rtol=1e-5)
  assert sorted(heard) == [(2, 4), (4, 4)], heard


@pytest.mark.slow
def test_sample_command_under_a_mesh_and_in_bf16(imported, tmp_path):
  kw = dict(num=2, steps=3, size=32, seed=1)
  single = runner.sample_run(imported, "a photo of a cat", out=str(tmp_path / "one"), **kw)
  sharded = runner.sample_run(imported, "a photo of a cat", out=str(tmp_path / "mesh"), mesh="fsdp=2,tensor=4", **kw)
  assert single["images"] == sharded["images"] == 2
  from PIL import Image  # pylint: disable=import-outside-toplevel
  a = np.asarray(Image.open(tmp_path / "one" / "grid.png"), np.int32)
  b = np.asarray(Image.open(tmp_path / "mesh" / "grid.png"), np.int32)
  assert np.abs(a - b).max() <= 1  # the same tokens up to fp32 rounding, through the VAE and uint8

  # bf16: weights read and the backbone and head networks run in bf16; the integration stays fp32.
  config = run_lib.saved_config(imported)
  with config.unlocked():
    config.model.dtype = config.model.param_dtype = "bfloat16"
  low = run_lib.load_run(imported, config=config)
  assert low.model.backbone.layers.q_kernel[...].dtype == jax.numpy.bfloat16
  one = run_lib.load_run(imported)
  h = w = 2
  cond, neg = _prompts(one.tokenizer, h, w)
  kw = dict(cfg=3.0, steps=4, pad_id=one.tokenizer.pad_id)
  ref = np.asarray(sampling.sample_images(one.model, cond, neg, h, w, jax.random.key(2), **kw))
  got = np.asarray(sampling.sample_images(low.model, cond, neg, h, w, jax.random.key(2), **kw))
  assert got.dtype == np.float32 and np.isfinite(got).all()
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert 0 < err < 0.1, err  # bf16 rounding (8 bits of mantissa) through 4 tokens, not a different sampler
  runner.sample_run(imported, "a photo of a cat", out=str(tmp_path / "bf16"), dtype="bfloat16", num=1, steps=2,
                    size=32)
  assert (tmp_path / "bf16" / "sample_000.png").exists()


@pytest.mark.aot
def test_14b_sampler_compiles_for_v5p_8_with_its_params_split_four_ways():
  from nextstep_jax import overrides  # pylint: disable=import-outside-toplevel
  from nextstep_jax.interop import hf  # pylint: disable=import-outside-toplevel
  from nextstep_jax.models import nextstep as ns  # pylint: disable=import-outside-toplevel
  from nextstep_jax.sampling import aot as sampler_aot  # pylint: disable=import-outside-toplevel
  from nextstep_jax.training import aot  # pylint: disable=import-outside-toplevel
  if not aot.libtpu_available():
    pytest.skip("libtpu cannot describe a TPU topology here")
  config = sampler_aot.sampling_config(overrides.load_config("configs/stage2.py"))
  with config.unlocked():  # two of the 48 layers: the same shapes per layer, a quick compile
    config.model.num_layers = 2
    config.mesh.axes.data, config.mesh.axes.fsdp, config.mesh.axes.tensor = 1, 1, -1
  topo = aot.parse_topology("v5p-8")
  rows = sampler_aot.compile_sampler(config, aot.topology_devices(topo), target=topo.name,
                                     hbm_bytes=topo.spec.hbm_bytes, rows=2, prompt_len=64, image_tokens=256,
                                     steps=4)
  assert [r.program for r in rows] == list(sampler_aot.PROGRAMS) and all(r.devices == 4 for r in rows)
  # The checkpoint's own size (SPEC §9 shapes), in bf16, over 4 chips: only norms and biases are replicated.
  full = 2 * sum(int(np.prod(s)) for s in hf.checkpoint_shapes(ns.NextStepConfig.from_config(config)).values())
  assert full / 4 <= rows[0].params_bytes <= 1.01 * full / 4
  # The KV cache: 2 layers x 2 rows x 320 positions x 8 kv heads (2 per chip) x 128, k and v, bf16.
  assert rows[0].cache_bytes == 2 * (2 * 2 * 320 * 2 * 128 * 2) + 2 * 320 * 4 + 4
  assert all(r.temp_bytes is not None and r.resident_bytes < r.hbm_bytes for r in rows)
