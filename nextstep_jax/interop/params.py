"""Moving pure parameter dicts in and out of NNX modules, with shape checks that name the parameter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def pure_params(model: nnx.Module) -> dict:
  """Nested dict of the model's nnx.Param arrays."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flatten(d: dict, prefix=()) -> dict[tuple, object]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def load_pure_params(model: nnx.Module, params: dict, source: str = "checkpoint") -> None:
  """Writes `params` into `model` in place; every parameter must be present with the right shape."""
  state = nnx.state(model, nnx.Param)
  want = _flatten(nnx.to_pure_dict(state))
  got = _flatten(params)
  missing = sorted("/".join(map(str, k)) for k in want.keys() - got.keys())
  extra = sorted("/".join(map(str, k)) for k in got.keys() - want.keys())
  if missing or extra:
    raise ValueError(f"{source}: parameters missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                     f"unexpected {extra[:8]}{'...' if len(extra) > 8 else ''}")
  for k, v in want.items():
    if tuple(np.shape(got[k])) != tuple(v.shape):
      raise ValueError(f"{source}: parameter {'/'.join(map(str, k))} has shape {tuple(np.shape(got[k]))}, "
                       f"the model expects {tuple(v.shape)}")
  cast = jax.tree.map(lambda new, old: jnp.asarray(new, dtype=old.dtype), params, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, cast)
  nnx.update(model, state)
