"""SFT (SPEC §7): 10K steps, cosine lr 1e-5 -> 0 after 500 warm-up steps, 8K rows, pairs 0.9 / edits 0.1.

Qwen2.5-14B backbone with the base FM head (12 x 1536); numbers from configs/common.py STAGES.
Set data, tokenizer and VAE paths (and `checkpoint.init_from` after stage1) on the command line.
"""

from __future__ import annotations

import ml_collections

from configs.common import stage_config


def get_config() -> ml_collections.ConfigDict:
  return stage_config("sft")
