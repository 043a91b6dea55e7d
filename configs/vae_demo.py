"""The demo image tokenizer: the FLUX-layout VAE shrunk to 32x32 digits (f4, 4 latent channels).

With patch size 2 a digit is a 4x4 grid of 16 tokens of dimension 16. Sized to train in about
three minutes on 2 CPU cores (see the README / train_vae report for the measured PSNR).

  python -m nextstep_jax.train_vae --config=configs/vae_demo.py --workdir=runs/vae_demo
"""

from nextstep_jax import train_vae


def get_config():
  c = train_vae.default_config("demo")
  c.workdir = "runs/vae_demo"
  c.data.source = "digits"
  c.data.image_size = 32
  c.train.steps = 700
  c.train.batch_size = 32
  c.train.lr = 2e-3
  c.train.warmup_steps = 20
  c.train.schedule = "cosine"
  c.train.min_lr = 1e-4
  c.train.noise_aug = True
  c.train.gamma = 0.2
  c.train.l1_weight = 1.0
  c.train.l2_weight = 1.0
  c.train.kl_weight = 1e-4
  c.log_every = 50
  c.eval_every = 350
  c.ckpt_every = 350
  c.ckpt_keep = 2
  c.lock()
  return c
