"""Stage 2 (SPEC §7): 100K steps at constant lr 1e-5 after 5K warm-up, images 256x256 to 512x512.

Qwen2.5-14B backbone with the base FM head (12 x 1536); numbers from configs/common.py STAGES.
Set data, tokenizer and VAE paths (and `checkpoint.init_from` after stage1) on the command line.
"""

from __future__ import annotations

import ml_collections

from configs.common import stage_config


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
  """``--config=configs/stage2.py`` (14B) or ``--config=configs/stage2.py:tiny`` (the same path on a CPU)."""
  return stage_config("stage2", size)
