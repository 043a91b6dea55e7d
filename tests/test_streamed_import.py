"""The import's streamed checkpoint writer (``interop.streamed``) against orbax's own save of the same tree:
the same files (tree metadata, array metadata, sharding entries, zarr metadata and chunking, every array's
bytes), read back by orbax's restore to the source's values; and each piece it reads is one layer or one
band of chunks, never a whole leaf. The peak memory this gives is measured by benchmarks/interop_memory.py."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from nextstep_jax import run as run_lib
from nextstep_jax.interop import hf, names, runs, safetensors_io, streamed
from nextstep_jax.interop import stored as stored_lib
from nextstep_jax.models import backbone as bb
from nextstep_jax.models import fm_head
from nextstep_jax.models import nextstep as ns
from nextstep_jax.training import checkpoint as ckpt_lib

# Big enough that the vocabulary-sized leaves span several chunks of names.CHUNK_BYTES (monkeypatched
# smaller below) and the stacked leaves several layers.
BB = bb.BackboneConfig(vocab_size=1000, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=96, rope_theta=10000.0)
CFG = ns.NextStepConfig(backbone=BB, head=fm_head.HeadConfig(dim=48, num_layers=2, cond_dim=64, token_dim=8),
                        token_dim=8, token_norm=False)
META = hf.ImageMeta(latent_channels=2, latent_patch_size=2, latent_size=8, boi=2, eoi=3, image_placeholder_id=4,
                    image_area_id=1, eos_token_id=10, pad_token_id=0)
CHUNK = 16 << 10  # 16 KiB chunks: the embedding (1000 x 64 bf16 = 128 KB) in 8 bands


def _official(directory: str, dtype=ml_dtypes.bfloat16, nan: str | None = None) -> dict[str, np.ndarray]:
  """A NextStep directory of random tensors (every value distinct from its neighbours), in `dtype`; the tensor
  `nan` with one NaN."""
  shapes = hf.checkpoint_shapes(CFG)
  rng = np.random.default_rng(0)
  tensors = {k: (rng.standard_normal(s, dtype=np.float32) * 0.1).astype(dtype) for k, s in shapes.items()}
  if nan is not None:
    tensors[nan].reshape(-1)[5] = np.nan
  os.makedirs(directory)
  entries = {k: (v.shape, np.dtype(dtype)) for k, v in tensors.items()}
  safetensors_io.save_sharded(directory, entries, iter(tensors.items()), 60_000)
  with open(os.path.join(directory, hf.CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(hf.hf_config(CFG, META, np.dtype(dtype).name), f)
  return tensors


@pytest.fixture()
def small_chunks(monkeypatch):
  monkeypatch.setattr(names, "CHUNK_BYTES", CHUNK)
  return CHUNK


def _tree_and_config(src: str, tmp_path):
  """(cfg, meta, config, target): the params on one device (orbax's save of such arrays writes each leaf
  as one array, as the streamed writer does on any mesh)."""
  cfg, meta = hf.read_nextstep_config(src)
  config = runs.run_config(cfg, meta, str(tmp_path / "cfg"), vae_dir=None, vae_factor=8)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jax.numpy.bfloat16, sharding=one),
                        run_lib.abstract_model(config)[1])
  return cfg, meta, config, target


def _arrays(leaves: dict, target: dict) -> dict:
  """The streamed tree materialised as jax arrays with the target's shardings (what orbax's save gets)."""
  return jax.tree.map(lambda leaf, t: jax.make_array_from_callback(
      t.shape, t.sharding, lambda index: leaf.read(index).astype(t.dtype)), leaves, target,
      is_leaf=lambda x: isinstance(x, streamed.StreamedLeaf))


def _json_file(path) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _kv(state_dir: str) -> dict[str, bytes]:
  """Every key of the step's OCDBT database (merged, as restores read it) and its value."""
  store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state_dir}"}).result()
  return {k.decode(): store.read(k).result().value for k in store.list().result()}


def test_streamed_save_writes_what_orbax_writes(tmp_path, small_chunks):
  src = str(tmp_path / "official")
  tensors = _official(src)
  cfg, meta, config, target = _tree_and_config(src, tmp_path)
  leaves = hf.nextstep_streamed_leaves(src, cfg, meta, target)
  runs._save_step0(str(tmp_path / "streamed"), leaves, config)  # pylint: disable=protected-access
  # The reference: orbax's own save of the same arrays with the same SaveArgs, into a step like the import's.
  arrays = {"params": _arrays(leaves, target)}
  with ckpt_lib.Checkpointer(str(tmp_path / "orbax"), every=1, keep=1, async_save=False, config=config) as ckpt:
    ckpt.save(0, arrays, force=True, save_args={"params": stored_lib.chunked_save_args(arrays["params"], CFG)})
  a, b = tmp_path / "streamed" / "0" / "state", tmp_path / "orbax" / "0" / "state"

  assert _json_file(a / "_METADATA") == _json_file(b / "_METADATA")
  assert _json_file(a / "array_metadatas" / "process_0") == _json_file(b / "array_metadatas" / "process_0")
  assert _json_file(a / "_sharding") == _json_file(b / "_sharding")
  ka, kb = _kv(str(a)), _kv(str(b))
  assert sorted(ka) == sorted(kb)  # the same arrays in the same chunks, and the same zarr metadata
  for key in ka:
    if key.endswith(".zarray"):
      assert json.loads(ka[key]) == json.loads(kb[key]), key
    else:
      assert ka[key] == kb[key], key  # every chunk's bytes (compressed the same way)
  embed = json.loads(ka["params.backbone.embed_tokens/.zarray"])
  assert embed["chunks"][0] < BB.vocab_size and embed["chunks"][1] == BB.hidden_size  # split by rows
  lm = json.loads(ka["params.backbone.lm_head_kernel/.zarray"])
  assert lm["chunks"][0] == BB.hidden_size and lm["chunks"][1] < BB.vocab_size  # by the official rows
  q = json.loads(ka["params.backbone.layers.q_kernel/.zarray"])
  assert q["chunks"][0] == 1  # by layer

  # orbax's restore of the streamed step gives the source's tensors, bit for bit.
  restored = ckpt_lib.restore_params_from(str(tmp_path / "streamed"), target)
  back = dict(names.nextstep_to_tensors(jax.tree.map(np.asarray, restored), CFG))
  for name, t in tensors.items():
    np.testing.assert_array_equal(np.asarray(back[name]).view(np.uint16), t.view(np.uint16), err_msg=name)


def test_the_writer_reads_one_layer_or_one_band_at_a_time(tmp_path, small_chunks):
  src = str(tmp_path / "official")
  _official(src)
  cfg, meta, config, target = _tree_and_config(src, tmp_path)
  leaves = hf.nextstep_streamed_leaves(src, cfg, meta, target)
  largest: dict[str, int] = {}

  def spy(leaf):
    read = leaf.read

    def counted(index):
      x = read(index)
      largest[leaf.name] = max(largest.get(leaf.name, 0), x.nbytes)
      return x
    leaf.read = counted
    return leaf
  is_leaf = lambda x: isinstance(x, streamed.StreamedLeaf)
  leaves = jax.tree.map(spy, leaves, is_leaf=is_leaf)
  runs._save_step0(str(tmp_path / "run"), leaves, config)  # pylint: disable=protected-access
  flat = {leaf.name: leaf for leaf in jax.tree.leaves(leaves, is_leaf=is_leaf)}
  assert set(largest) == set(flat)  # every leaf read
  stacked = {"/".join(p) for p in stored_lib.stacked_paths(CFG)}
  assert stacked <= set(flat)
  for name in stacked:  # one layer a read (the file's bf16, as stored)
    assert largest[name] == flat[name].nbytes // flat[name].shape[0], (name, largest[name], flat[name].shape)
  for name in ("backbone/embed_tokens", "backbone/lm_head_kernel"):  # a band of rows, at most one chunk
    assert largest[name] <= small_chunks < flat[name].nbytes // 4, (name, largest[name], flat[name].nbytes)


def test_a_bad_tensor_stops_the_import_and_removes_what_it_wrote(tmp_path):
  src = str(tmp_path / "official")
  _official(src, nan="layers.2.mlp.down_proj.weight")  # read mid-stream, once earlier pieces are written
  out = tmp_path / "run"
  out.mkdir()
  (out / "notes.txt").write_text("the user's own file")
  with pytest.raises(safetensors_io.CheckpointError, match=r"tensor layers\.2\.mlp\.down_proj\.weight has 1 "
                                                            r"non-finite values \(NaN/Inf\)"):
    runs.import_run(src, str(out))
  assert sorted(os.listdir(out)) == ["notes.txt"]  # no checkpoint, config or records left; the user's file kept
  # What a killed import leaves (orbax's temporary step) is named, not taken for a run.
  (out / "checkpoints" / "0.orbax-checkpoint-tmp-1234").mkdir(parents=True)
  with pytest.raises(runs.UserError, match=r"holds an unfinished import .*0\.orbax-checkpoint-tmp-1234"):
    runs.import_run(src, str(out))

  # A clean directory imports into a new one; the abstract params come back, the run reads as the source.
  src2 = str(tmp_path / "clean")
  tensors = _official(src2)
  target = runs.import_run(src2, str(tmp_path / "run2"))
  assert {tuple(x.shape) for x in jax.tree.leaves(target)} >= {(BB.vocab_size, BB.hidden_size)}
  params = ckpt_lib.restore_params_from(str(tmp_path / "run2"), target)
  for ours, name in ((("backbone", "embed_tokens"), "embed_tokens.weight"),
                     (("backbone", "lm_head_kernel"), "lm_head.weight")):
    got = np.asarray(params[ours[0]][ours[1]])
    want = tensors[name] if ours[1] == "embed_tokens" else tensors[name].T
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16), err_msg=name)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parity
def test_qwen2_import_streams_the_transformers_backbone(tmp_path, tie, small_chunks):
  """``export --import_dir=Q --qwen2`` (``import_to_checkpoint``): the checkpoint's backbone gives transformers'
  logits; the head and projectors are the model's own initialisation from ``config.seed``."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tests.test_export import _save_hf_qwen2  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "qwen")
  torch, ref = _save_hf_qwen2(path, tie)
  c = hf.qwen2_config(path)
  cfg = ns.NextStepConfig(backbone=c, head=fm_head.HeadConfig(dim=32, num_layers=2, cond_dim=c.hidden_size,
                                                              token_dim=8), token_dim=8)
  config = runs.run_config(cfg, hf.ImageMeta(latent_channels=2, latent_patch_size=2, latent_size=8),
                           str(tmp_path / "w"), vae_dir=None, vae_factor=8)
  config.seed = 7
  out = tmp_path / "ckpt"
  target = runs.import_to_checkpoint(path, str(out), qwen2=True, config=config)
  params = jax.tree.map(np.asarray, ckpt_lib.restore_params_from(str(out), target))

  from nextstep_jax.interop.params import load_pure_params  # pylint: disable=import-outside-toplevel
  backbone = nnx.eval_shape(lambda: bb.Backbone(c, rngs=nnx.Rngs(0)))
  load_pure_params(backbone, params["backbone"], path)
  tokens = np.random.default_rng(0).integers(0, c.vocab_size, size=(2, 17))
  with torch.no_grad():
    want = ref(torch.tensor(tokens)).logits.numpy()
  from tests.tolerance import assert_close_fp32  # pylint: disable=import-outside-toplevel
  assert_close_fp32(np.asarray(backbone.forward_logits(jnp.asarray(tokens))), want, rtol=1e-4)

  model = ns.NextStep(ns.NextStepConfig.from_config(config), rngs=nnx.Rngs(params=7))  # eager, whole
  init = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for key in init:
    if key != "backbone":
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b), rtol=1e-6, atol=1e-7),
                   params[key], init[key])
  assert any(float(np.abs(x).max()) > 0 for x in jax.tree.leaves(params["head"]))


def test_qwen2_import_refuses_a_bad_directory_and_leaves_nothing(tmp_path):
  from tests.test_export import CFG as E_CFG, META as E_META, _model, _poison, _qwen2_dir_from_export  # pylint: disable=import-outside-toplevel
  exported = str(tmp_path / "hf")
  hf.export_nextstep(_model(), E_CFG, exported, E_META)
  q = str(tmp_path / "qwen")
  _qwen2_dir_from_export(exported, q)
  config = runs.run_config(E_CFG, E_META, str(tmp_path / "w"), vae_dir=None, vae_factor=8)
  out = tmp_path / "ckpt"

  wrong = config.copy_and_resolve_references()
  wrong.model.intermediate_size = 96
  with pytest.raises(safetensors_io.CheckpointError, match=r"intermediate_size: config 96 vs checkpoint 128"):
    runs.import_to_checkpoint(q, str(out), qwen2=True, config=wrong)
  assert not out.exists()

  _poison(q, "model.layers.1.mlp.up_proj.weight")
  with pytest.raises(safetensors_io.CheckpointError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight has "
                                                            r"\d+ non-finite values"):
    runs.import_to_checkpoint(q, str(out), qwen2=True, config=config)
  assert not out.exists()  # the half-written step removed
  out.mkdir()
  with pytest.raises(safetensors_io.CheckpointError, match="non-finite"):
    runs.import_to_checkpoint(q, str(out), qwen2=True, config=config)
  assert out.is_dir() and not any(out.iterdir())  # a directory given empty is left empty
