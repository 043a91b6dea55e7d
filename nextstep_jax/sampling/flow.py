"""The flow-matching head's sampler for one image token: the time grids (ODE and SDE), guidance and its
schedule, the noise draws, the Euler / Euler–Maruyama integration (the SDE is the official one)."""

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


CFG_SCHEDULES = ("constant", "linear")


def scheduled(scale, i, n: int, schedule: str):
  """Guidance scale for image token i of n: constant, or (the official pipeline's "linear", after Muse)
  1 + (scale - 1) (n - i) / n, from the full scale at the first token towards 1 at the last."""
  if schedule == "constant":
    return scale
  if schedule == "linear":
    return 1.0 + (scale - 1.0) * (n - i) / n
  raise ValueError(f"cfg_schedule={schedule!r}; expected one of {CFG_SCHEDULES}")


def token_noise(key_i: jax.Array, b: int, d: int, steps: int, *, sde: bool, noise_repeat: int = 0
                ) -> tuple[jax.Array, jax.Array | None]:
  """(start noise (b, d), SDE step noises (steps - 1, b, d) or None) for one image token: one draw
  ``normal(key_i, (steps, b, d))`` (one slice for the ODE), its first slice the start noise.

  noise_repeat=0: every row its own draws. noise_repeat=n (n divides b): n draws tiled over the b rows,
  row j getting draw j % n; with rows ordered caption by caption and n images per caption, image k of
  every caption shares its noise, as the official pipeline draws it (``noise_repeat`` =
  ``num_images_per_caption``)."""
  n = noise_repeat or b
  if b % n:
    raise ValueError(f"noise_repeat={noise_repeat} does not divide the {b} rows of a prompt group")
  z = jax.random.normal(key_i, (steps if sde else 1, n, d), jnp.float32)
  if n != b:
    z = jnp.tile(z, (1, b // n, 1))
  return z[0], (z[1:] if sde else None)


def eval_grid(steps: int, shift, sde: bool) -> jax.Array:
  """(steps,) the times at which the head is evaluated, in order: the ODE grid without its end, or the
  SDE grid (its last entry is the last step's)."""
  return sde_grid(steps, shift) if sde else ode_grid(steps, shift)[:steps]


def row_noise(keys_b: jax.Array, i, d: int, steps: int, *, sde: bool) -> tuple[jax.Array, jax.Array | None]:
  """``token_noise`` with one key per row: row j draws token i's noise from ``fold_in(keys_b[j], i)``
  exactly as a one-row call with key ``keys_b[j]`` does, so an image's noise does not depend on the
  other rows of its batch. Returns ((b, d), (steps - 1, b, d) or None)."""
  x0, zs = jax.vmap(lambda k: token_noise(jax.random.fold_in(k, i), 1, d, steps, sde=sde))(keys_b)
  return x0[:, 0], (None if zs is None else jnp.moveaxis(zs[:, :, 0], 0, 1))


def integrate(velocity, x0: jax.Array, zs: jax.Array | None, *, steps: int, time_shift,
              indexed: bool = False) -> jax.Array:
  """One token from noise x0 (t=0) to data (t=1) with the guided `velocity(x, t)`: Euler on the ODE grid
  when `zs` is None, else the official SDE (v1 release, ``FlowMatchingHead.sample``): steps - 1
  Euler–Maruyama steps on the SDE grid with drift (1 + t) v - x and noise sqrt(2 (1 - t) dt) zs[k], then
  one last step x + v * SDE_LAST_STEP with the guided velocity at the last grid time.
  indexed: `velocity(x, k)` receives the evaluation's index k into ``eval_grid`` instead of its time
  (the compiled sampler looks the time embedding up by it)."""
  at = (lambda x, k, t: velocity(x, k)) if indexed else (lambda x, k, t: velocity(x, t))
  if zs is None:
    grid = ode_grid(steps, time_shift)

    def ode_step(k, x):
      return x + (grid[k + 1] - grid[k]) * at(x, k, grid[k])

    return jax.lax.fori_loop(0, steps, ode_step, x0)

  grid = sde_grid(steps, time_shift)

  def em_step(k, x):
    t, dt = grid[k], grid[k + 1] - grid[k]
    return x + ((1.0 + t) * at(x, k, t) - x) * dt + jnp.sqrt(2.0 * (1.0 - t) * dt) * zs[k]

  x = jax.lax.fori_loop(0, steps - 1, em_step, x0)
  return x + at(x, steps - 1, grid[steps - 1]) * SDE_LAST_STEP


def guided_velocity(head, x_bd: jax.Array, t, cond_rd: jax.Array, *, groups: int, cfg, cfg_img) -> jax.Array:
  """The guided velocity (B, d) fp32 of the head's training layout (``FlowHead.__call__``): the shared noisy
  token x (B, d) tiled over the G groups of rows, each row's condition cond (G*B, D), combined by ``guide``."""
  r = cond_rd.shape[0]
  b, d = x_bd.shape
  v = head(jnp.tile(x_bd, (groups, 1)), jnp.full((r,), t, jnp.float32), cond_rd).astype(jnp.float32)
  return guide(v.reshape(groups, b, d), cfg, cfg_img)


def sample_token(head, cond_rd: jax.Array, key_i: jax.Array, *, groups: int, steps: int, sde: bool,
                 cfg, cfg_img, time_shift, noise_repeat: int = 0) -> jax.Array:
  """One image token per row group member: (B, d) from the conditions of all G*B rows, with the head's
  training layout (``FlowHead.__call__``), as a reference for the compiled sampler's own
  (``sampler.draw_token``). The head runs in its configured dtype; the noise, the guidance and the
  integration are fp32, as in the official code."""
  b = cond_rd.shape[0] // groups
  x0, zs = token_noise(key_i, b, head.config.token_dim, steps, sde=sde, noise_repeat=noise_repeat)
  velocity = lambda x_bd, t: guided_velocity(head, x_bd, t, cond_rd, groups=groups, cfg=cfg, cfg_img=cfg_img)
  return integrate(velocity, x0, zs, steps=steps, time_shift=time_shift)
