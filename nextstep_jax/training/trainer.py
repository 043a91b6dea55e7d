"""The trainer: the model built abstractly, its shardings, the state, and the jitted train step.

``Trainer(config, mesh, vae)`` holds what the step needs. The step itself reads top to bottom in
``Trainer.train_step``: gradients of the loss (``grads``: one batch, or ``optim.grad_accum``
micro-batches under a scan), the optimizer update, the non-finite skip, the EMA. ``step_fn`` is that
function under ``jax.jit`` with explicit in/out shardings and the state donated, traced and run under
the mesh (``UnderMesh``). DPO (training/dpo.py) subclasses it and swaps ``grads``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nextstep_jax import config as config_lib
from nextstep_jax import parallel
from nextstep_jax.batch import IGNORE
from nextstep_jax.models import layers as layers_lib
from nextstep_jax.models import nextstep as ns
from nextstep_jax.training import lora as lora_lib
from nextstep_jax.training import optim as optim_lib

State = dict[str, Any]


# ------------------------------------------------------------------------------------------------
# Model and state
# ------------------------------------------------------------------------------------------------
def lora_config(config) -> lora_lib.LoraConfig | None:
  """The run's LoRA settings (``config.lora``), or None for full fine-tuning (absent or rank 0)."""
  if "lora" not in config or not int(config.lora.rank):
    return None
  return lora_lib.LoraConfig.from_config(config.lora)


def abstract_model(config) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract params as a pure dict of ShapeDtypeStructs, logical axes tree) without
  allocating any weight."""
  model_cfg = ns.NextStepConfig.from_config(config)
  abstract = nnx.eval_shape(lambda: ns.NextStep(model_cfg, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(abstract, nnx.Param)
  axes = nnx.to_pure_dict(parallel.param_axes(state))
  # param_axes returns tuples at Variable positions; to_pure_dict keeps them as leaves.
  return graphdef, nnx.to_pure_dict(state), axes


class Trainer:
  """Holds what the step needs: graphdef, optimizer, shardings, the jitted step."""

  def __init__(self, config, mesh, vae=None):
    self.config = config
    self.mesh = mesh
    self.graphdef, self.abstract_params, self.axes = abstract_model(config)
    rules = config.mesh.rules
    self.param_shardings = parallel.shardings_for(self.abstract_params, mesh, rules, axes=self.axes)
    # LoRA: state["params"] holds only the adapters (trained, in the optimizer, EMA'd); the model's
    # weights sit frozen in state["base"] and are merged with the adapters inside the loss.
    self.lora = lora_config(config)
    self.compute_dtype = layers_lib.dtype_of(config.model.dtype)
    if self.lora is not None:
      self.base_abstract, self.base_shardings = self.abstract_params, self.param_shardings
      self.lora_axes = lora_lib.lora_axes(self.base_abstract, self.axes, self.lora)
      self.abstract_params = lora_lib.abstract_lora(self.base_abstract, self.axes, self.lora)
      self.param_shardings = parallel.shardings_for(self.abstract_params, mesh, rules, axes=self.lora_axes)
    self.tx, self.schedule = optim_lib.make_optimizer(config.optim, config.steps)
    opt_abstract = jax.eval_shape(self.tx.init, self.abstract_params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.ema_decay = float(config.ema_decay)
    # Accumulation steps per update: optim.grad_accum, or derived from the micro-batch and the mesh.
    self.grad_accum = config_lib.batch_plan(config, mesh.shape["data"] * mesh.shape["fsdp"])[1]
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    self.state_shardings = {
        "step": replicated,
        "params": self.param_shardings,
        "opt_state": parallel.shardings_like_params(opt_abstract, self.abstract_params,
                                                  self.param_shardings, mesh),
        "skipped": replicated,
        "bad_streak": replicated,
    }
    self.abstract_state = {"step": scalar, "params": self.abstract_params, "opt_state": opt_abstract,
                           "skipped": scalar, "bad_streak": scalar}
    if self.ema_decay > 0:
      self.state_shardings["ema"] = self.param_shardings
      self.abstract_state["ema"] = self.abstract_params
    if self.lora is not None:
      self.state_shardings["base"] = self.base_shardings
      self.abstract_state["base"] = self.base_abstract
    self.batch_sharding = parallel.data_sharding(mesh)
    self.vae = vae  # (encode_fn(vae_params, images) -> tokens, vae_params) for the pixel path, or None

  # -- state ---------------------------------------------------------------------------------------
  def init_state(self, seed: int) -> State:
    """Materialises a fresh, sharded state (params born on their shards)."""
    model_cfg = ns.NextStepConfig.from_config(self.config)

    def init():
      model = ns.NextStep(model_cfg, rngs=nnx.Rngs(params=seed))
      return self._fresh_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    return jax.jit(init, out_shardings=self.state_shardings)()

  def _fresh_state(self, params: dict) -> State:
    """State around model params; with LoRA, `params` become the frozen base and fresh adapters train."""
    zero = jnp.zeros((), jnp.int32)
    base = None
    if self.lora is not None:
      base = params
      params = lora_lib.init_lora(self.base_abstract, self.axes, self.lora,
                                  jax.random.fold_in(jax.random.key(self.config.seed), 1))[0]
    state = {"step": zero, "params": params, "opt_state": self.tx.init(params), "skipped": zero,
             "bad_streak": zero}
    if self.ema_decay > 0:
      state["ema"] = jax.tree.map(jnp.copy, params)
    if base is not None:
      state["base"] = base
    return state

  def state_from_params(self, params: dict) -> State:
    """A fresh optimizer and step counter around given model params (init_from another stage); with
    LoRA they become the frozen base."""
    in_sh = self.param_shardings if self.lora is None else self.base_shardings
    return jax.jit(self._fresh_state, in_shardings=(in_sh,), out_shardings=self.state_shardings)(params)

  def model_params(self, params: dict, base: dict | None = None, dtype=None) -> dict:
    """The model's full params: `params` itself, or with LoRA the base with the adapters merged in."""
    if self.lora is None:
      return params
    return lora_lib.apply_lora(jax.lax.stop_gradient(base), params, self.lora, dtype=dtype)

  # -- step ----------------------------------------------------------------------------------------
  def loss_fn(self, params: dict, batch: dict, key: jax.Array, row_ids: jax.Array | None = None,
              normalizers: tuple[jax.Array, jax.Array] | None = None, base: dict | None = None):
    model = nnx.merge(self.graphdef, self.model_params(params, base, self.compute_dtype))
    return model.loss(batch, self.image_tokens(batch), key, row_ids=row_ids, normalizers=normalizers)

  def image_tokens(self, batch: dict) -> jax.Array:
    """The batch's image-token buffer (B, M, d): given (latent path), or its pixels encoded by the
    frozen VAE inside the step (pixel path), never differentiated."""
    if "images" not in batch:
      return batch["image_tokens"]
    if self.vae is None:
      raise ValueError("the batch carries pixels (data.payload='images') but no VAE was given "
                       "(vae.checkpoint)")
    encode, vae_params = self.vae
    images = batch["images"]  # (B, N, H, W, C)
    b, n = images.shape[:2]
    toks = encode(vae_params, images.reshape((b * n,) + images.shape[2:]))  # (B*N, T, d)
    return jax.lax.stop_gradient(toks.reshape(b, n * toks.shape[1], toks.shape[2]))

  def grads(self, params: dict, batch: dict, key: jax.Array, base: dict | None = None) -> tuple[dict, dict]:
    """Gradients and metrics of the whole batch; with K accumulation steps (``config.batch_plan``), accumulated over K
    micro-batches under a scan (each micro-batch is every K-th row, so it stays on its devices).
    Losses are normalised by the whole batch's token counts, so K micro-batches give the update
    of one big batch."""
    k = self.grad_accum
    grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
    b = batch["tokens"].shape[0]
    if k == 1:
      (_, metrics), grads = grad_fn(params, batch, key, base=base)
      return grads, metrics
    normalizers = (jnp.sum(batch["targets"] != IGNORE).astype(jnp.float32),
                   jnp.sum(batch["fm_mask"]).astype(jnp.float32))
    micro = jax.tree.map(lambda x: x.reshape((b // k, k) + x.shape[1:]).swapaxes(0, 1), batch)
    rows = jnp.arange(b).reshape(b // k, k).T  # (K, B/K): global row ids of each micro-batch

    def body(acc, xs):
      mb, row_ids = xs
      (_, m), g = grad_fn(params, mb, key, row_ids, normalizers, base=base)
      return jax.tree.map(jnp.add, acc, (g, m)), None

    zero_g = jax.tree.map(jnp.zeros_like, params)
    zero_m = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), key, rows[0],
                                            normalizers, base=base)[0][1])
    zero_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_m)
    (grads, metrics), _ = jax.lax.scan(body, (zero_g, zero_m), (micro, rows))
    # Shares of loss/ce/fm add up; the token counts add up too.
    return grads, metrics

  def train_step(self, state: State, batch: dict) -> tuple[State, dict]:
    """One optimizer update. Non-finite loss or gradients skip the update (state unchanged except
    the ``skipped`` counter) instead of poisoning the weights."""
    key = jax.random.fold_in(jax.random.key(self.config.seed), state["step"])
    grads, metrics = self.grads(state["params"], batch, key, base=state.get("base"))
    loss = metrics["loss"]
    grad_norm = global_norm(grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    bad = (~finite).astype(jnp.int32)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "skipped": state["skipped"] + bad,
        "bad_streak": (state["bad_streak"] + bad) * bad,
    }
    if "base" in state:
      new_state["base"] = state["base"]
    if self.ema_decay > 0:
      d = self.ema_decay
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], new_state["params"])
      new_state["ema"] = keep(ema, state["ema"])
    metrics = dict(metrics, grad_norm=grad_norm, lr=self.schedule(state["step"]),
                   finite=finite.astype(jnp.float32))
    return new_state, metrics

  def eval_step(self, params: dict, batch: dict, base: dict | None = None) -> dict:
    """Loss metrics on a held-out batch with a fixed noise key (comparable across steps)."""
    _, metrics = self.loss_fn(params, batch, jax.random.key(self.config.seed + 1), base=base)
    return metrics

  def jit(self, fn: Callable, in_shardings: tuple, *, updates_state: bool) -> "UnderMesh":
    """`fn` jitted with these input shardings, traced and run under the mesh and activation rules.
    updates_state: `fn` returns (new state, metrics) and its first argument (the state) is donated;
    otherwise it returns metrics. Metrics come back replicated."""
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    if updates_state:
      jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=(self.state_shardings, replicated),
                       donate_argnums=(0,))
    else:
      jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=replicated)
    return UnderMesh(jitted, self.mesh, self.config.mesh.rules)

  @functools.cached_property
  def eval_fn(self) -> Callable:
    base = () if self.lora is None else (self.base_shardings,)
    return self.jit(self.eval_step, (self.param_shardings, self.batch_sharding) + base, updates_state=False)

  @functools.cached_property
  def step_fn(self) -> Callable:
    return self.jit(self.train_step, (self.state_shardings, self.batch_sharding), updates_state=True)


class UnderMesh:
  """A jitted function traced, lowered and called under ``jax.set_mesh(mesh)`` and the config's
  activation rules: activation sharding constraints (parallel.constrain) and splash attention's
  shard_map read both."""

  def __init__(self, fn: Callable, mesh, rules):
    self.fn, self.mesh, self.rules = fn, mesh, rules

  def __call__(self, *args):
    with jax.set_mesh(self.mesh), parallel.activation_rules(self.rules):
      return self.fn(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh), parallel.activation_rules(self.rules):
      return self.fn.lower(*args)


def global_norm(tree) -> jax.Array:
  """L2 norm over all leaves, accumulated in fp32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
