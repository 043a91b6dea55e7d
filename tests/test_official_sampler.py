"""The head's sampler held to the official NextStep-1 code, transcribed line by line.

The transcriptions below follow the v1 release of stepfun-ai/NextStep-1:
  * ``nextstep/models/modeling_fm_head.py``, ``FlowMatchingHead.sample`` (with ``get_score_from_velocity``,
    ``get_velocity_from_cfg`` and ``randn_tensor``): the Euler–Maruyama loop and its last step;
  * ``nextstep/models/pipeline_nextstep.py``, ``NextStepPipeline.decoding``: the "linear" cfg schedule.
They are written in numpy on the same noise the project draws, with the project's head as the network
(the head itself is held to the official layers by the parity tests), so what is compared is the
integration: grid, shift, score, drift, noise scale, the last step, the guidance formulas.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from nextstep_jax.models import fm_head
from nextstep_jax.sampling import flow
from tests.tolerance import assert_close_fp32

D, COND, B = 8, 32, 3
HEAD_CFG = fm_head.HeadConfig(dim=32, num_layers=2, cond_dim=COND, token_dim=D)


def _head(seed=0):
  head = fm_head.FlowHead(HEAD_CFG, rngs=nnx.Rngs(seed))
  st = nnx.state(head, nnx.Param)  # the zero-initialised output layers would hide everything
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
  nnx.update(head, jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), st))
  return head


# --- transcription of FlowMatchingHead.sample (v1 release) -----------------------------------------------

def official_velocity_from_cfg(velocity, cfg, cfg2, cfg_mult):
  if cfg_mult == 2:
    cond_v, uncond_v = np.split(velocity, 2, axis=0)
    velocity = uncond_v + cfg * (cond_v - uncond_v)
  elif cfg_mult == 3:
    cond_v, uncond_v1, uncond_v2 = np.split(velocity, 3, axis=0)
    velocity = uncond_v2 + cfg2 * (uncond_v1 - uncond_v2) + cfg * (cond_v - uncond_v1)
  return velocity


def official_score_from_velocity(velocity, x, t):
  t = t.reshape(-1, 1)
  alpha_t, d_alpha_t = t, 1
  sigma_t, d_sigma_t = 1 - t, -1
  mean = x
  reverse_alpha_ratio = alpha_t / d_alpha_t
  var = sigma_t**2 - reverse_alpha_ratio * d_sigma_t * sigma_t
  return (reverse_alpha_ratio * velocity - mean) / var


def official_sample(net, c, noise, step_noise, *, cfg, cfg2, timesteps_shift, num_sampling_steps,
                    last_step_size=0.04):
  """``FlowMatchingHead.sample`` with its two ``randn_tensor`` draws given (noise, then one per step)."""
  f32 = np.float32
  cfg_mult = 1
  if cfg > 1.0:
    cfg_mult += 1
  if cfg2 > 1.0:
    cfg_mult += 1
  x = noise
  xs = []
  t0, t1 = 0, 1 - last_step_size
  timesteps = np.linspace(t0, t1, num_sampling_steps, dtype=f32)
  timesteps = timesteps / (f32(timesteps_shift) - (f32(timesteps_shift) - 1) * timesteps)
  for k, (ti, tj) in enumerate(zip(timesteps[:-1], timesteps[1:])):
    dt = tj - ti
    combined = np.concatenate([x] * cfg_mult, axis=0)
    velocity = net(combined, np.full((c.shape[0],), ti, f32), c).astype(f32)
    velocity = official_velocity_from_cfg(velocity, f32(cfg), f32(cfg2), cfg_mult)
    t = np.full((x.shape[0],), ti, f32)
    score = official_score_from_velocity(velocity, x, t)
    drift = velocity + (1 - t.reshape(-1, 1)) * score
    w_cur = step_noise[k]
    dw = w_cur * np.sqrt(dt)
    mean_x = x + drift * dt
    x = mean_x + np.sqrt(2 * (1 - t.reshape(-1, 1))) * dw
    xs.append(x)
  combined = np.concatenate([xs[-1]] * cfg_mult, axis=0)
  velocity = net(combined, np.full((c.shape[0],), timesteps[-1], f32), c).astype(f32)
  velocity = official_velocity_from_cfg(velocity, f32(cfg), f32(cfg2), cfg_mult)
  x = xs[-1] + velocity * f32(last_step_size)
  xs.append(x)
  assert len(xs) == num_sampling_steps
  return xs[-1]


def official_randn_tensor(draw, shape, noise_repeat):
  """``randn_tensor``: (noise_repeat, d) drawn once and repeated over the batch."""
  bsz = shape[0]
  assert bsz % noise_repeat == 0
  return np.tile(draw, (bsz // noise_repeat, 1))


# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups,cfg,cfg_img,shift,steps", [(2, 7.5, 1.0, 1.0, 28), (3, 7.5, 2.0, 3.2, 12),
                                                            (1, 1.0, 1.0, 1.0, 5)])
def test_sde_token_equals_official_transcription(groups, cfg, cfg_img, shift, steps):
  head = _head()
  rng = np.random.default_rng(0)
  cond = jnp.asarray(rng.normal(size=(groups * B, COND)).astype(np.float32))
  x0, zs = flow.token_noise(jax.random.key(3), B, D, steps, sde=True)
  net = lambda x, t, c: np.asarray(head(jnp.asarray(x), jnp.asarray(t), jnp.asarray(c)))

  def velocity(x, t):
    v = head(jnp.tile(x, (groups, 1)), jnp.full((groups * B,), t, jnp.float32), cond)
    return flow.guide(v.reshape(groups, B, D), cfg, cfg_img)

  ours = np.asarray(jax.jit(lambda x0, zs: flow.integrate(velocity, x0, zs, steps=steps, time_shift=shift))(x0, zs))
  ref = official_sample(net, np.asarray(cond), np.asarray(x0), np.asarray(zs), cfg=cfg, cfg2=cfg_img,
                        timesteps_shift=shift, num_sampling_steps=steps)
  assert_close_fp32(ours, ref, rtol=1e-6)

  # The check can fail: the last step as the drift over 1 - t_last (what the project did before) is far off.
  grid = flow.sde_grid(steps, shift)

  @jax.jit
  def drift_last_step(x0, zs):
    def em(k, x):
      t, dt = grid[k], grid[k + 1] - grid[k]
      return x + ((1 + t) * velocity(x, t) - x) * dt + jnp.sqrt(2 * (1 - t) * dt) * zs[k]
    x = jax.lax.fori_loop(0, steps - 1, em, x0)
    t = grid[-1]
    return x + ((1 + t) * velocity(x, t) - x) * (1 - t)

  assert np.abs(np.asarray(drift_last_step(x0, zs)) - ref).max() > 1e-3 * np.abs(ref).max()


def test_ode_is_euler_on_the_shifted_grid():
  head = _head(1)
  cond = jnp.asarray(np.random.default_rng(1).normal(size=(B, COND)).astype(np.float32))
  x0, zs = flow.token_noise(jax.random.key(0), B, D, 6, sde=False)
  assert zs is None
  velocity = lambda x, t: head(x, jnp.full((B,), t, jnp.float32), cond)
  ours = np.asarray(flow.integrate(velocity, x0, None, steps=6, time_shift=3.2))
  t = np.linspace(0, 1, 7, dtype=np.float32)
  t = t / (np.float32(3.2) - np.float32(2.2) * t)
  x = np.asarray(x0)
  for k in range(6):
    x = x + (t[k + 1] - t[k]) * np.asarray(velocity(jnp.asarray(x), t[k]))
  assert_close_fp32(ours, x, rtol=1e-6)


def test_noise_repeat_shares_draws_as_the_official_randn_tensor():
  b, n = 6, 2
  x0, zs = flow.token_noise(jax.random.key(5), b, D, 4, sde=True, noise_repeat=n)
  x0, zs = np.asarray(x0), np.asarray(zs)
  np.testing.assert_array_equal(x0, official_randn_tensor(x0[:n], (b, D), n))
  for z in zs:
    np.testing.assert_array_equal(z, official_randn_tensor(z[:n], (b, D), n))
  assert np.abs(x0[0] - x0[1]).min() > 0  # the n draws differ
  own, _ = flow.token_noise(jax.random.key(5), b, D, 4, sde=True)
  assert len({tuple(r) for r in np.asarray(own).round(6)}) == b  # noise_repeat=0: every row its own
  with pytest.raises(ValueError, match="noise_repeat=4 does not divide"):
    flow.token_noise(jax.random.key(5), b, D, 4, sde=True, noise_repeat=4)


def test_linear_cfg_schedule_is_the_pipelines():
  # NextStepPipeline.decoding: tokens_len = tokens generated so far;
  # cfg_iter = 1 + (cfg - 1) * (max_new_len - tokens_len) / max_new_len
  max_new_len, cfg = 16, 7.5
  for tokens_len in range(max_new_len):
    cfg_iter = 1 + (cfg - 1) * (max_new_len - tokens_len) / max_new_len
    got = float(jax.jit(lambda i: flow.scheduled(jnp.float32(cfg), i, max_new_len, "linear"))(tokens_len))
    assert got == pytest.approx(cfg_iter, rel=1e-6)
    assert flow.scheduled(cfg, tokens_len, max_new_len, "constant") == cfg
  with pytest.raises(ValueError, match="cfg_schedule='cosine'"):
    flow.scheduled(cfg, 0, max_new_len, "cosine")
