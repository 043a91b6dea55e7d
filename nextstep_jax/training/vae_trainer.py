"""The image tokenizer's trainer: the FLUX-layout KL-VAE with NextStep's token norm, then its evaluation.

``train_and_evaluate(config, workdir)`` reads top to bottom: config check -> data (embedded digits or a
folder of images, ``data/images.py``) -> mesh (one 'data' axis over all devices; batch sharded,
parameters replicated) -> model and AdamW (``training/optim.py``) -> resume from the newest good
checkpoint in ``<workdir>/checkpoints`` -> loop (jitted step; TensorBoard + console + JSONL; reconstruction
grids as PNG under ``<workdir>/images``; checkpoints every ``checkpoint.every`` steps, keeping
``checkpoint.keep``). The config schema: ``config.vae_base_config`` (``steps``, ``optim.*``,
``checkpoint.*`` and ``data.batch_size`` as in the transformer's; ``train.*`` the loss) -> held-out PSNR/SSIM to ``<workdir>/vae_eval.json`` -> FLUX-named safetensors export
in ``<workdir>/export`` (``interop.vae.export_vae``). ``run.load_vae`` reads the result.

The loss (SPEC §8): x -> encoder -> (mean, logvar) -> token-wise norm of the mean -> sample
(or mean with ``sample_posterior=False``) -> + per-sample noise, std ~ U(0, gamma), when
``noise_aug`` -> decoder -> l1_weight * |x - y| + l2_weight * (x - y)^2 (means over pixels) +
kl_weight * KL (mean over latent elements) [+ adv_weight * hinge GAN generator loss].

Perceptual and adversarial terms: an adversarial term needs no pretrained weights (the
PatchGAN discriminator, ``models/discriminator.py``, trains from scratch), so it is available
(``adv_weight`` > 0, from step ``adv_start``; fixed weight, no adaptive balancing). An LPIPS perceptual
term needs pretrained VGG/AlexNet and LPIPS calibration weights, which cannot be downloaded here, so
``perceptual_weight`` must stay 0 (the config check says so).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nextstep_jax import config as config_lib
from nextstep_jax import run as run_lib
from nextstep_jax import storage
from nextstep_jax.batch import padded_chunks
from nextstep_jax.data.images import batch_indices, load_images
from nextstep_jax.evaluation import image_metrics
from nextstep_jax.interop.vae import export_vae
from nextstep_jax.models import vae as vae_lib
from nextstep_jax.models.discriminator import PatchDiscriminator
from nextstep_jax.models.vae import AutoencoderKL, VAEConfig
from nextstep_jax.training import optim as optim_lib
from nextstep_jax.training.checkpoint import Checkpointer, config_to_json
from nextstep_jax.training.loop import MIRROR_PRIVATE, Session
from nextstep_jax.data.images import recon_grid
from nextstep_jax.training.metrics import MetricsWriter, log

EVAL_FILE = "vae_eval.json"
# XLA's RngBitGenerator: compiles in a fraction of threefry's time on CPU (init of the demo VAE
# 5 s instead of 25 s on 2 cores); streams are deterministic per backend, not across backends.
RNG_IMPL = "rbg"
VAE_CONFIG_FILE = run_lib.VAE_CONFIG_FILE
EXPORT_DIR = run_lib.VAE_EXPORT_DIR
# The fields that shape the VAE's parameters: checkpoints of one are not resumed with another.
VAE_ARCHITECTURE_FIELDS = tuple(f"vae.{k}" for k in (
  "in_channels", "out_channels", "base_channels", "channel_mults", "num_res_blocks", "latent_channels",
  "mid_attention"))


# ------------------------------------------------------------------------------------------------
# The step.


def latent_noise(z_bhwc: jax.Array, key: jax.Array, gamma: float) -> jax.Array:
  """z + sigma_b * N(0, I) with one sigma_b ~ U(0, gamma) per sample (NextStep's noise
  augmentation of the normalised latent, SPEC §8)."""
  k_std, k_noise = jax.random.split(key)
  std_b = jax.random.uniform(k_std, (z_bhwc.shape[0], 1, 1, 1), z_bhwc.dtype, 0.0, gamma)
  return z_bhwc + std_b * jax.random.normal(k_noise, z_bhwc.shape, z_bhwc.dtype)


def reconstruct(vae: AutoencoderKL, x: jax.Array, key: jax.Array, train: ml_collections.ConfigDict):
  """Forward pass of training: (reconstruction, mean, logvar)."""
  mean, logvar = vae.encode_moments(x)
  k_post, k_noise = jax.random.split(key)
  z = vae_lib.sample_posterior(mean, logvar, k_post) if train.sample_posterior else mean
  if train.noise_aug and train.gamma > 0:
    z = latent_noise(z, k_noise, train.gamma)
  return vae.decode(z), mean, logvar


class VAETrainer:
  """Holds the graphdefs, optimizers, shardings and the jitted step of one run."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh
    self.vae_cfg = VAEConfig.from_dict(config.vae.to_dict())
    t = config.train
    self.use_adv = t.adv_weight > 0
    abstract = vae_lib.abstract_vae(self.vae_cfg)
    self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    self.abstract_params = nnx.to_pure_dict(abstract_params)
    self.tx, self.schedule = optim_lib.make_optimizer(config.optim, config.steps)
    if self.use_adv:
      d = nnx.eval_shape(lambda: PatchDiscriminator(3, t.disc_channels, rngs=nnx.Rngs(0)))
      self.disc_graphdef, _ = nnx.split(d, nnx.Param)
      self.disc_tx = optax.adam(t.disc_lr, b1=0.5, b2=0.9)
    self.replicated = NamedSharding(mesh, P())
    self.data_sharding = NamedSharding(mesh, P("data"))
    self.abstract_state = jax.eval_shape(lambda: self._init(0))
    self.state_sharding = jax.tree.map(lambda _: self.replicated, self.abstract_state)
    self._step = jax.jit(self._train_step, in_shardings=(self.state_sharding, self.data_sharding),
                         out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
    self._recon = jax.jit(self._reconstruct_mean,
                          in_shardings=(self.state_sharding["params"], self.data_sharding),
                          out_shardings=self.data_sharding)

  def _init(self, seed: int) -> dict[str, Any]:
    vae = AutoencoderKL(self.vae_cfg, rngs=nnx.Rngs(jax.random.key(seed, impl=RNG_IMPL)))
    params = nnx.to_pure_dict(nnx.state(vae, nnx.Param))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}
    if self.use_adv:
      disc = PatchDiscriminator(3, self.config.train.disc_channels,
                                rngs=nnx.Rngs(jax.random.key(seed + 1, impl=RNG_IMPL)))
      dp = nnx.to_pure_dict(nnx.state(disc, nnx.Param))
      state["disc_params"] = dp
      state["disc_opt_state"] = self.disc_tx.init(dp)
    return state

  def init_state(self, seed: int) -> dict[str, Any]:
    return jax.jit(lambda: self._init(seed), out_shardings=self.state_sharding)()

  def _train_step(self, state: dict[str, Any], x: jax.Array):
    t = self.config.train
    step = state["step"]
    key = jax.random.fold_in(jax.random.key(self.config.seed, impl=RNG_IMPL), step)
    adv_on = (step >= t.adv_start).astype(jnp.float32)

    def loss_fn(params):
      vae = nnx.merge(self.graphdef, params)
      y, mean, logvar = reconstruct(vae, x, key, t)
      l1 = jnp.mean(jnp.abs(y - x))
      l2 = jnp.mean(jnp.square(y - x))
      kl = vae_lib.kl_divergence(mean, logvar)
      loss = t.l1_weight * l1 + t.l2_weight * l2 + t.kl_weight * kl
      aux = {"l1": l1, "l2": l2, "kl": kl,
             "post_std": jnp.mean(jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)))}
      if self.use_adv:
        disc = nnx.merge(self.disc_graphdef, state["disc_params"])
        g_loss = -jnp.mean(disc(y))
        loss = loss + adv_on * t.adv_weight * g_loss
        aux["g_loss"] = g_loss
      aux["recon_psnr"] = jnp.mean(image_metrics.psnr(image_metrics.to_unit(x),
                                                       image_metrics.to_unit(y)))
      return loss, (aux, y)

    (loss, (aux, y)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    new = dict(state, step=step + 1, params=optax.apply_updates(state["params"], updates),
               opt_state=opt_state)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, lr=self.schedule(step))
    if self.use_adv:
      y = jax.lax.stop_gradient(y)

      def d_loss_fn(dp):
        disc = nnx.merge(self.disc_graphdef, dp)
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - disc(x))) + jnp.mean(jax.nn.relu(1.0 + disc(y))))

      d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state["disc_params"])
      d_grads = jax.tree.map(lambda g: g * adv_on, d_grads)
      d_updates, d_opt = self.disc_tx.update(d_grads, state["disc_opt_state"], state["disc_params"])
      new["disc_params"] = optax.apply_updates(state["disc_params"], d_updates)
      new["disc_opt_state"] = d_opt
      metrics["d_loss"] = d_loss
    return new, metrics

  def _reconstruct_mean(self, params, x):
    vae = nnx.merge(self.graphdef, params)
    return vae.decode(vae.encode(x, sample=False))

  def global_batch(self, x_local: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(self.data_sharding, x_local)

  def step(self, state, x: np.ndarray):
    return self._step(state, self.global_batch(x))

  def reconstruct(self, params, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean-latent reconstructions of ``images`` (padded to whole, device-divisible batches)."""
    n_dev = self.mesh.devices.size
    bs = int(math.ceil(batch_size / n_dev) * n_dev)
    out = [np.asarray(jax.device_get(self._recon(params, jax.device_put(chunk, self.data_sharding))))[:real]
           for real, chunk in padded_chunks(images, bs)]
    return np.concatenate(out)


def make_mesh() -> jax.sharding.Mesh:
  """One 'data' axis over every device."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))



def _write_atomic(path: str, text: str) -> None:
  """`text` into `path` through a file aside and a rename (a reader never sees half of it)."""
  tmp = path + ".partial"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None
                       ) -> dict[str, Any]:
  """Trains (resuming from ``<workdir>/checkpoints``) and evaluates; returns the final metrics.

  Writes into ``workdir`` (default ``config.workdir``): ``config.json``, ``vae_config.json``,
  ``checkpoints/``, ``tensorboard/``, ``metrics.jsonl``, ``images/recon_*.png``,
  ``vae_eval.json`` and ``export/`` (FLUX-named safetensors + config.json). A ``workdir`` URL (gs://, s3://;
  one-process runs) is written in its local mirror and uploaded (``loop.Session.local_workdir``); a
  ``data.source`` URL is an image folder staged into this host's cache (``storage.local_input``).
  As the transformer's trainer (``loop.Session``): SIGINT / SIGTERM end the run cleanly at any
  moment (the current step saved; before the first step nothing), a second writer of the same
  workdir is refused, and so is a ``vae.*`` architecture other than the one its checkpoints have;
  the configs are written once the restore or init succeeded. A stopped run returns
  ``{"stopped": "SIGINT", ...}`` without the evaluation and export.
  """
  workdir = workdir or config.workdir
  if not workdir:
    raise ValueError("no workdir: pass workdir= or set config.workdir (--workdir on the CLI)")
  with Session() as run:  # the stop-signal handler first
    vae_cfg = config_lib.validate_vae(config, jax.device_count())
    t = config.train
    # A URL (gs://, s3://...): the run writes its local mirror, uploaded as the transformer's is.
    workdir = run.local_workdir(workdir, private=MIRROR_PRIVATE + ("*.partial",))
    os.makedirs(workdir, exist_ok=True)
    run.guard(workdir, config, VAE_ARCHITECTURE_FIELDS,
              saved_files=(os.path.join(run_lib.CHECKPOINTS, run_lib.CONFIG_FILE), run_lib.CONFIG_FILE))

    # Data: every process holds the (small) dataset and takes its rows of each global batch.
    source = str(config.data.source)
    if storage.is_remote(source):  # the image folder copied into this host's cache once, read from there
      source = storage.local_input(source, "data.source")
    train_x, _ = load_images(source, "train", config.data.image_size, config.data.heldout_every)
    heldout_x, _ = load_images(source, "heldout", config.data.image_size, config.data.heldout_every)
    vae_lib.validate_images(train_x, vae_cfg, vae_cfg.pixels_per_token, "training images")
    vae_lib.validate_images(heldout_x, vae_cfg, vae_cfg.pixels_per_token, "held-out images")
    if config.eval.num_images:
      heldout_x = heldout_x[:config.eval.num_images]
    # spread over the held-out set (it is sorted by label for the digits)
    grid_x = heldout_x[np.linspace(0, len(heldout_x) - 1, min(config.eval.grid_images,
                                                               len(heldout_x))).astype(int)]
    n_proc, pid = jax.process_count(), jax.process_index()
    local_bs = config.data.batch_size // n_proc
    run.check_stop()

    mesh = make_mesh()
    trainer = VAETrainer(config, mesh)
    log(f"VAE {vae_cfg.to_dict()}: {sum(int(np.prod(s.shape)) for s in jax.tree.leaves(trainer.abstract_params)):,} "
         f"parameters; {len(train_x)} train / {len(heldout_x)} held-out images; mesh {dict(mesh.shape)}")
    run.check_stop()

    ckpt = Checkpointer.from_config(config, os.path.join(workdir, run_lib.CHECKPOINTS), replica=run.mirror)
    writer = None
    try:
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              trainer.abstract_state, trainer.state_sharding)
      restored = ckpt.restore_latest_good(abstract)  # newest readable step (corrupt ones set aside)
      if restored is not None:
        start, state, _ = restored
        log(f"resumed from step {start}")
      else:
        state, start = trainer.init_state(config.seed), 0
      run.check_stop()  # a stop during the restore or init (its compilation): nothing is written
      # The configs, once the restore or init succeeded.
      ckpt.write_config()
      if jax.process_index() == 0:
        _write_atomic(os.path.join(workdir, "config.json"), json.dumps(config_to_json(config), indent=2))
        _write_atomic(os.path.join(workdir, VAE_CONFIG_FILE), vae_cfg.to_json())

      writer = MetricsWriter(workdir, console_every=1)
      t_start = time.perf_counter()
      cpu_start = time.process_time()
      t_compile = None
      last_log = time.perf_counter()
      metrics_host: dict[str, float] = {}
      for step in range(start, config.steps):
        rows = batch_indices(len(train_x), config.data.batch_size, config.seed, step)
        state, metrics = trainer.step(state, train_x[rows[pid * local_bs:(pid + 1) * local_bs]])
        done = step + 1
        if t_compile is None:
          jax.block_until_ready(metrics)
          t_compile = time.perf_counter() - t_start
          last_log = time.perf_counter()
        if done % config.log_every == 0 or done == config.steps:
          metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if not all(math.isfinite(v) for v in metrics_host.values()):
            raise FloatingPointError(f"non-finite metrics at step {done}: {metrics_host}")
          now = time.perf_counter()
          since = done - max(start + 1, done - config.log_every)  # steps timed (not the compile)
          if since > 0:
            metrics_host["step_time"] = (now - last_log) / since
          last_log = now
          writer.write_scalars(done, metrics_host)
        if done % config.eval_every == 0 or done == config.steps:
          recon = trainer.reconstruct(state["params"], heldout_x, config.eval.batch_size)
          ev = image_metrics.reconstruction_summary(heldout_x, recon)
          writer.write_scalars(done, {f"eval/{k}": v for k, v in ev.items() if k != "num_images"})
          grid_recon = trainer.reconstruct(state["params"], grid_x, config.eval.batch_size)
          writer.write_images(done, "recon", recon_grid(grid_x, grid_recon))
          last_log = time.perf_counter()
        ckpt.save(done, state, force=done == config.steps or run.stop.requested)
        if run.stop.requested:
          ckpt.wait()
          log(f"stop requested ({run.stop.reason}): saved step {done}, exiting")
          return dict(stopped=run.stop.reason, step=done, resumed_from=start)
      train_time = time.perf_counter() - t_start
      train_cpu = time.process_time() - cpu_start
      ckpt.wait()

      params = jax.device_get(state["params"])
      vae = nnx.merge(trainer.graphdef, params)
      recon = trainer.reconstruct(state["params"], heldout_x, config.eval.batch_size)
      ev = image_metrics.reconstruction_summary(heldout_x, recon)
      result = dict(ev, step=config.steps, resumed_from=start, train_time_s=train_time,
                    train_cpu_s=train_cpu, compile_time_s=t_compile or 0.0, gamma=t.gamma if t.noise_aug else 0.0,
                    noise_aug=bool(t.noise_aug), source=config.data.source,
                    image_size=config.data.image_size, vae=vae_cfg.to_dict(),
                    final_loss=metrics_host.get("loss"), devices=jax.device_count())
      if jax.process_index() == 0:
        with open(os.path.join(workdir, EVAL_FILE), "w") as f:
          json.dump(result, f, indent=2)
        export_vae(vae, os.path.join(workdir, EXPORT_DIR))
      log(f"held-out PSNR {ev['psnr']:.2f} dB, SSIM {ev['ssim']:.4f} over {ev['num_images']} images; "
           f"{config.steps - start} steps in {train_time:.1f} s (compile {t_compile or 0:.1f} s)")
      return result
    finally:
      if writer is not None:
        writer.close()
      ckpt.close()
  return dict(stopped=run.stop.reason)  # a stop before the first step (the session logged it)
