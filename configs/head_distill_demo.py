"""The few-step head of the demo: its 28-step guided ODE head (cfg 3.0, the sampler ``evaluate`` judges)
distilled into 4 evaluations per token, the backbone frozen.

  python -m nextstep_jax.distill --config=configs/head_distill_demo.py [--config.evaluations=2]

The conditions come from 2,000 teacher samples of the digit captions (32,000 tokens, a tenth held out);
3,000 steps of 256 tokens. The head goes to runs/demo/heads/k4; sample and evaluate it with
``--head=runs/demo/heads/k4``.
"""

from nextstep_jax import config


def get_config():
  c = config.head_distill_base_config()
  c.teacher = "runs/demo"
  c.evaluations = 4
  c.teacher_steps = 28
  c.cfg = 3.0
  c.time_shift = 1.0
  c.use_norm = True
  c.prompts = "digits"
  c.num_images = 2000
  c.sample_batch = 100
  c.train.steps = 3000
  c.train.batch_tokens = 256
  c.train.log_every = 250
  c.optim.lr = 3e-4
  c.optim.min_lr = 3e-5
  c.optim.warmup_steps = 100
  c.lock()
  return c
