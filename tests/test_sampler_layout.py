"""The sampler's own weight layout (sampling/layout.py) against the model's training layout, and batched
sampling: a batch of prompts with one key per image samples what each prompt sampled alone does."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from nextstep_jax import sampling
from nextstep_jax.models import backbone as bb
from nextstep_jax.models import fm_head
from nextstep_jax.models import nextstep as ns
from nextstep_jax.sampling import flow, layout
from tests.tolerance import assert_close_fp32

BB = bb.BackboneConfig(vocab_size=64, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, rope_theta=10000.0)
CFG = ns.NextStepConfig(backbone=BB, head=fm_head.HeadConfig(dim=48, num_layers=3, cond_dim=64, token_dim=8),
                        token_dim=8)


@pytest.fixture(scope="module")
def model():
  """Every weight random (the head's zero-initialised adaLN and output layers would hide errors)."""
  m = ns.NextStep(CFG, rngs=nnx.Rngs(0))
  st = nnx.state(m, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), 128))
  nnx.update(m, jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), st))
  return m


@pytest.fixture(scope="module")
def sampling_model():
  """Initial backbone, perturbed head: a sampler feeds every token back, and a backbone with large random
  weights amplifies fp32 rounding (different batch shapes round differently) token by token."""
  m = ns.NextStep(CFG, rngs=nnx.Rngs(0))
  st = nnx.state(m.head, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  nnx.update(m.head, jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), st))
  return m


def test_head_layout_velocity_equals_the_training_head(model):
  head = model.head
  rng = np.random.default_rng(0)
  groups, b = 2, 3
  x = jnp.asarray(rng.normal(size=(b, 8)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=(groups * b,)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(groups * b, 64)), jnp.float32)
  ref = head(jnp.tile(x, (groups, 1)), t, cond)
  hl = layout.head_layout(head)
  ada = layout.head_ada(hl, head.time_embed(t) + head.cond_embed(cond))
  ours = layout.head_velocity(hl, x, ada, groups)
  assert float(jnp.abs(ref).mean()) > 0.1  # a head that does something
  assert_close_fp32(ours, ref, rtol=1e-5)
  # The fused adaLN matrix holds every block's (shift, scale, gate) columns and then the final layer's.
  d, n = head.config.dim, head.config.num_layers
  np.testing.assert_array_equal(np.asarray(hl["ada_kernel"][:, 3 * d:6 * d]), np.asarray(head.ada_kernel[...][1]))
  np.testing.assert_array_equal(np.asarray(hl["ada_kernel"][:, 3 * n * d:]), np.asarray(head.final_ada_kernel[...]))


def test_eval_grid_is_the_times_the_head_is_evaluated_at():
  # The official SDE grid (v1 release, FlowMatchingHead.sample): linspace(0, 1 - 0.04, N) shifted.
  grid = flow.eval_grid(5, 1.0, True)
  np.testing.assert_allclose(np.asarray(grid), np.linspace(0.0, 1 - 0.04, 5), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(flow.eval_grid(4, 2.0, False)), np.asarray(flow.ode_grid(4, 2.0)[:4]))


def test_per_layer_decode_equals_the_stacked_backbone(model):
  """Prefill then two one-token steps: hidden states and caches agree with Backbone.__call__."""
  rng = np.random.default_rng(1)
  r, p, slots = 2, 5, 9
  x = jnp.asarray(rng.normal(size=(r, p, 64)), jnp.float32)
  seg = jnp.asarray([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)
  pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  stacked = model.backbone.init_cache(r, slots)
  per_layer = layout.init_cache(BB, r, slots)
  dec = layout.decoder_layout(model)
  h_ref, stacked = model.backbone(x, pos, seg, cache=stacked)
  h, per_layer = layout.decode(BB, dec, x, pos, seg, per_layer)
  assert_close_fp32(h, h_ref, rtol=1e-6)
  for i in range(2):
    xi = jnp.asarray(rng.normal(size=(r, 1, 64)), jnp.float32)
    pi = pos[:, -1:] + 1 + i
    h_ref, stacked = model.backbone(xi, pi, jnp.ones((r, 1), jnp.int32), cache=stacked)
    h, per_layer = layout.decode(BB, dec, xi, pi, jnp.ones((r, 1), jnp.int32), per_layer)
    assert_close_fp32(h, h_ref, rtol=1e-6)
  assert int(per_layer["index"]) == int(stacked["index"]) == p + 2
  assert len(per_layer["k"]) == BB.num_layers
  for name in ("k", "v"):  # layer i's cache is the stacked cache's row i
    assert_close_fp32(jnp.stack(per_layer[name]), stacked[name], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(per_layer["segments"]), np.asarray(stacked["segments"]))


def _prompts(rng, lengths, width):
  toks = np.zeros((len(lengths), width), np.int32)
  for r, n in enumerate(lengths):
    toks[r, width - n:] = rng.integers(9, BB.vocab_size, size=n)
  return sampling.Prompt(toks, toks != 0)


def _rows(prompt, i):
  return sampling.Prompt(prompt.tokens[i:i + 1], prompt.mask[i:i + 1])


def test_a_batch_samples_what_each_prompt_samples_alone(sampling_model):
  """Four prompts of different lengths (left-padded to one width), one key per image, the default SDE."""
  model = sampling_model
  rng = np.random.default_rng(2)
  cond, neg = _prompts(rng, [7, 3, 9, 5], 9), _prompts(rng, [2, 4, 3, 1], 4)
  keys = jax.random.split(jax.random.key(3), 4)
  kw = dict(cfg=4.0, steps=5, sde=True)
  batch = np.asarray(sampling.sample_images(model, cond, neg, 2, 2, keys, **kw))
  assert batch.shape == (4, 4, 8)
  for i in range(4):
    c, n = _rows(cond, i), _rows(neg, i)
    # Alone, each prompt keeps only its own padding.
    c = sampling.Prompt(c.tokens[:, -int(c.mask.sum()):], c.mask[:, -int(c.mask.sum()):])
    alone = np.asarray(sampling.sample_images(model, c, n, 2, 2, keys[i:i + 1], **kw))
    # Rows of other lengths in the batch change only the matmuls' shapes, so only fp32 rounding differs:
    # 1e-5 on the first token; fed back token by token (and layer-normed) it compounds, so the whole
    # image gets the compiled-vs-naive test's 5e-5.
    assert_close_fp32(batch[i:i + 1, :1], alone[:, :1], rtol=1e-5)
    assert_close_fp32(batch[i:i + 1], alone, rtol=5e-5)
  assert len({tuple(np.round(batch[i, 0], 4)) for i in range(4)}) == 4  # four different images
  # The naive reference draws the per-image keys the same way.
  ref = sampling.sample_images_naive(model, [cond, neg], 2, 2, keys, **kw)
  assert_close_fp32(batch, ref, rtol=5e-5)


def test_per_image_keys_are_checked(sampling_model):
  model = sampling_model
  rng = np.random.default_rng(4)
  cond, neg = _prompts(rng, [3, 3], 3), _prompts(rng, [2, 2], 2)
  with pytest.raises(ValueError, match=r"one per image \(2\)"):
    sampling.sample_images(model, cond, neg, 1, 2, jax.random.split(jax.random.key(0), 3), steps=2)
  with pytest.raises(ValueError, match="noise_repeat"):
    sampling.sample_images(model, cond, neg, 1, 2, jax.random.split(jax.random.key(0), 2), steps=2, noise_repeat=1)
