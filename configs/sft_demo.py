"""SFT at demo size: configs/demo.py's model fine-tuned on digit image-text pairs (0.9) and edits (0.1).

Follows SPEC §7's SFT row scaled to the demo: the mixture drops text-only and interleaved data, the
loss falls on the response only (``data.loss_on_prompt=False``), rows are half the demo's length
(64 tokens, as 16K -> 8K) with twice the rows, and the peak learning rate is a tenth of the
demo's (as the paper's 1e-4 -> 1e-5) on a cosine to 0 after a 5% warm-up (500 of 10K).
Starts from a demo run's weights: ``runs/demo`` (python -m nextstep_jax.demo --workdir=runs/demo)
by default; point checkpoint.init_from, vae.checkpoint and tokenizer.path at another run with
``--config.checkpoint.init_from=W/checkpoints --config.vae.checkpoint=W/vae
--config.tokenizer.path=W/tokenizer``.
"""

from __future__ import annotations

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
  c = demo.get_config()
  pretrain_lr = float(c.optim.lr)
  with c.unlocked():
    c.workdir = "runs/sft_demo"
    c.steps = 300
    c.eval_every = 100
    c.optim.lr = pretrain_lr / 10
    c.optim.min_lr = 0.0
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 15
    c.checkpoint.init_from = "runs/demo/checkpoints"
    c.checkpoint.every = 100
    c.vae.checkpoint = "runs/demo/vae"
    c.tokenizer.path = "runs/demo/tokenizer"
    c.data.ratios = ml_collections.ConfigDict(dict(text=0.0, pair=0.9, edit=0.1, interleaved=0.0))
    c.data.loss_on_prompt = False
    c.data.seq_len = 64
    c.data.batch_size = 16
    c.data.max_images = 2           # an image block is ~22 positions: two samples fill 64
    c.data.max_row_image_tokens = c.data.max_images * c.data.max_image_tokens
  return c
