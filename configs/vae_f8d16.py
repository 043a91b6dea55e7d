"""The NextStep-1 / FLUX.1 image tokenizer (f8, 16 latent channels, token norm over 2x2 patches).

SPEC §8: base 128 channels, levels 128/256/512/512, 2 ResNet blocks per encoder level (3 per
decoder level), mid attention, GroupNorm(32), latent noise std ~ U(0, 0.2). Meant for an
accelerator and a real image folder (``--config.data.source=/path/to/images``); on the embedded
digits at 64x64 it runs anywhere, slowly (a 64x64 image is 4x4 tokens of dimension 64).
Loss: L1 + L2 + small KL; an LPIPS term is not available offline, a from-scratch PatchGAN term is
(``--config.train.adv_weight=0.1``).

  python -m nextstep_jax.train_vae --config=configs/vae_f8d16.py --workdir=runs/vae_f8d16
"""

from nextstep_jax import config


def get_config():
  c = config.vae_base_config("f8d16")
  c.workdir = "runs/vae_f8d16"
  c.data.source = "digits"
  c.data.image_size = 64
  c.steps = 100_000
  c.data.batch_size = 32
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1000
  c.optim.schedule = "cosine"
  c.optim.min_lr = 1e-5
  c.optim.b2 = 0.99
  c.train.noise_aug = True
  c.train.gamma = 0.2
  c.train.l1_weight = 1.0
  c.train.l2_weight = 0.0
  c.train.kl_weight = 1e-6
  c.train.adv_weight = 0.0
  c.train.adv_start = 20_000
  c.eval.num_images = 500
  c.log_every = 100
  c.eval_every = 5000
  c.checkpoint.every = 5000
  c.checkpoint.keep = 3
  c.vae.dtype = "float32"
  c.lock()
  return c
