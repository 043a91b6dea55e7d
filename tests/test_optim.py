"""Optimiser: weight-decay mask, schedule values at key steps, clipping, decoupled decay."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from nextstep_jax.training.optim import decay_mask, make_optimizer, make_schedule


def _optim(**kw) -> ml_collections.ConfigDict:
  base = dict(lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_steps=10, weight_decay=0.1,
              b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_decay_mask_on_nested_dicts():
  params = {
    "backbone": {"embed_tokens": 0, "final_norm_scale": 0, "lm_head_kernel": 0,
                 "layers": {"q_kernel": 0, "q_bias": 0, "input_norm_scale": 0, "down_kernel": 0}},
    "head": {"blocks": [{"ln_scale": 0, "ln_bias": 0, "mlp_in_kernel": 0}]},
    "image_in_bias": 0,
  }
  m = decay_mask(params)
  assert m["backbone"] == {"embed_tokens": True, "final_norm_scale": False, "lm_head_kernel": True,
                           "layers": {"q_kernel": True, "q_bias": False, "input_norm_scale": False,
                                      "down_kernel": True}}
  assert m["head"]["blocks"][0] == {"ln_scale": False, "ln_bias": False, "mlp_in_kernel": True}
  assert m["image_in_bias"] is False


class _Tiny(nnx.Module):
  def __init__(self):
    self.up_kernel = nnx.Param(jnp.ones((4, 3)), axes=("embed", "mlp"))
    self.up_bias = nnx.Param(jnp.ones((3,)), axes=("mlp",))
    self.norm_scale = nnx.Param(jnp.ones((4,)), axes=("norm",))


def test_decay_mask_on_nnx_state_and_decoupled_decay():
  state = nnx.state(_Tiny(), nnx.Param)
  mask = decay_mask(state)
  assert jax.tree.leaves(mask) == [False, False, True]  # norm_scale, up_bias, up_kernel
  tx, _ = make_optimizer(_optim(lr=1e-2, warmup_steps=0, weight_decay=0.5, schedule="constant",
                                min_lr=1e-2), total_steps=10)
  opt_state = tx.init(state)
  zeros = jax.tree.map(jnp.zeros_like, state)
  updates, _ = tx.update(zeros, opt_state, state)
  # Zero gradients: only decay moves weights, by -lr * wd * w, and only the kernel.
  np.testing.assert_allclose(updates["up_kernel"][...], -1e-2 * 0.5 * np.ones((4, 3)), rtol=1e-6)
  np.testing.assert_array_equal(updates["up_bias"][...], 0.0)
  np.testing.assert_array_equal(updates["norm_scale"][...], 0.0)


def test_constant_schedule_with_warmup():
  s = make_schedule(_optim(schedule="constant", lr=1e-4, min_lr=1e-4, warmup_steps=5000), 200_000)
  assert float(s(0)) == pytest.approx(1e-4 / 5000)
  assert float(s(2499)) == pytest.approx(0.5e-4)
  assert float(s(4999)) == pytest.approx(1e-4)
  for step in (5000, 100_000, 199_999, 300_000):
    assert float(s(step)) == pytest.approx(1e-4)


def test_cosine_schedule_key_steps():
  s = make_schedule(_optim(lr=1e-5, min_lr=0.0, warmup_steps=500), 10_000)
  assert float(s(0)) == pytest.approx(1e-5 / 500)
  assert float(s(499)) == pytest.approx(1e-5)
  assert float(s(500)) == pytest.approx(1e-5)
  assert float(s(500 + 9500 // 2)) == pytest.approx(0.5e-5, rel=1e-5)  # half-way: mean of ends
  assert float(s(10_000)) == pytest.approx(0.0, abs=1e-12)
  assert float(s(20_000)) == pytest.approx(0.0, abs=1e-12)
  values = np.array([float(s(i)) for i in range(500, 10_001, 250)])
  assert np.all(np.diff(values) <= 1e-12)  # monotone decay


def test_cosine_without_warmup_and_min_lr():
  s = make_schedule(_optim(lr=1e-3, min_lr=1e-4, warmup_steps=0), 100)
  assert float(s(0)) == pytest.approx(1e-3)
  assert float(s(50)) == pytest.approx(1e-4 + 0.5 * 9e-4)
  assert float(s(100)) == pytest.approx(1e-4)
  # Traced steps (the jitted update) give the same values.
  np.testing.assert_allclose(jax.jit(s)(jnp.arange(0, 101, 25)),
                             [float(s(i)) for i in range(0, 101, 25)], rtol=1e-6)


def test_schedule_rejects_bad_settings():
  with pytest.raises(ValueError, match="optim.schedule='linear'"):
    make_schedule(_optim(schedule="linear"), 100)
  with pytest.raises(ValueError, match="optim.warmup_steps=200"):
    make_schedule(_optim(warmup_steps=200), 100)
  with pytest.raises(ValueError, match="optim.lr"):
    make_schedule(_optim(lr=-1.0), 100)


def _first_moment(tx, grads):
  params = jax.tree.map(jnp.zeros_like, grads)
  _, state = tx.update(grads, tx.init(params), params)
  (adam_state,) = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
    x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  return adam_state.mu


def test_global_norm_clipping():
  tx, _ = make_optimizer(_optim(clip_norm=1.0), total_steps=100)
  big = {"a_kernel": jnp.full((4,), 3.0), "b_kernel": jnp.full((2, 2), 4.0)}  # norm 10
  mu = _first_moment(tx, big)
  # Adam's first moment after one step is (1 - b1) * (clipped gradient).
  clipped = jax.tree.map(lambda m: m / 0.1, mu)
  norm = np.sqrt(sum(float(jnp.sum(x * x)) for x in jax.tree.leaves(clipped)))
  assert norm == pytest.approx(1.0, rel=1e-5)
  np.testing.assert_allclose(clipped["a_kernel"], 0.3, rtol=1e-5)
  small = {"a_kernel": jnp.full((4,), 0.1), "b_kernel": jnp.full((2, 2), 0.1)}  # norm < 1
  mu = _first_moment(tx, small)
  np.testing.assert_allclose(mu["a_kernel"] / 0.1, 0.1, rtol=1e-5)
  # clip_norm = 0 turns clipping off.
  tx0, _ = make_optimizer(_optim(clip_norm=0.0), total_steps=100)
  mu = _first_moment(tx0, big)
  np.testing.assert_allclose(mu["b_kernel"] / 0.1, 4.0, rtol=1e-5)


def test_adam_hyperparameters_reach_optax():
  tx, sched = make_optimizer(_optim(b1=0.5, b2=0.25, warmup_steps=0, schedule="constant",
                                    min_lr=1e-3, weight_decay=0.0, clip_norm=0.0), 10)
  g = {"w_kernel": jnp.array([2.0])}
  p = {"w_kernel": jnp.array([0.0])}
  state = tx.init(p)
  u, state = tx.update(g, state, p)
  # Bias-corrected first step of Adam: m_hat = g, v_hat = g^2 -> update = -lr * g / (|g| + eps).
  np.testing.assert_allclose(u["w_kernel"], [-1e-3 * 2.0 / (2.0 + 1e-8)], rtol=1e-6)
  u, state = tx.update(g, state, p)
  np.testing.assert_allclose(u["w_kernel"], [-1e-3], rtol=1e-6)
  assert float(sched(3)) == pytest.approx(1e-3)
