"""DPO for NextStep-1 (SPEC §7's last stage): Diffusion-DPO applied per image token.

  python -m nextstep_jax.dpo --config=configs/dpo.py [--config.dpo.data=DIR --config.x.y=...]

The paper gives DPO's schedule (300 steps, constant lr 2e-6 after 200 warm-up steps) but not its
loss for a continuous-token model. This module uses the Diffusion-DPO objective on the per-token
flow-matching errors:

  loss = -log sigmoid(-beta * [(l_w - l_w^ref) - (l_l - l_l^ref)])

where l_w, l_l are the flow-matching errors of the chosen (w) and rejected (l) image under the
policy, and l^ref the same under a frozen reference model (the SFT checkpoint). Every error is
computed with the *same* noise x0 and times t for policy and reference and for the two images of a
pair (the draw of image-token slot s of pair i is the same everywhere), so at step 0 (policy =
reference) the bracket is exactly 0 and the loss is log 2, and the bracket's noise partly cancels.

Per image, l is the *mean* over its image tokens (FM-masked slots) of each token's error, itself
the mean over the d token dims and the ``head.batch_mul`` (t, x0) draws, as in the training loss
(``dpo.reduction='mean'``, the default). Why averaged: each token's error is a one-draw estimate of
that token's flow-matching ELBO term, so the sum over an image's tokens (the exact form of the
autoregressive image's log-likelihood bound) grows with the image's token count (256..1024 in the
recipe), and so does the noise of the estimate; with the mean, beta * bracket keeps one scale at
every resolution, one beta serves all buckets, and the numbers read like the FM loss (the
Diffusion-DPO reference implementation averages its MSE over latent elements the same way, with a
correspondingly large beta). ``dpo.reduction='sum'`` gives the sum; for images of one size the two
differ only by beta's scale (beta_sum = beta_mean / tokens).

Pieces:
  fm_token_errors(model, batch, image_tokens, key, row_ids) -> (err (B, M), weight (B, M))
  image_errors(err, weight, reduction) -> (B,)
  dpo_loss(err_policy (P, 2), err_reference (P, 2), beta, ...) -> (loss, metrics)
  DPOTrainer(config, mesh, vae): the Trainer's state, shardings, optimizer and update (non-finite
    skip, EMA) with the DPO gradients; the reference is a second params tree with the policy's
    shardings, an argument of the jitted step (not donated, no gradients). With LoRA the frozen
    base is the reference (the adapters start at zero), so no second copy is held.
  train_dpo(config, workdir) -> last metrics: the loop (resume, checkpoints, held-out DPO metrics).
The preference data and the pair batches: ``data/preferences.py``; digit preference sets for the
demo: ``evaluation/preferences.py``.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nextstep_jax import config as config_lib
from nextstep_jax import parallel
from nextstep_jax import run as run_lib
from nextstep_jax.data.preferences import (PairBuilder, PreferenceIterator, PreferenceRecords, heldout_batches,
                                           pair_row_spec, split_file)
from nextstep_jax.models import nextstep as ns
from nextstep_jax.training import checkpoint as ckpt_lib
from nextstep_jax.training import metrics as metrics_lib
from nextstep_jax.training.loop import LoopControl, restore_or_init, start
from nextstep_jax.training.metrics import log
from nextstep_jax.training.trainer import Trainer, count_params

REDUCTIONS = ("mean", "sum")


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------

def fm_token_errors(model: ns.NextStep, batch: dict, image_tokens_bmd: jax.Array, key: jax.Array,
                    row_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per image-token flow-matching errors of one batch (the batch contract of batch.py).

  Returns (err (B, M), weight (B, M)), fp32: err[r, s] is the squared velocity error of buffer slot
  s of row r, averaged over the d token dims and the ``batch_mul`` (x0, t) draws; weight[r, s] is the
  slot's FM weight (fm_mask at its position; 0 for unused slots). The draws of row r come from
  ``fold_in(key, row_ids[r])`` (default r) exactly as in ``NextStep.loss``, so rows that share an id
  and a buffer size share their noise, and the weighted mean of err equals the model's FM loss.
  """
  h, img_tokens = model.hidden_states(batch, image_tokens_bmd)
  err, weight = model.fm_errors(h, img_tokens, batch, key, row_ids)
  return err.mean(axis=-1), weight


def image_errors(err_bm: jax.Array, weight_bm: jax.Array, reduction: str = "mean") -> jax.Array:
  """One flow-matching error per row (B,): the FM-weighted mean (or sum) over its image tokens."""
  total = jnp.sum(err_bm * weight_bm, axis=1)
  if reduction == "sum":
    return total
  if reduction != "mean":
    raise ValueError(f"dpo.reduction={reduction!r} is not one of {list(REDUCTIONS)}")
  return total / jnp.maximum(jnp.sum(weight_bm, axis=1), 1.0)


def dpo_loss(err_policy_p2: jax.Array, err_ref_p2: jax.Array, beta: float,
             valid_p: jax.Array | None = None, sft_weight: float = 0.0) -> tuple[jax.Array, dict]:
  """Diffusion-DPO on image flow-matching errors (P, 2) (column 0 chosen, 1 rejected).

  loss = mean_p -log sigmoid(-beta * [(l_w - l_w^ref) - (l_l - l_l^ref)]) (+ sft_weight * mean l_w,
  an optional pull towards the chosen images; 0 by default). The reference errors get no gradient.
  valid_p (P,) masks pairs out of the mean (e.g. padding). Metrics: reward_accuracy (pairs whose
  implicit reward -beta (l - l^ref) ranks the chosen image first), margin, the rewards and errors.
  """
  err_ref_p2 = jax.lax.stop_gradient(err_ref_p2)
  delta_p2 = err_policy_p2 - err_ref_p2
  bracket = delta_p2[:, 0] - delta_p2[:, 1]  # (P,)
  losses = -jax.nn.log_sigmoid(-beta * bracket)
  if valid_p is None:
    valid_p = jnp.ones_like(bracket)
  valid_p = valid_p.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(valid_p), 1.0)
  mean = lambda x: jnp.sum(x * valid_p) / n  # noqa: E731
  dpo = mean(losses)
  loss = dpo + sft_weight * mean(err_policy_p2[:, 0]) if sft_weight else dpo
  rewards = -beta * delta_p2
  metrics = {
      "loss": loss, "dpo_loss": dpo, "reward_accuracy": mean((bracket < 0).astype(jnp.float32)),
      "margin": mean(rewards[:, 0] - rewards[:, 1]),
      "reward_chosen": mean(rewards[:, 0]), "reward_rejected": mean(rewards[:, 1]),
      "fm_chosen": mean(err_policy_p2[:, 0]), "fm_rejected": mean(err_policy_p2[:, 1]),
      "ref_fm_chosen": mean(err_ref_p2[:, 0]), "ref_fm_rejected": mean(err_ref_p2[:, 1]),
      "pairs": jnp.sum(valid_p),
  }
  return loss, metrics


def pair_loss(policy: ns.NextStep, reference: ns.NextStep, batch: dict, image_tokens_bmd: jax.Array,
              key: jax.Array, beta: float, reduction: str = "mean", sft_weight: float = 0.0
              ) -> tuple[jax.Array, dict]:
  """DPO loss of an interleaved pair batch (rows 2i chosen, 2i + 1 rejected of pair i): policy and
  reference see the same noise, and so do the two images of a pair (row id = pair index)."""
  b = batch["tokens"].shape[0]
  if b % 2:
    raise ValueError(f"a DPO batch holds pairs of rows, got {b} rows")
  pair_ids = jnp.arange(b) // 2
  err_p, weight = fm_token_errors(policy, batch, image_tokens_bmd, key, pair_ids)
  err_r, _ = fm_token_errors(reference, batch, image_tokens_bmd, key, pair_ids)
  ell_p = image_errors(err_p, weight, reduction).reshape(b // 2, 2)
  ell_r = image_errors(err_r, weight, reduction).reshape(b // 2, 2)
  valid = jnp.all(jnp.sum(weight, axis=1).reshape(b // 2, 2) > 0, axis=1)
  return dpo_loss(ell_p, ell_r, beta, valid, sft_weight)


# ------------------------------------------------------------------------------------------------
# Preference records
# ------------------------------------------------------------------------------------------------


# The step
# ------------------------------------------------------------------------------------------------

def dpo_settings(config, for_training: bool = True) -> dict[str, Any]:
  """The ``config.dpo`` section, checked (errors name the field); `for_training` adds the checks of
  the run's input (a preference directory, the pixel payload)."""
  if "dpo" not in config:
    raise config_lib.ConfigError("config has no 'dpo' section (see configs/dpo.py)")
  d = config.dpo
  errors = []
  missing = [f"dpo.{k}" for k in config_lib.dpo_section() if k not in d]
  if missing:
    raise config_lib.ConfigError("the dpo section is missing fields: " + ", ".join(missing) +
                                 " (build it with nextstep_jax.config.dpo_section)")
  beta = d.beta
  if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
    errors.append(f"dpo.beta={beta!r} must be a positive number")
  if d.reduction not in REDUCTIONS:
    errors.append(f"dpo.reduction={d.reduction!r} is not one of {list(REDUCTIONS)}")
  sw = d.sft_weight
  if not isinstance(sw, (int, float)) or sw < 0:
    errors.append(f"dpo.sft_weight={sw!r} must be >= 0")
  if for_training and not d.data:
    errors.append("dpo.data is empty: a preference directory with train.jsonl (see nextstep_jax/dpo.py)")
  if for_training and config.data.payload != "images":
    errors.append(f"data.payload={config.data.payload!r}: DPO reads preference images as pixels and encodes "
                  "them with the frozen VAE inside the step; set data.payload='images' and vae.checkpoint")
  if int(config.optim.grad_accum) != 1:
    errors.append(f"optim.grad_accum={config.optim.grad_accum}: the DPO step does not accumulate; use 1")
  if errors:
    raise config_lib.ConfigError("invalid DPO config:\n  " + "\n  ".join(errors))
  return {"beta": float(beta), "reduction": str(d.reduction), "sft_weight": float(sw),
          "data": str(d.data), "reference": str(d.reference or ""), "heldout_batches": int(d.heldout_batches)}


class DPOTrainer(Trainer):
  """training.trainer.Trainer with DPO gradients: same state (params, optimizer, step, EMA, LoRA base), same
  shardings, same update with its non-finite skip; the jitted step takes the reference params as a
  second argument, sharded like the policy, never donated and never differentiated."""

  def __init__(self, config, mesh, vae=None):
    super().__init__(config, mesh, vae)
    self.dpo = dpo_settings(config, for_training=False)
    # With LoRA the frozen base (state["base"]) is the reference; no separate tree is passed.
    self.ref_shardings = self.param_shardings if self.lora is None else None

  def dpo_terms(self, params: dict, ref: dict | None, batch: dict, key: jax.Array,
                base: dict | None = None) -> tuple[jax.Array, dict]:
    """(loss, metrics) of a pair batch for policy `params` against the reference."""
    policy = nnx.merge(self.graphdef, self.model_params(params, base, self.compute_dtype))
    ref_params = ref if self.lora is None else base
    if ref_params is None:
      raise ValueError("DPO needs reference params (or, with LoRA, the frozen base)")
    reference = nnx.merge(self.graphdef, jax.lax.stop_gradient(ref_params))
    s = self.dpo
    return pair_loss(policy, reference, batch, self.image_tokens(batch), key, s["beta"], s["reduction"],
                     s["sft_weight"])

  def grads(self, params: dict, batch: dict, key: jax.Array, base: dict | None = None) -> tuple[dict, dict]:
    """Trainer.train_step's hook: `batch` here is {"pairs": pair batch, "ref": reference params}."""
    grad_fn = jax.value_and_grad(self.dpo_terms, has_aux=True)
    (_, metrics), grads = grad_fn(params, batch["ref"], batch["pairs"], key, base)
    return grads, metrics

  def dpo_step(self, state: dict, ref: dict | None, batch: dict) -> tuple[dict, dict]:
    """One DPO update (Trainer.train_step with the DPO gradients)."""
    return self.train_step(state, {"pairs": batch, "ref": ref})

  @functools.cached_property
  def dpo_step_fn(self) -> Callable:
    return self.jit(self.dpo_step, (self.state_shardings, self.ref_shardings, self.batch_sharding),
                    updates_state=True)

  def dpo_eval(self, params: dict, ref: dict | None, batch: dict, base: dict | None = None) -> dict:
    """DPO metrics of a held-out pair batch with a fixed noise key (comparable across steps)."""
    _, metrics = self.dpo_terms(params, ref, batch, jax.random.key(self.config.seed + 1), base)
    return metrics

  @functools.cached_property
  def dpo_eval_fn(self) -> Callable:
    base = None if self.lora is None else self.base_shardings
    return self.jit(self.dpo_eval, (self.param_shardings, self.ref_shardings, self.batch_sharding, base),
                    updates_state=False)

  def load_reference(self, path: str) -> dict | None:
    """The reference params from a checkpoint (directory or step), restored into the policy's
    shardings; None with LoRA (the base is the reference)."""
    if self.lora is not None:
      return None
    target = parallel.with_shardings(self.abstract_params, self.param_shardings)
    return ckpt_lib.restore_params_step(path, target, what="dpo.reference")[1]


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def train_dpo(config, workdir: str | None = None) -> dict[str, float]:
  """Runs (or resumes) DPO to ``config.steps``. Returns the last logged metrics ({} when a stop came
  before the first step).

  The policy starts from ``checkpoint.init_from`` (the SFT checkpoint); the reference is
  ``dpo.reference`` (default: the same checkpoint), loaded again on resume (it is not part of the
  saved state). Checkpoints hold the Trainer's state and the preference iterator's state.
  As train: the stop signal, the workdir lock and the architecture check from ``start`` on."""
  settings = dpo_settings(config)
  with start(config, workdir) as run:
    workdir, mesh = run.workdir, run.mesh
    pidx, pcount = jax.process_index(), jax.process_count()
    if config.data.batch_size % pcount:
      raise config_lib.ConfigError(f"data.batch_size={config.data.batch_size} pairs is not divisible by the "
                                   f"{pcount} processes")

    tokenizer = run_lib.load_tokenizer(config, workdir, build=True)
    spec = pair_row_spec(config, tokenizer.pad_id)
    unit = int(config.image.vae_factor) * int(config.image.patch_size)
    builder = PairBuilder(tokenizer, spec, unit)
    records = PreferenceRecords(settings["data"], "train")
    data_iter = PreferenceIterator(records, builder, config.data.batch_size, seed=int(config.data.seed),
                                   process_index=pidx, process_count=pcount)
    heldout = None
    if os.path.isfile(split_file(settings["data"], "heldout")) and settings["heldout_batches"] > 0:
      heldout = heldout_batches(PreferenceRecords(settings["data"], "heldout"), builder, config.data.batch_size,
                                settings["heldout_batches"], pidx, pcount)
    log(f"preference pairs: {len(records)} (train), {0 if heldout is None else len(heldout)} held-out batches")
    run.check_stop()

    trainer = DPOTrainer(config, mesh, vae=run_lib.vae_encoder(config))
    log(f"parameters: {count_params(trainer.abstract_params):,}, beta {settings['beta']}, "
        f"reduction {settings['reduction']}")
    init_from = config.checkpoint.init_from
    ref_path = settings["reference"] or init_from
    if not ref_path and trainer.lora is None:
      raise config_lib.ConfigError("DPO needs a reference: set checkpoint.init_from (the SFT checkpoint) or "
                                   "dpo.reference")
    run.check_stop()
    ckpt = ckpt_lib.Checkpointer.from_config(config, os.path.join(workdir, run_lib.CHECKPOINTS),
                                             replica=run.mirror)
    with LoopControl(config, ckpt, run.stop) as control:
      # As in train: resume, else the policy from init_from (with LoRA the frozen base; fresh adapters).
      state = restore_or_init(trainer, ckpt, data_iter, init_from=init_from,
                              required="DPO starts from a trained model: set checkpoint.init_from (the SFT "
                                       "checkpoint)", what="policy", stop=run.stop)
      ref = trainer.load_reference(ref_path) if trainer.lora is None else None
      if ref is not None:
        log(f"reference from {ref_path}")
      step = int(state["step"])
      run.check_stop()  # before the first step

      writer = control.open_writer(workdir, pidx, config.log_every)
      timer = metrics_lib.StepTimer()
      last: dict[str, float] = {}
      while step < config.steps:
        batch = parallel.global_batch(next(data_iter), mesh)
        state, metrics = trainer.dpo_step_fn(state, ref, batch)
        step += 1
        streak = control.check_streak(step, state)
        if step % config.log_every == 0 or step == config.steps:
          last = {k: float(v) for k, v in jax.device_get(metrics).items()}
          last.update(timer.lap(config.log_every, config.log_every * 2 * config.data.batch_size * config.data.seq_len))
          last["skipped_steps"] = float(state["skipped"])
          for k, v in data_iter.counters.items():
            last[f"data/{k}"] = float(v)
          writer.write_scalars(step, last)
        if heldout and config.eval_every and (step % config.eval_every == 0 or step == config.steps):
          writer.write_scalars(step, evaluate_heldout(trainer, state, ref, heldout, mesh))
        if control.save_or_stop(step, state, streak, data_iter.get_state):
          break
    return last
  return {}  # a stop before the first step (the session logged it)


def evaluate_heldout(trainer: DPOTrainer, state: dict, ref: dict | None, batches: list[dict], mesh
                     ) -> dict[str, float]:
  """DPO metrics averaged over the fixed held-out pair batches ("eval/<metric>")."""
  sums: dict[str, float] = {}
  for b in batches:
    m = jax.device_get(trainer.dpo_eval_fn(state["params"], ref, parallel.global_batch(b, mesh),
                                           state.get("base")))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
  return {f"eval/{k}": v for k, v in sums.items()}
