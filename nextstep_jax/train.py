"""Train NextStep-1: ``python -m nextstep_jax.train --config=configs/<stage>.py [--config.x.y=...]``.

Reads top to bottom:
  1. parallel: jax.distributed (multi-host), the (data, fsdp, tensor) mesh, the logical rules;
  2. data: the tokenizer and the grain mixture of text / pair / edit / interleaved sources;
  3. model: built abstractly (eval_shape), its shardings derived from the parameters' logical axes,
     then materialised sharded (or restored, or initialised from another stage's checkpoint);
  4. step: a pure ``train_step(state, batch) -> (state, metrics)`` under jax.jit with explicit in/out
     shardings and the state donated; the frozen VAE encodes pixels inside the step when the batch
     carries images;
  5. checkpoints: orbax, async, keep-N, with the data iterator's state; resume is exact;
  6. the loop: metrics to TensorBoard, metrics.jsonl and the console.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nextstep_jax import checkpoint as ckpt_lib
from nextstep_jax import config as config_lib
from nextstep_jax import flops as flops_lib
from nextstep_jax import lora as lora_lib
from nextstep_jax import mesh_hybrid
from nextstep_jax import metrics as metrics_lib
from nextstep_jax import optim as optim_lib
from nextstep_jax import parallel
from nextstep_jax.models import layers as layers_lib
from nextstep_jax.models import nextstep as ns

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
    self.ema_decay = float(config.get("ema_decay", 0.0))
    self.grad_accum = int(config.optim.get("grad_accum", 1))
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
    """Gradients and metrics of the whole batch; with ``optim.grad_accum`` = K, accumulated over K
    micro-batches under a scan (each micro-batch is every K-th row, so it stays on its devices).
    Losses are normalised by the whole batch's token counts, so K micro-batches give the update
    of one big batch."""
    k = self.grad_accum
    grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
    b = batch["tokens"].shape[0]
    if k == 1:
      (_, metrics), grads = grad_fn(params, batch, key, base=base)
      return grads, metrics
    from nextstep_jax.data.batch import IGNORE  # pylint: disable=import-outside-toplevel
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


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def load_frozen_vae(config) -> tuple[Callable, Any] | None:
  """(encode(vae_params, images) -> tokens, vae_params) for the pixel path; None for latents."""
  if config.data.payload != "images":
    return None
  from nextstep_jax import latents  # pylint: disable=import-outside-toplevel
  from nextstep_jax import train_vae  # pylint: disable=import-outside-toplevel
  if not config.vae.checkpoint:
    raise ValueError("data.payload='images' needs vae.checkpoint: the workdir of a trained VAE "
                     "(python -m nextstep_jax.train_vae) to encode pixels inside the step")
  vae, vae_cfg = train_vae.load_vae(config.vae.checkpoint)
  want = int(config.image.token_dim)
  if vae_cfg.token_dim != want or vae_cfg.patch_size != config.image.patch_size:
    raise ValueError(f"vae.checkpoint {config.vae.checkpoint}: the VAE makes {vae_cfg.token_dim}-d tokens with "
                     f"patch {vae_cfg.patch_size}, the config expects image.token_dim={want} with "
                     f"patch {config.image.patch_size}")
  graphdef, vae_params = nnx.split(vae)
  encode = lambda p, images: latents.encode_tokens(nnx.merge(graphdef, p), images)
  return encode, vae_params


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def train(config, workdir: str | None = None) -> dict[str, float]:
  """Runs (or resumes) training to ``config.steps``. Returns the last logged metrics."""
  from nextstep_jax.data import mixture  # pylint: disable=import-outside-toplevel

  # 1. parallel
  parallel.maybe_initialize_distributed()
  workdir = workdir or config.workdir
  config_lib.validate(config, num_devices=jax.device_count(), num_granules=mesh_hybrid.num_granules())
  mesh = mesh_hybrid.make_hybrid_mesh(config.mesh)
  pidx, pcount = jax.process_index(), jax.process_count()
  os.makedirs(workdir, exist_ok=True)
  _log(f"devices {jax.device_count()} ({jax.default_backend()}), processes {pcount}, mesh {dict(mesh.shape)}")

  # 2. data
  tokenizer = load_tokenizer(config, workdir)
  data_iter = mixture.build_train_iterator(config, tokenizer, pidx, pcount)

  # 3. model, state, checkpoints
  trainer = Trainer(config, mesh, vae=load_frozen_vae(config))
  _log(f"parameters: {count_params(trainer.abstract_params):,}")
  ckpt = ckpt_lib.Checkpointer.from_config(config, os.path.join(workdir, "checkpoints"))
  # The newest step that passes its integrity check and reads back; unreadable newer steps are
  # named in a warning and moved aside (never deleted).
  restored = ckpt.restore_latest_good(parallel.with_shardings(trainer.abstract_state,
                                                              trainer.state_shardings))
  if restored is not None:
    start, state, data_state = restored
    if data_state is not None:
      data_iter.set_state(data_state)
    _log(f"resumed from step {start}")
  elif config.checkpoint.init_from:
    target = parallel.with_shardings(trainer.abstract_params, trainer.param_shardings)
    params = ckpt.restore_params_from(config.checkpoint.init_from, target)
    state = trainer.state_from_params(params)
    _log(f"initialised params from {config.checkpoint.init_from}")
  else:
    state = trainer.init_state(config.seed)
  step = int(state["step"])

  # 4-6. the loop
  writer = metrics_lib.MetricsWriter(workdir, pidx, console_every=config.log_every)
  timer = metrics_lib.StepTimer()
  tokens_per_step = config.data.batch_size * config.data.seq_len
  flops_per_step = flops_lib.step_flops(config)
  device_kind = jax.devices()[0].device_kind
  eval_batches = None
  profile = _profile_range(config.get("profile_steps", ""))
  control = LoopControl(config, ckpt)
  last: dict[str, float] = {}
  data_wait = 0.0
  try:
    while step < config.steps:
      if profile and step == profile[0]:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
      t0 = time.perf_counter()
      local = next(data_iter)
      data_wait += time.perf_counter() - t0
      batch = parallel.global_batch(local, mesh)
      state, metrics = trainer.step_fn(state, batch)
      step += 1
      if profile and step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        _log(f"profile of steps {profile[0]}..{profile[1]} written to {workdir}/profile")
      streak = control.check_streak(step, state)
      if step % config.log_every == 0 or step == config.steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last.update(timer.lap(config.log_every, config.log_every * tokens_per_step))
        if last.get("step_time", 0.0) > 0:
          last["tflops_per_device"] = flops_lib.tflops_per_device(flops_per_step, last["step_time"],
                                                                  jax.device_count())
          mfu = flops_lib.mfu(flops_per_step, last["step_time"], jax.device_count(), device_kind)
          if mfu is not None:
            last["mfu"] = mfu
        last["data_wait_s"] = data_wait / config.log_every
        last["compute_s"] = last.get("step_time", 0.0) - last["data_wait_s"]
        last["skipped_steps"] = float(state["skipped"])
        data_wait = 0.0
        for k, v in data_iter.counters.items():
          if k.startswith("skipped") or k.startswith("converted"):
            last[f"data/{k}"] = float(v)
        writer.write_scalars(step, last)
      if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
        if eval_batches is None:
          eval_batches = mixture.build_eval_batches(config, tokenizer, int(config.get("eval_batches", 2)))
        evals = evaluate_heldout(trainer, state, eval_batches, mesh)
        writer.write_scalars(step, evals)
        if config.get("sample_prompts", ()) and trainer.vae is not None:
          grid = sample_grid(trainer, state, config, tokenizer)
          writer.write_images(step, "samples", grid)
      if control.save_or_stop(step, state, streak, data_iter.get_state):
        break
  finally:
    control.close()
    writer.close()
  return last


def load_tokenizer(config, workdir: str):
  """``tokenizer.path`` (sentencepiece or tokenizer.json), or the demo tokenizer built in `workdir`;
  checked against the model's vocabulary."""
  from nextstep_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  if config.tokenizer.path:
    tokenizer = tok_lib.load_tokenizer(config.tokenizer.path, config.tokenizer.kind)
  else:
    tokenizer = tok_lib.build_demo_tokenizer(workdir, vocab_size=int(config.tokenizer.vocab_size))
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
                     f"{config.model.vocab_size}")
  return tokenizer


class LoopControl:
  """The end of every step of a training loop (train.train, dpo.train_dpo): the check on runs of
  non-finite steps, the periodic, final and on-signal saves, and the stop on SIGTERM or preemption."""

  def __init__(self, config, ckpt: ckpt_lib.Checkpointer):
    self.ckpt = ckpt
    self.final_step = int(config.steps)
    self.max_bad = int(config.get("max_skipped_steps", 10))
    self.stop = _StopSignal()

  def check_streak(self, step: int, state: State) -> int:
    """The current run of skipped (non-finite) updates; raises once it reaches max_skipped_steps."""
    streak = int(state["bad_streak"])
    if streak:
      _log(f"step {step}: non-finite loss or gradients, update skipped ({streak} in a row)")
      if streak >= self.max_bad:
        raise FloatingPointError(
            f"{streak} consecutive non-finite steps (max_skipped_steps={self.max_bad}) at step {step}; "
            f"stopping. The last good checkpoint is step {self.ckpt.latest_step()} in {self.ckpt.directory}")
    return streak

  def save_or_stop(self, step: int, state: State, streak: int, data_state: Callable[[], Any]) -> bool:
    """Saves when due; True when the loop must end now (a stop was requested, or preemption)."""
    ckpt, stop, final = self.ckpt, self.stop, step == self.final_step
    # No periodic save inside a run of skipped steps: retention must not push out the last
    # checkpoint written before it (a SIGTERM still saves: skipped steps leave params unchanged).
    if (not streak and (ckpt.should_save(step) or final)) or stop.requested:
      ckpt.save(step, state, data_state(), force=final or stop.requested)
    if stop.requested or ckpt.reached_preemption(step):
      ckpt.wait()
      _log(f"stop requested ({stop.reason or 'preemption'}): saved step {step}, exiting")
      return True
    return False

  def close(self) -> None:
    self.stop.restore()
    self.ckpt.wait()
    self.ckpt.close()


class _StopSignal:
  """SIGTERM (a preemption notice) or SIGINT asks the loop to save the current step and exit 0."""

  def __init__(self):
    import signal  # pylint: disable=import-outside-toplevel
    self.requested = False
    self.reason = ""
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass

  def _handle(self, signum, frame):
    del frame
    import signal  # pylint: disable=import-outside-toplevel
    self.requested = True
    self.reason = signal.Signals(signum).name

  def restore(self):
    import signal  # pylint: disable=import-outside-toplevel
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _profile_range(spec: str) -> tuple[int, int] | None:
  if not spec:
    return None
  lo, hi = (int(x) for x in str(spec).split(","))
  return lo, hi


def evaluate_heldout(trainer: Trainer, state: State, eval_batches: dict, mesh) -> dict[str, float]:
  """CE and FM on the fixed held-out batches of each source (averaged over its batches)."""
  out: dict[str, float] = {}
  for name, batches in eval_batches.items():
    sums: dict[str, float] = {}
    for b in batches:
      base = (state["base"],) if "base" in state else ()
      m = jax.device_get(trainer.eval_fn(state["params"], parallel.global_batch(b, mesh), *base))
      for k in ("loss", "ce", "fm"):
        sums[k] = sums.get(k, 0.0) + float(m[k]) / len(batches)
    for k, v in sums.items():
      out[f"eval/{name}/{k}"] = v
  return out


def sample_grid(trainer: Trainer, state: State, config, tokenizer) -> np.ndarray:
  """Decoded samples of the config's fixed prompts as one uint8 grid (one image per prompt)."""
  from nextstep_jax import latents, sampling  # pylint: disable=import-outside-toplevel
  from nextstep_jax import train_vae  # pylint: disable=import-outside-toplevel
  params = state.get("ema", state["params"])
  if trainer.lora is not None:
    params = lora_lib.merge_lora(state["base"], params, trainer.lora)
  model = nnx.merge(trainer.graphdef, jax.device_get(params))
  side = config.data.image_size // (config.image.vae_factor * config.image.patch_size)
  cond, neg = sampling.image_prompts(tokenizer, list(config.sample_prompts), side, side)
  tokens = sampling.sample_images(model, cond, neg, side, side, jax.random.key(config.seed),
                                  cfg=float(config.get("sample_cfg", 3.0)), steps=20, pad_id=tokenizer.pad_id)
  vae, _ = train_vae.load_vae(config.vae.checkpoint)
  images = latents.decode_tokens(vae, tokens, side, side)
  images = np.clip((np.asarray(images) + 1.0) * 127.5, 0, 255).astype(np.uint8)
  return metrics_lib.image_grid(images)


def main(argv) -> None:
  del argv
  from absl import flags, logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  config = flags.FLAGS.config
  try:
    train(config, flags.FLAGS.workdir or None)
  except Exception:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    # Multi-process: a normal exit waits at jax.distributed's shutdown barrier for every other
    # process, dead ones included (until the heartbeat timeout). Print the error and leave now.
    import sys  # pylint: disable=import-outside-toplevel
    import traceback  # pylint: disable=import-outside-toplevel
    traceback.print_exc()
    print(f"process {jax.process_index()}: training failed (see above; when another process died, "
          "this is the collective or barrier that lost it); exiting without waiting for the "
          "other processes", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/<name>.py)",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "", "output directory (default: config.workdir)")
  flags.mark_flags_as_required(["config"])
  app.run(main)
