"""Annealing (SPEC §7): 20K steps, cosine lr 1e-5 -> 0 without warm-up, editing data enters (0.1).

Qwen2.5-14B backbone with the base FM head (12 x 1536); numbers from configs/common.py STAGES.
Set data, tokenizer and VAE paths (and `checkpoint.init_from` after stage1) on the command line.
"""

from __future__ import annotations

import ml_collections

from configs.common import stage_config


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
  """``--config=configs/anneal.py`` (14B) or ``--config=configs/anneal.py:tiny`` (the same path on a CPU)."""
  return stage_config("anneal", size)
