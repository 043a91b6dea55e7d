"""SFT (SPEC §7): 10K steps, cosine lr 1e-5 -> 0 after 500 warm-up steps, 8K rows, pairs 0.9 / edits 0.1.

Qwen2.5-14B backbone with the base FM head (12 x 1536); numbers from configs/common.py STAGES.
The loss falls on the response only (``data.loss_on_prompt=False``): no CE on captions and edit
instructions, flow matching on the target image (source images of edits are context).
Starts from the annealing stage's weights (``checkpoint.init_from``, default the anneal config's
``runs/anneal/checkpoints``); set data, tokenizer and VAE paths on the command line.
"""

from __future__ import annotations

import ml_collections

from configs.common import stage_config


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
  """``--config=configs/sft.py`` (14B) or ``--config=configs/sft.py:tiny`` (the same path on a CPU)."""
  c = stage_config("sft", size)
  if size == "tiny":
    return c
  with c.unlocked():
    c.data.loss_on_prompt = False
    c.checkpoint.init_from = "runs/anneal/checkpoints"
  return c
