"""The VAE trainer end to end (CLI, 20 steps of a tiny VAE), resume, load_vae, the latent CLI,
config checks, the noise augmentation and the adversarial term."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextstep_jax import config as config_lib
from nextstep_jax import run as run_lib
from nextstep_jax.evaluation import image_metrics
from nextstep_jax.data import images as images_lib
from nextstep_jax.training import vae_trainer
from nextstep_jax.models import vae as vae_lib
from tests.tolerance import assert_close_fp32

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = '''
from configs import vae_demo


def get_config():
  c = vae_demo.get_config()
  c.vae.base_channels = 8
  c.vae.channel_mults = (1, 2)
  c.vae.norm_groups = 4
  c.vae.mid_attention = False  # (tested in test_vae*); keeps the compile short
  c.steps = 20
  c.data.batch_size = 8
  c.optim.warmup_steps = 2
  c.optim.lr = 3e-3
  c.eval.num_images = 16
  c.eval.batch_size = 16
  c.eval.grid_images = 8
  c.log_every = 5
  c.eval_every = 10
  c.checkpoint.every = 10
  return c
'''


def _tiny_config(tmp_path):
  path = tmp_path / "tiny_vae_config.py"
  path.write_text(TINY_CONFIG)
  sys.path.insert(0, REPO)
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_vae_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return path, mod.get_config()


def _run(args, timeout):
  proc = subprocess.run([sys.executable, "-m"] + args, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("vae_run")
  cfg_path, config = _tiny_config(tmp)
  workdir = str(tmp / "work")
  out = _run(["nextstep_jax.train_vae", f"--config={cfg_path}", f"--workdir={workdir}",
              "--config.train.noise_aug=True"], timeout=240)
  return workdir, config, out


@pytest.mark.slow
def test_cli_trains_and_writes_everything(trained):
  workdir, _, out = trained
  assert "held-out PSNR" in out and "step 20 |" in out
  ev = json.load(open(os.path.join(workdir, vae_trainer.EVAL_FILE)))
  assert ev["step"] == 20 and ev["num_images"] == 16 and ev["devices"] == jax.device_count()
  assert np.isfinite(ev["psnr"]) and 0.0 < ev["ssim"] <= 1.0
  assert ev["gamma"] == 0.2 and ev["noise_aug"] is True
  recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [r["loss"] for r in recs if "loss" in r]
  assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
  assert [r["step"] for r in recs if "eval/psnr" in r] == [10, 20]
  assert sorted(os.listdir(os.path.join(workdir, "images"))) == ["recon_00000010.png",
                                                                 "recon_00000020.png"]
  from PIL import Image
  grid = Image.open(os.path.join(workdir, "images", "recon_00000020.png"))
  assert grid.size == (8 * 32, 2 * 32)  # one row of 8 originals, one of reconstructions
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [10, 20]
  assert os.path.isfile(os.path.join(workdir, "export", "checkpoint.safetensors"))


@pytest.mark.slow
def test_resume_and_load_vae(trained, tmp_path):
  workdir, config, _ = trained
  vae = run_lib.load_vae(workdir)
  cfg = vae.config
  assert cfg.base_channels == 8 and cfg.channel_mults == (1, 2)
  # the loaded weights reproduce the recorded evaluation
  heldout, _ = images_lib.load_images("digits", "heldout", 32)
  x = jnp.asarray(heldout[:16])
  recon = jax.jit(lambda v, x: v.decode(v.encode(x, sample=False)))(vae, x)
  ev = image_metrics.reconstruction_summary(np.asarray(x), np.asarray(recon))
  recorded = json.load(open(os.path.join(workdir, vae_trainer.EVAL_FILE)))
  assert abs(ev["psnr"] - recorded["psnr"]) < 1e-3
  # the same through the exported safetensors
  from nextstep_jax.interop.vae import load_vae_dir
  exported = load_vae_dir(os.path.join(workdir, "export"))
  assert_close_fp32(jax.jit(lambda v, x: v.decode(v.encode(x, sample=False)))(exported, x), recon, rtol=1e-5)
  # resume from step 20 to 24, in-process (8 devices under the test conftest)
  with config.unlocked():
    config.steps = 24
  result = vae_trainer.train_and_evaluate(config, workdir)
  assert result["resumed_from"] == 20 and result["step"] == 24
  assert 24 in [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  vae24 = run_lib.load_vae(workdir)
  vae20 = run_lib.load_vae(workdir, step=20)
  p24 = jax.tree.leaves(nnx.state(vae24, nnx.Param))
  p20 = jax.tree.leaves(nnx.state(vae20, nnx.Param))
  assert any(not np.allclose(a, b) for a, b in zip(p24, p20))
  with pytest.raises(FileNotFoundError, match="not a train_vae workdir"):
    run_lib.load_vae(str(tmp_path))


@pytest.mark.slow
def test_latents_cli(trained, tmp_path):
  workdir, _, _ = trained
  out_dir = str(tmp_path / "tokens")
  out = _run(["nextstep_jax.latents", f"--vae_workdir={workdir}", f"--out_dir={out_dir}",
              "--split=heldout", "--batch_size=100"], timeout=180)
  assert "latent stats of 500 images" in out
  stats = json.load(open(os.path.join(out_dir, "heldout_latent_stats.json")))
  assert stats["num_images"] == 500 and len(stats["channel_mean"]) == 4
  assert stats["token_mean_abs_max"] < 1e-4
  assert "nextstep_jax.data prepare" in out and "--vae=" in out   # where the tokens come from


def test_cli_rejects_unknown_config_keys(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "nextstep_jax.train_vae",
                         "--config=configs/vae_demo.py", f"--workdir={tmp_path}",
                         "--config.train.stepz=3"], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ))
  assert proc.returncode != 0 and "stepz" in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_config_locked_and_checked():
  from configs import vae_demo, vae_f8d16
  c = vae_demo.get_config()
  with pytest.raises(AttributeError):
    c.train.stepz = 3
  with pytest.raises(AttributeError):
    c.bogus = 1
  cfg = config_lib.validate_vae(c, num_devices=1)
  assert cfg == vae_lib.preset("demo")
  assert config_lib.validate_vae(vae_f8d16.get_config(), num_devices=1) == vae_lib.preset("f8d16")

  def bad(match, num_devices=1, **changes):
    c = vae_demo.get_config()
    for k, v in changes.items():
      group, field = k.split("__")
      setattr(getattr(c, group), field, v)
    with pytest.raises(ValueError, match=match):
      config_lib.validate_vae(c, num_devices=num_devices)

  bad("LPIPS.*cannot be downloaded", train__perceptual_weight=0.1)
  bad("batch_size=32 must be a positive multiple of the 3 devices", num_devices=3)
  bad("image_size=36 is not divisible by 8", data__image_size=36)
  bad("no reconstruction loss", train__l1_weight=0.0, train__l2_weight=0.0)
  bad("gamma", train__gamma=-0.1)
  bad("norm_groups", vae__norm_groups=5)
  bad("neither 'digits' nor a directory", data__source="no/such/dir")


def test_latent_noise_is_per_sample_uniform_std():
  z = jnp.zeros((512, 4, 4, 8))
  out = np.asarray(vae_trainer.latent_noise(z, jax.random.key(0), 0.2))
  std = out.reshape(512, -1).std(-1)
  assert std.max() < 0.25 and std.min() < 0.03 and std.max() > 0.17
  assert abs(std.mean() - 0.1) < 0.01  # E[U(0, 0.2)] = 0.1
  assert np.allclose(np.asarray(vae_trainer.latent_noise(z, jax.random.key(0), 0.0)), 0.0)


def test_noise_aug_switch():
  cfg = vae_lib.VAEConfig(base_channels=8, channel_mults=(1, 2), norm_groups=4, latent_channels=4)
  vae = vae_lib.build_vae(cfg)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32))
  c = config_lib.vae_base_config("demo").train
  c.sample_posterior = False
  c.noise_aug = False

  @jax.jit
  def run(vae, x):
    clean, mean, _ = vae_trainer.reconstruct(vae, x, jax.random.key(0), c)
    return clean, vae.decode(mean)

  clean, direct = run(vae, x)
  assert_close_fp32(clean, direct, rtol=1e-6)
  c.noise_aug = True  # a Python switch: read at trace time
  noisy, _, _ = jax.jit(lambda v, x: vae_trainer.reconstruct(v, x, jax.random.key(0), c))(vae, x)
  assert not np.allclose(np.asarray(noisy), np.asarray(clean), atol=1e-4)


def test_adversarial_term_trains_a_discriminator(tmp_path):
  _, config = _tiny_config(tmp_path)
  config.vae.channel_mults = (1,)  # the smallest VAE: this test is about the GAN term
  config.train.adv_weight = 0.1
  config.train.adv_start = 0
  config.train.disc_channels = 8
  n = jax.device_count()
  config.data.batch_size = n
  trainer = vae_trainer.VAETrainer(config, vae_trainer.make_mesh())
  state = trainer.init_state(0)
  d0 = jax.tree.map(np.array, jax.device_get(state["disc_params"]))  # a copy: the step donates
  x = np.random.default_rng(0).uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32)
  for _ in range(2):
    state, metrics = trainer.step(state, x)
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["d_loss"]) and np.isfinite(metrics["g_loss"])
  d2 = jax.device_get(state["disc_params"])
  # every kernel moves (the last bias may not: at init both hinge margins are active and its
  # gradient, 0.5 * (fraction of active fake - fraction of active real), is exactly 0)
  for layer in ("c1", "c2", "c3"):
    assert not np.allclose(d0[layer]["kernel"], d2[layer]["kernel"]), layer
