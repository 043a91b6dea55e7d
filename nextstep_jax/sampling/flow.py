"""The flow-matching head's sampler for one image token: the time grids (ODE and SDE), guidance, the
Euler / Euler–Maruyama integration."""

from __future__ import annotations


import jax
import jax.numpy as jnp



SDE_LAST_STEP = 0.04


# ---------------------------------------------------------------------------------------------
# The flow-matching head's sampler (one image token)
# ---------------------------------------------------------------------------------------------

def shift_time(t: jax.Array, shift: jax.Array | float) -> jax.Array:
  """t' = t / (s - (s - 1) t): s > 1 spends more steps near the noise end."""
  return t / (shift - (shift - 1.0) * t)


def ode_grid(steps: int, shift) -> jax.Array:
  """(steps + 1,) shifted Euler grid from 0 (noise) to 1 (data)."""
  return shift_time(jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32), shift)


def sde_grid(steps: int, shift) -> jax.Array:
  """(steps,) shifted Euler–Maruyama grid from 0 to 1 - SDE_LAST_STEP (then a last step to 1)."""
  return shift_time(jnp.linspace(0.0, 1.0 - SDE_LAST_STEP, steps, dtype=jnp.float32), shift)


def guide(v_gbd: jax.Array, cfg, cfg_img) -> jax.Array:
  """Combines per-group velocities (G, B, d) into one (B, d) (module docstring)."""
  g = v_gbd.shape[0]
  if g == 1:
    return v_gbd[0]
  if g == 2:
    return v_gbd[1] + cfg * (v_gbd[0] - v_gbd[1])
  if g == 3:
    return v_gbd[2] + cfg_img * (v_gbd[1] - v_gbd[2]) + cfg * (v_gbd[0] - v_gbd[1])
  raise ValueError(f"guidance takes 1, 2 or 3 prompt groups, got {g}")


def sample_token(head, cond_rd: jax.Array, key_i: jax.Array, *, groups: int, steps: int, sde: bool,
                 cfg, cfg_img, time_shift) -> jax.Array:
  """One image token per row group member: (B, d) from the conditions of all G*B rows."""
  r = cond_rd.shape[0]
  b = r // groups
  d = head.config.token_dim
  k_init, k_sde = jax.random.split(key_i)
  x0 = jax.random.normal(k_init, (b, d), jnp.float32)

  def velocity(x_bd, t):
    v = head(jnp.tile(x_bd, (groups, 1)), jnp.full((r,), t, jnp.float32), cond_rd)
    return guide(v.reshape(groups, b, d), cfg, cfg_img)

  if not sde:
    grid = ode_grid(steps, time_shift)

    def ode_step(k, x):
      return x + (grid[k + 1] - grid[k]) * velocity(x, grid[k])

    return jax.lax.fori_loop(0, steps, ode_step, x0)

  grid = sde_grid(steps, time_shift)

  def drift(x, t):
    return (1.0 + t) * velocity(x, t) - x

  def em_step(k, x):
    t, dt = grid[k], grid[k + 1] - grid[k]
    z = jax.random.normal(jax.random.fold_in(k_sde, k), x.shape, jnp.float32)
    return x + drift(x, t) * dt + jnp.sqrt(2.0 * (1.0 - t) * dt) * z

  x = jax.lax.fori_loop(0, steps - 1, em_step, x0)
  t_last = grid[steps - 1]
  return x + drift(x, t_last) * (1.0 - t_last)
