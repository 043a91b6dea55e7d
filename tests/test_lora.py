"""LoRA as a parameter transform: shapes and logical axes, identity at init, the merged kernel against the
activation form x W + s (x A) B, adapter-only training of a tiny NextStep, merged export, files, sizes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from nextstep_jax.training import lora as lora_lib
from nextstep_jax import parallel
from nextstep_jax.training import trainer as trainer_lib
from nextstep_jax.interop import names
from nextstep_jax.models import nextstep as ns
from tests.batches import synthetic_batch
from tests.tolerance import assert_close_fp32

ALL = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"),
                          head_targets=("mlp_in", "mlp_out", "ada", "cond", "final"))

# Independently of lora.py: the activation form of each target. (x contracting W, x contracting A,
# (x A) contracting B), with l = layer, d/f/e = in or out features, h/k = heads/head_dim, r = rank.
FORMS = {
    "q": ("ld,ldhk->lhk", "ld,ldr->lr", "lr,lrhk->lhk"),
    "k": ("ld,ldhk->lhk", "ld,ldr->lr", "lr,lrhk->lhk"),
    "v": ("ld,ldhk->lhk", "ld,ldr->lr", "lr,lrhk->lhk"),
    "o": ("lhk,lhkd->ld", "lhk,lhkr->lr", "lr,lrd->ld"),
    "gate": ("ld,ldf->lf", "ld,ldr->lr", "lr,lrf->lf"),
    "up": ("ld,ldf->lf", "ld,ldr->lr", "lr,lrf->lf"),
    "down": ("lf,lfd->ld", "lf,lfr->lr", "lr,lrd->ld"),
    "mlp_in": ("ld,lde->le", "ld,ldr->lr", "lr,lre->le"),
    "mlp_out": ("ld,lde->le", "ld,ldr->lr", "lr,lre->le"),
    "ada": ("ld,lde->le", "ld,ldr->lr", "lr,lre->le"),
    "cond": ("d,de->e", "d,dr->r", "r,re->e"),
    "final": ("d,de->e", "d,dr->r", "r,re->e"),
}


def tiny_config():
  c = common.base_config("tiny", "tiny")
  c.model.update(dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                      intermediate_size=128, vocab_size=64))
  c.head.update(dict(dim=64, num_layers=2))
  c.image.latent_channels = 4
  c.image.patch_size = 1
  return c


@pytest.fixture(scope="module")
def tiny():
  """(config, graphdef, base params with every weight perturbed, axes): a live model whose FM head
  (zero-initialised final layers) already passes gradients to the layers below it."""
  c = tiny_config()
  graphdef, abstract, axes = trainer_lib.abstract_model(c)
  model = ns.NextStep(ns.NextStepConfig.from_config(c), rngs=nnx.Rngs(params=0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  return c, graphdef, params, axes


def _batch(c):
  return {k: jnp.asarray(v) for k, v in synthetic_batch(rows=2, seq_len=32, vocab=c.model.vocab_size,
                                                        token_dim=c.image.token_dim, image_tokens=4,
                                                        max_row_tokens=8).items()}


def _kernel(tree, path):
  for p in path:
    tree = tree[p]
  return tree


# ------------------------------------------------------------------------------------------------
def test_config_validation():
  with pytest.raises(ValueError, match="lora.targets has unknown names"):
    lora_lib.LoraConfig(targets=("q", "qkv"))
  with pytest.raises(ValueError, match="lora.head_targets has unknown names"):
    lora_lib.LoraConfig(head_targets=("q",))
  with pytest.raises(ValueError, match="more than once"):
    lora_lib.LoraConfig(targets=("q", "q"))
  with pytest.raises(ValueError, match="lora.rank"):
    lora_lib.LoraConfig(rank=0)
  with pytest.raises(ValueError, match="nothing to adapt"):
    lora_lib.LoraConfig(targets=())
  cfg = lora_lib.LoraConfig.from_config({"rank": 8, "alpha": 16, "targets": ["q", "v"]})
  assert cfg == lora_lib.LoraConfig(rank=8, alpha=16.0, targets=("q", "v"), head_targets=())
  assert cfg.scale == 2.0
  with pytest.raises(ValueError, match="not one string"):
    lora_lib.LoraConfig.from_config({"targets": "q"})


def test_shapes_axes_and_sharding(tiny):
  c, _, params, axes = tiny
  lora, laxes = lora_lib.init_lora(params, axes, ALL, jax.random.key(0))
  L, D, H, K, hd, F = 2, 64, 2, 1, 32, 128
  q, o = lora["backbone"]["layers"]["q_kernel"], lora["backbone"]["layers"]["o_kernel"]
  assert q["lora_a"].shape == (L, D, 4) and q["lora_b"].shape == (L, 4, H, hd)
  assert o["lora_a"].shape == (L, H, hd, 4) and o["lora_b"].shape == (L, 4, D)
  k = lora["backbone"]["layers"]["k_kernel"]
  assert k["lora_b"].shape == (L, 4, K, hd)
  assert lora["backbone"]["layers"]["down_kernel"]["lora_a"].shape == (L, F, 4)
  assert lora["head"]["cond_kernel"]["lora_a"].shape == (D, 4)  # unstacked: no layers dim
  assert lora["head"]["mlp_in_kernel"]["lora_b"].shape == (2, 4, 64)
  lq, lo = laxes["backbone"]["layers"]["q_kernel"], laxes["backbone"]["layers"]["o_kernel"]
  assert lq == {"lora_a": ("layers", "embed", "lora_rank"), "lora_b": ("layers", "lora_rank", "heads", "head_dim")}
  assert lo == {"lora_a": ("layers", "heads", "head_dim", "lora_rank"), "lora_b": ("layers", "lora_rank", "embed")}
  assert laxes["head"]["cond_kernel"] == {"lora_a": ("embed", "lora_rank"), "lora_b": ("lora_rank", "fm_mlp")}
  assert jax.tree.structure(lora) == jax.tree.structure(
      jax.tree.map(lambda _: 0, laxes, is_leaf=lambda x: isinstance(x, tuple)))

  # Adapters born on their shards, A split like the base kernel's in dims and B like its out dims.
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = parallel.shardings_for(jax.eval_shape(lambda: lora), mesh, c.mesh.rules, axes=laxes)
  born = jax.jit(lambda key: lora_lib.init_lora(params, axes, ALL, key)[0], out_shardings=shardings)(
      jax.random.key(0))
  P = jax.sharding.PartitionSpec
  assert born["backbone"]["layers"]["q_kernel"]["lora_a"].sharding.spec == P(None, "fsdp", None)
  assert born["backbone"]["layers"]["q_kernel"]["lora_b"].sharding.spec == P(None, None, "tensor", None)
  assert born["backbone"]["layers"]["o_kernel"]["lora_a"].sharding.spec == P(None, "tensor", None, None)
  assert born["backbone"]["layers"]["o_kernel"]["lora_b"].sharding.spec == P(None, None, "fsdp")
  np.testing.assert_array_equal(born["backbone"]["layers"]["q_kernel"]["lora_a"], q["lora_a"])


def test_identity_at_init(tiny):
  _, _, params, axes = tiny
  lora, _ = lora_lib.init_lora(params, axes, ALL, jax.random.key(3))
  out = lora_lib.apply_lora(params, lora, ALL)
  flat_out = jax.tree_util.tree_flatten_with_path(out)[0]
  flat_in = jax.tree_util.tree_flatten_with_path(params)[0]
  assert [p for p, _ in flat_out] == [p for p, _ in flat_in]
  targeted = {tuple(path) for _, path, _ in ALL.kernels()}
  for (path, new), (_, old) in zip(flat_out, flat_in):
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    assert new.dtype == old.dtype
    if tuple(k.key for k in path) not in targeted:
      assert new is old  # untargeted leaves are passed through, not copied
  # B zero, A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and different in every layer.
  q = lora["backbone"]["layers"]["q_kernel"]
  assert not np.any(np.asarray(q["lora_b"]))
  a = np.asarray(q["lora_a"])
  assert np.abs(a).max() <= 1 / np.sqrt(64) and np.abs(a).max() > 0.5 / np.sqrt(64)
  assert not np.allclose(a[0], a[1])
  o_a = np.asarray(lora["backbone"]["layers"]["o_kernel"]["lora_a"])  # fan_in = H * hd
  assert np.abs(o_a).max() <= 1 / np.sqrt(64)
  # Works under jit and the input is not modified.
  jitted = jax.jit(lambda p, l: lora_lib.apply_lora(p, l, ALL))(params, lora)
  np.testing.assert_array_equal(jitted["backbone"]["layers"]["o_kernel"],
                                params["backbone"]["layers"]["o_kernel"])


def test_merged_kernel_equals_activation_form(tiny):
  """x W' == x W + s (x A) B for every target, with the in/out dims written out by hand (FORMS)."""
  _, _, params, axes = tiny
  lora, _ = lora_lib.init_lora(params, axes, ALL, jax.random.key(0))
  rng = np.random.default_rng(0)
  lora = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * 0.1), lora)
  merged = lora_lib.apply_lora(params, lora, ALL)
  for name, path, _ in ALL.kernels():
    w = np.asarray(_kernel(params, path), np.float64)
    w2 = np.asarray(_kernel(merged, path), np.float64)
    a = np.asarray(_kernel(lora, path)["lora_a"], np.float64)
    b = np.asarray(_kernel(lora, path)["lora_b"], np.float64)
    fw, fa, fb = FORMS[name]
    x_spec = fw.split(",")[0]
    x = rng.normal(size=w.shape[:len(x_spec)])  # the layer dim (if any) and the in dims
    want = np.einsum(fw, x, w) + ALL.scale * np.einsum(fb, np.einsum(fa, x, a), b)
    got = np.einsum(fw, x, w2)
    assert_close_fp32(got, want, rtol=1e-5, err_msg=name)
    assert np.abs(got - np.einsum(fw, x, w)).max() > 1e-2, name  # the adapter did something


def _outputs(graphdef, params, batch, key):
  """Loss metrics, LM logits and head velocities of the model with `params`."""
  model = nnx.merge(graphdef, params)
  _, m = model.loss(batch, batch["image_tokens"], key)
  logits = model.backbone.forward_logits(batch["tokens"], batch["positions"], batch["segment_ids"])
  n, td = 6, model.config.token_dim
  kx, kt, kc = jax.random.split(key, 3)
  v = model.head(jax.random.normal(kx, (n, td)), jax.random.uniform(kt, (n,)),
                 jax.random.normal(kc, (n, model.config.backbone.hidden_size)))
  return {"loss": m["loss"], "ce": m["ce"], "fm": m["fm"], "logits": logits, "v": v}


def test_adapter_training_and_merge(tiny):
  c, graphdef, params, axes = tiny
  cfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"),
                            head_targets=("mlp_in", "ada", "cond"))
  lora, _ = lora_lib.init_lora(params, axes, cfg, jax.random.key(0))
  base_before = jax.tree.map(np.array, params)
  batch = _batch(c)
  key = jax.random.key(7)

  def loss_fn(lora_params, base, batch, key):
    model = nnx.merge(graphdef, lora_lib.apply_lora(jax.lax.stop_gradient(base), lora_params, cfg))
    return model.loss(batch, batch["image_tokens"], key)[0]

  tx = optax.adam(1e-2)

  @jax.jit
  def step(lora_params, opt_state, base, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(lora_params, base, batch, key)
    updates, opt_state = tx.update(grads, opt_state, lora_params)
    return optax.apply_updates(lora_params, updates), opt_state, loss, grads

  opt_state = tx.init(lora)
  lora0 = lora
  losses = []
  for i in range(6):
    lora, opt_state, loss, grads = step(lora, opt_state, params, batch, key)
    losses.append(float(loss))
    assert jax.tree.structure(grads) == jax.tree.structure(lora0)
    if i == 0:  # B = 0: no gradient reaches A yet, every B gets one
      for _, path, _ in cfg.kernels():
        assert not np.any(np.asarray(_kernel(grads, path)["lora_a"])), path
        assert np.any(np.asarray(_kernel(grads, path)["lora_b"])), path
  final = float(jax.jit(loss_fn)(lora, params, batch, key))
  assert final < 0.97 * losses[0], (losses, final)

  # The base is bitwise unchanged; every adapter moved.
  jax.tree.map(np.testing.assert_array_equal, params, base_before)
  for _, path, _ in cfg.kernels():
    for k in ("lora_a", "lora_b"):
      assert not np.array_equal(_kernel(lora, path)[k], _kernel(lora0, path)[k]), (path, k)

  # Merged weights, exported as ordinary tensors and read back, reproduce the adapted model.
  ncfg = ns.NextStepConfig.from_config(c)
  merged = lora_lib.merge_lora(params, lora, cfg)
  tensors = dict(names.nextstep_to_tensors(merged, ncfg))
  plain = names.nextstep_from_tensors(lambda n: tensors[n], ncfg)
  plain = jax.tree.map(jnp.asarray, plain)
  adapted = jax.jit(lambda l, b, bt, k: _outputs(graphdef, lora_lib.apply_lora(b, l, cfg), bt, k))(
      lora, params, batch, key)
  from_merged = jax.jit(lambda p, bt, k: _outputs(graphdef, p, bt, k))(plain, batch, key)
  from_base = jax.jit(lambda p, bt, k: _outputs(graphdef, p, bt, k))(params, batch, key)
  for name in adapted:
    assert_close_fp32(from_merged[name], adapted[name], rtol=1e-5, err_msg=name)
  assert np.abs(np.asarray(from_base["logits"]) - np.asarray(adapted["logits"])).max() > 1e-3
  assert abs(float(from_base["loss"]) - float(adapted["loss"])) > 1e-3


def test_apply_errors(tiny):
  _, _, params, axes = tiny
  cfg = lora_lib.LoraConfig(rank=4, targets=("q", "o"))
  lora, _ = lora_lib.init_lora(params, axes, cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="rank 8 needs"):
    lora_lib.apply_lora(params, lora, lora_lib.LoraConfig(rank=8, targets=("q", "o")))
  with pytest.raises(KeyError, match="lora params: no entry backbone/layers/v_kernel"):
    lora_lib.apply_lora(params, lora, lora_lib.LoraConfig(rank=4, targets=("q", "v")))
  with pytest.raises(KeyError, match="base params: no entry head"):
    lora_lib.init_lora({"backbone": params["backbone"]}, axes, lora_lib.LoraConfig(head_targets=("cond",),
                                                                                  targets=()), jax.random.key(0))


def test_save_load_round_trip(tiny, tmp_path):
  _, _, params, axes = tiny
  lora, _ = lora_lib.init_lora(params, axes, ALL, jax.random.key(5))
  lora = jax.tree.map(lambda x: x + 1.0, lora)  # B non-zero too
  out = tmp_path / "adapter"
  lora_lib.save_lora(out, lora, ALL, metadata={"base": "tiny"})
  assert sorted(os.listdir(out)) == ["lora.safetensors", "lora_config.json"]
  loaded, cfg = lora_lib.load_lora(str(out))
  assert cfg == ALL
  assert jax.tree.structure(loaded) == jax.tree.structure(lora)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), lora, loaded)
  assert json.loads((out / "lora_config.json").read_text())["metadata"] == {"base": "tiny"}
  np.testing.assert_array_equal(lora_lib.merge_lora(params, loaded, cfg)["backbone"]["layers"]["o_kernel"],
                                lora_lib.apply_lora(params, lora, ALL)["backbone"]["layers"]["o_kernel"])

  # A config that does not match the tensors, or a missing file, is named in the error.
  doc = json.loads((out / "lora_config.json").read_text())
  bad = tmp_path / "bad"
  lora_lib.save_lora(bad, lora, ALL)
  (bad / "lora_config.json").write_text(json.dumps(dict(doc, rank=8)))
  with pytest.raises(ValueError, match="inconsistent with rank 8"):
    lora_lib.load_lora(bad)
  (bad / "lora_config.json").write_text(json.dumps(dict(doc, targets=["q"])))
  with pytest.raises(ValueError, match="unexpected"):
    lora_lib.load_lora(bad)
  os.remove(bad / "lora_config.json")
  with pytest.raises(FileNotFoundError, match="lora_config.json"):
    lora_lib.load_lora(bad)
  with pytest.raises(ValueError, match="expects"):
    lora_lib.save_lora(tmp_path / "x", lora, lora_lib.LoraConfig(rank=4, targets=("q",)))


def test_load_refuses_non_finite_adapters(tiny, tmp_path):
  from safetensors.numpy import load_file, save_file
  from nextstep_jax.interop.safetensors_io import CheckpointError
  _, _, params, axes = tiny
  lora, _ = lora_lib.init_lora(params, axes, ALL, jax.random.key(5))
  out = tmp_path / "adapter"
  lora_lib.save_lora(out, lora, ALL)
  weights = str(out / lora_lib.WEIGHTS_FILE)
  tensors = {k: np.array(v) for k, v in load_file(weights).items()}
  name = "backbone.layers.up_kernel.lora_a"
  assert name in tensors, sorted(tensors)
  tensors[name][:] = np.nan
  save_file(tensors, weights)
  with pytest.raises(CheckpointError, match=rf"lora\.safetensors: tensor {name} has {tensors[name].size} "
                                            r"non-finite values \(NaN/Inf\)"):
    lora_lib.load_lora(out)


def test_optimizer_memory_matches_optax(tiny):
  _, _, params, axes = tiny
  abstract = jax.eval_shape(lambda: params)
  lora = lora_lib.abstract_lora(abstract, axes, ALL)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(lora))

  def optax_bytes(tree):
    state = jax.eval_shape(optax.adamw(1e-3).init, tree)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim > 0)

  full = lora_lib.optimizer_memory_bytes(abstract, None)
  small = lora_lib.optimizer_memory_bytes(abstract, lora)
  assert full == optax_bytes(abstract) == 8 * lora_lib.param_count(abstract)
  assert small == optax_bytes(lora)
  assert 0 < small < full
  assert lora_lib.optimizer_memory_bytes(abstract, lora, "sgd") == 0
  with pytest.raises(ValueError, match="optimizer="):
    lora_lib.optimizer_memory_bytes(abstract, lora, "shampoo")


def test_compute_dtype_kernels_give_identical_loss_and_grads(tiny):
  """apply_lora(dtype=bf16) in a bf16-compute model: the model casts kernels to bf16 anyway, so the
  loss and the adapter gradients are bitwise those of fp32 merged kernels (at half their memory)."""
  _, _, params, axes = tiny
  c = tiny_config()
  c.model.dtype = "bfloat16"
  graphdef, _, _ = trainer_lib.abstract_model(c)
  cfg = lora_lib.LoraConfig(rank=4, targets=("q", "o", "down"), head_targets=("mlp_in",))
  lora, _ = lora_lib.init_lora(params, axes, cfg, jax.random.key(0))
  lora = jax.tree.map(lambda x: x + 0.05, lora)
  batch, key = _batch(c), jax.random.key(2)

  def loss_fn(lora_params, dtype):
    adapted = lora_lib.apply_lora(params, lora_params, cfg, dtype=dtype)
    return nnx.merge(graphdef, adapted).loss(batch, batch["image_tokens"], key)[0]

  l32, g32 = jax.jit(jax.value_and_grad(lambda l: loss_fn(l, None)))(lora)
  l16, g16 = jax.jit(jax.value_and_grad(lambda l: loss_fn(l, jnp.bfloat16)))(lora)
  assert float(l32) == float(l16)
  jax.tree.map(np.testing.assert_array_equal, g32, g16)
  assert jax.tree.leaves(g16)[0].dtype == jnp.float32
  adapted = lora_lib.apply_lora(params, lora, cfg, dtype=jnp.bfloat16)
  assert adapted["backbone"]["layers"]["q_kernel"].dtype == jnp.bfloat16
  assert adapted["backbone"]["layers"]["k_kernel"].dtype == jnp.float32  # untargeted: untouched
