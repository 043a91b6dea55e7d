"""The demo image tokenizer: the FLUX-layout VAE shrunk to 32x32 digits (f4, 4 latent channels).

With patch size 2 a digit is a 4x4 grid of 16 tokens of dimension 16. 242K parameters, 700
steps of 32 digits. Measured (benchmarks/vae_noise_ablation.py): held-out PSNR 29.13 dB / SSIM
0.981 with gamma = 0.2, 29.44 dB / 0.982 with gamma = 0; about 250 CPU-seconds of training
(~0.22 s a step on 2 otherwise idle cores, i.e. under 3 minutes plus ~15 s of compilation).

  python -m nextstep_jax.train_vae --config=configs/vae_demo.py --workdir=runs/vae_demo
"""

from nextstep_jax import config


def get_config():
  c = config.vae_base_config("demo")
  c.workdir = "runs/vae_demo"
  c.data.source = "digits"
  c.data.image_size = 32
  c.steps = 700
  c.data.batch_size = 32
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 20
  c.optim.schedule = "cosine"
  c.optim.min_lr = 1e-4
  c.train.noise_aug = True
  c.train.gamma = 0.2
  c.train.l1_weight = 1.0
  c.train.l2_weight = 1.0
  c.train.kl_weight = 1e-4
  c.log_every = 50
  c.eval_every = 350
  c.checkpoint.every = 350
  c.checkpoint.keep = 2
  c.lock()
  return c
