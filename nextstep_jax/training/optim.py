"""The optimiser: AdamW with masked weight decay, global-norm clipping and the LR schedule.

Matches the open NextStep-1 recipe (SPEC §7): AdamW β=(0.9, 0.95), eps 1e-8, no weight decay
on biases and norm weights, gradient clipping at 1.0; constant or cosine (lr -> min_lr)
schedules after a linear warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

NO_DECAY_SUFFIXES = ("bias", "scale")


def _leaf_name(path: tuple[Any, ...]) -> str:
  """The parameter's own name: the last string key, past an nnx Variable's `value` field."""
  keys = list(path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  for k in reversed(keys):
    if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str):
      return k.key
    if isinstance(k, jax.tree_util.GetAttrKey):
      return k.name
  return ""


def decay_mask(params: Any) -> Any:
  """Tree of bools like `params`: True where weight decay applies.

  No decay for a leaf whose name ends with "bias" or "scale" (the model names every bias
  "...bias" and every norm weight "...scale"); decay for everything else (kernels,
  embeddings). Works on plain nested dicts and on nnx.State trees of Variables.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: not _leaf_name(path).endswith(NO_DECAY_SUFFIXES), params)


def make_schedule(optim: Any, total_steps: int) -> Callable[[Any], jax.Array]:
  """Learning rate as a function of the 0-based update count.

  Warm-up: update s < warmup_steps uses lr * (s + 1) / warmup_steps (no update at lr 0), so
  update warmup_steps - 1 is at the peak. Then "constant" stays at lr; "cosine" goes from lr
  at update warmup_steps to min_lr at update total_steps (and stays there):
  min_lr + (lr - min_lr) * (1 + cos(pi * (s - warmup) / (total_steps - warmup))) / 2.
  """
  lr, min_lr = float(optim.lr), float(optim.min_lr)
  warmup, kind = int(optim.warmup_steps), str(optim.schedule)
  if kind not in ("constant", "cosine"):
    raise ValueError(f"optim.schedule={kind!r} is not one of ['constant', 'cosine']")
  if lr <= 0:
    raise ValueError(f"optim.lr={lr} must be > 0")
  if warmup < 0 or warmup > total_steps:
    raise ValueError(f"optim.warmup_steps={warmup} must be in [0, total steps={total_steps}]")
  decay_steps = max(total_steps - warmup, 1)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    warm = lr * jnp.minimum(1.0, (s + 1.0) / max(warmup, 1))
    if kind == "constant":
      after = jnp.full_like(s, lr)
    else:
      progress = jnp.clip((s - warmup) / decay_steps, 0.0, 1.0)
      after = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(s < warmup, warm, after)

  return schedule


def make_optimizer(optim: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
  """(AdamW chain, schedule) from ``config.optim`` for a run of `total_steps` updates.

  Gradients are clipped to global norm ``clip_norm`` first (0 turns clipping off), then
  AdamW with decoupled weight decay (scaled by the learning rate, as in PyTorch's AdamW),
  masked by ``decay_mask``. ``schedule(step)`` gives the learning rate for logging.
  """
  schedule = make_schedule(optim, total_steps)
  parts = []
  clip = float(optim.clip_norm)
  if clip < 0:
    raise ValueError(f"optim.clip_norm={clip} must be >= 0 (0 = no clipping)")
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(optax.adamw(learning_rate=schedule, b1=float(optim.b1), b2=float(optim.b2),
                           eps=float(optim.eps), weight_decay=float(optim.weight_decay),
                           mask=decay_mask))
  return optax.chain(*parts), schedule
