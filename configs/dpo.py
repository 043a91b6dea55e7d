"""DPO (SPEC §7): 300 steps at a constant lr 2e-6 after 200 warm-up steps, weight decay 0.1, from SFT.

Qwen2.5-14B backbone with the base FM head (12 x 1536), as configs/sft.py; the numbers come from
configs/common.py STAGES["dpo"]. The loss is Diffusion-DPO on per-token flow-matching errors
(nextstep_jax/dpo.py): the policy starts from the SFT checkpoint (``checkpoint.init_from``) and
the frozen reference is the same checkpoint (``dpo.reference`` empty).

Not in the paper, chosen here:
- 64 preference pairs per step (128 sequences); rows of 1280 tokens hold a prompt of up to ~250
  tokens and one image of up to 1024 tokens (512x512); images travel as pixels and the frozen VAE
  encodes them inside the step, so a batch groups pairs of one image size.
- beta 1000 for per-token errors averaged over an image's tokens. Diffusion-DPO used beta 5000
  (2500 on its MSE, which it scales by -beta/2) on epsilon errors averaged over latent elements;
  a velocity error is epsilon's divided by t, so on the same images the velocity MSE is about
  1/E[t^2] ~ 3.4x larger for t = sigmoid(N(0, 1)), giving ~700-1000. Tune it on the data.
Set ``dpo.data`` (a preference directory, see nextstep_jax/dpo.py), the tokenizer and VAE paths.
"""

from __future__ import annotations

import ml_collections

from configs.common import STAGES, stage_config
from nextstep_jax.config import dpo_section


def apply_dpo_stage(c: ml_collections.ConfigDict) -> None:
  """SPEC §7's DPO row on an (unlocked) config: steps, lr, schedule, warm-up, weight decay."""
  row = STAGES["dpo"]
  c.steps = row["steps"]
  c.optim.lr = row["lr"]
  c.optim.min_lr = row["min_lr"]
  c.optim.schedule = row["schedule"]
  c.optim.warmup_steps = row["warmup_steps"]
  c.optim.weight_decay = row["weight_decay"]


def get_config() -> ml_collections.ConfigDict:
  c = stage_config("sft")
  with c.unlocked():
    apply_dpo_stage(c)
    c.workdir = "runs/dpo"
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint.init_from = "runs/sft/checkpoints"
    c.checkpoint.every = 100
    c.loss.ce_chunk = 0            # DPO computes no CE
    c.optim.grad_accum = 1         # the DPO step does not accumulate
    c.data.payload = "images"
    c.data.batch_size = 64         # preference pairs per step (2 sequences each)
    c.data.seq_len = 1280
    c.data.max_images = 1
    c.data.max_row_image_tokens = 1024
    c.data.num_workers = 0
    c.dpo = dpo_section(beta=1000.0)
  return c
