"""DPO at demo size: the SFT demo model (configs/sft_demo.py) tuned on digit preference pairs.

SPEC §7's DPO row (300 steps, constant lr after 200 warm-up steps, weight decay 0.1) with the
learning rate a fifth of the SFT demo's peak, as the paper's (2e-6 vs 1e-5). Pairs (prompt, chosen, rejected) come from
``python benchmarks/dpo_digits.py`` (or nextstep_jax.evaluation.preferences.build_digit_preferences): chosen a real digit
of the prompted class, rejected an SFT sample the classifier reads as another digit. Rows of 48
tokens hold a caption and one 16-token image; 16 pairs (32 sequences) per step.
Paths default to runs/demo (VAE, tokenizer), runs/sft_demo (policy and reference) and
runs/dpo_demo_pairs (the preference directory).
"""

from __future__ import annotations

import ml_collections

from configs import sft_demo
from configs.dpo import apply_dpo_stage, dpo_section


def get_config() -> ml_collections.ConfigDict:
  c = sft_demo.get_config()
  sft_lr = float(c.optim.lr)
  with c.unlocked():
    apply_dpo_stage(c)
    c.workdir = "runs/dpo_demo"
    c.log_every = 10
    c.eval_every = 50
    c.optim.lr = c.optim.min_lr = sft_lr / 5
    c.checkpoint.init_from = "runs/sft_demo/checkpoints"
    c.checkpoint.every = 100
    c.data.batch_size = 16          # preference pairs per step
    c.data.seq_len = 48
    c.data.max_images = 1
    c.data.max_row_image_tokens = c.data.max_image_tokens
    c.dpo = dpo_section(beta=100.0, data="runs/dpo_demo_pairs")
  return c
