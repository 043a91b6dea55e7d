"""The sampler's weights laid out once (``sampling.sampler_weights``): the same samples as the model, the
model's copy freed with ``consume``, and a compiled sampler that holds no second copy of the weights."""

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from nextstep_jax import sampling
from nextstep_jax.models import backbone as bb
from nextstep_jax.models import fm_head
from nextstep_jax.models import nextstep as ns
from nextstep_jax.sampling import layout
from nextstep_jax.sampling import prompts as prompts_lib
from nextstep_jax.sampling import sampler as sampler_lib
from tests.test_sampling import CFG, _prompt, _random_model
from tests.tolerance import assert_close_fp32


def _prompts():
  rng = np.random.default_rng(3)
  return [_prompt(rng, [7, 5], 8), _prompt(rng, [4, 3], 4)]


def test_fused_adaln_is_the_blocks_and_the_final_layers_projections():
  """``fuse_ada`` against the layout written out with numpy: block i's (shift, scale, gate) columns, then
  the final layer's (shift, scale); ``unfuse_ada`` gives the four arrays back bit for bit."""
  rng = np.random.default_rng(0)
  n, d = 3, 4
  k, b = rng.normal(size=(n, d, 3 * d)).astype(np.float32), rng.normal(size=(n, 3 * d)).astype(np.float32)
  fk, fb = rng.normal(size=(d, 2 * d)).astype(np.float32), rng.normal(size=(2 * d,)).astype(np.float32)
  kernel, bias = layout.fuse_ada(k, b, fk, fb)
  np.testing.assert_array_equal(np.asarray(kernel), np.concatenate([k[i] for i in range(n)] + [fk], axis=1))
  np.testing.assert_array_equal(np.asarray(bias), np.concatenate([b[i] for i in range(n)] + [fb]))
  for got, want in zip(layout.unfuse_ada(kernel, bias, n), (k, b, fk, fb)):
    np.testing.assert_array_equal(np.asarray(got), want)


def test_sampler_weights_sample_what_the_model_samples():
  model = _random_model(2)
  ps = _prompts()
  kw = dict(cfg=3.0, steps=5, sde=True)
  key = jax.random.key(4)
  ref = sampling.sample_images_naive(model, ps, 2, 3, key, **kw)
  from_model = np.asarray(sampling.sample_guided(model, ps, 2, 3, key, **kw))
  weights = sampling.sampler_weights(model)
  assert isinstance(weights, sampling.SamplerWeights) and weights.config == model.config
  assert sampling.sampler_weights(weights) is weights  # laid out already: taken as it is
  assert len(weights.layers) == CFG.backbone.num_layers and len(weights.head_blocks) == CFG.head.num_layers
  got = np.asarray(sampling.sample_guided(weights, ps, 2, 3, key, **kw))
  assert_close_fp32(got, ref, rtol=5e-5)  # the naive loop's tolerance (tests/test_sampling.py)
  np.testing.assert_array_equal(got, from_model)  # the same arrays, the same program
  # A model over host (numpy) arrays, as the training loop's sample grid makes: the same samples.
  graphdef, state = nnx.split(model)
  host = nnx.merge(graphdef, jax.device_get(state))
  assert isinstance(host.backbone.layers.q_kernel[...], np.ndarray)
  from_host = np.asarray(sampling.sample_guided(host, ps, 2, 3, key, **kw))
  assert_close_fp32(from_host, ref, rtol=5e-5)
  np.testing.assert_array_equal(from_host, from_model)
  # The public wrappers take the weights too.
  np.testing.assert_array_equal(np.asarray(sampling.sample_images(weights, ps[0], ps[1], 2, 3, key, **kw)), got)

  # The model the weights give back inside a program is the model, bit for bit (stacked, unfused).
  state = nnx.state(model)
  back = jax.jit(lambda w: nnx.state(w.model()))(weights)
  for (path, want), (_, have) in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                                     jax.tree_util.tree_flatten_with_path(back)[0]):
    np.testing.assert_array_equal(np.asarray(have), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def test_consumed_model_is_freed_and_its_weights_still_sample():
  model = _random_model(3)
  ps = _prompts()
  key = jax.random.key(5)
  kw = dict(cfg=2.0, steps=4, sde=False)
  ref = np.asarray(sampling.sample_guided(model, ps, 2, 2, key, **kw))
  stacked = list(model.backbone.layers.stacked().values())
  head = [getattr(model.head, n)[...] for n in layout.HEAD_BLOCK_PARAMS + layout.HEAD_ADA_PARAMS]
  kept = [model.backbone.embed_tokens[...], model.head.cond_kernel[...], model.head.final_kernel[...]]
  weights = sampling.sampler_weights(model, consume=True)
  assert all(x.is_deleted() for x in stacked + head)
  assert not any(x.is_deleted() for x in kept)  # the weights not laid out anew stay the model's
  np.testing.assert_array_equal(np.asarray(sampling.sample_guided(weights, ps, 2, 2, key, **kw)), ref)


def _abstract_model(hidden=256, layers=4, mlp=1024):
  c = bb.BackboneConfig(vocab_size=64, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
                        head_dim=hidden // 4, intermediate_size=mlp, rope_theta=1e4)
  cfg = ns.NextStepConfig(backbone=c, head=fm_head.HeadConfig(dim=hidden, num_layers=3, cond_dim=hidden,
                                                              token_dim=8), token_dim=8)
  return nnx.eval_shape(lambda: ns.NextStep(cfg, rngs=nnx.Rngs(0)))


def _old_sampler(graphdef, state, tokens, mask, key):
  """The sampler as it was: the model's stacked weights split and fused inside the program."""
  model = nnx.merge(graphdef, state)
  r, p = tokens.shape
  dec = layout.decoder_layout(model)
  cache = layout.init_cache(model.config.backbone, r, p + 16)
  h_last, cache, lengths = sampler_lib.prefill(model, dec, cache, tokens, mask, None, None)
  out, _, _ = sampler_lib.image_loop(model, dec, layout.head_layout(model.head), cache, h_last, lengths, key,
                                     groups=2, num_tokens=16, steps=4,
                                     sde=True, use_norm=True, cfg=jnp.float32(3.0), cfg_img=jnp.float32(2.0),
                                     time_shift=jnp.float32(1.0))
  return out


def test_compiled_sampler_holds_the_weights_once():
  """XLA's own accounting of the compiled sampler (``memory_analysis``): its scratch holds the KV cache and
  activations, not a second copy of the layer and head weights, as the sampler did when it laid the
  weights out inside its program (shown here too, so the measure can see such a copy)."""
  model = _abstract_model()
  layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.backbone.layers)))
  head = nnx.state(model.head)
  head_bytes = sum(head[n].size * head[n].dtype.itemsize for n in layout.HEAD_BLOCK_PARAMS + layout.HEAD_ADA_PARAMS)
  rows = prompts_lib.stack_groups(_prompts())
  tokens = jax.ShapeDtypeStruct(rows["tokens"].shape, jnp.int32)
  mask = jax.ShapeDtypeStruct(rows["mask"].shape, jnp.bool_)
  key = jax.eval_shape(lambda: jax.random.key(0))
  f32 = jax.ShapeDtypeStruct((), jnp.float32)

  weights = sampling.sampler_weights(model)  # abstract in, abstract out
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(weights))
  new = sampler_lib._sample_jit.lower(weights, tokens, mask, None, None, key, f32, f32, f32, groups=2, h=4, w=4,
                                     steps=4, sde=True, use_norm=True, cfg_schedule="constant", noise_repeat=0)
  new = new.compile().memory_analysis()
  graphdef, state = nnx.split(model)
  old = jax.jit(_old_sampler, static_argnums=0).lower(graphdef, state, tokens, mask, key).compile().memory_analysis()
  assert old.temp_size_in_bytes > layer_bytes + head_bytes  # the copy, seen
  assert new.temp_size_in_bytes < 0.1 * (layer_bytes + head_bytes), (new.temp_size_in_bytes, layer_bytes)
