"""Optimizer-state memory of full fine-tuning versus LoRA for a stage config (the 14B preset by default).

  python benchmarks/lora_memory.py [--stage=stage2] [--rank=32] [--targets=q,k,v,o] [--head_targets=]
                                   [--devices=0]

Everything is abstract (``trainer_lib.abstract_model`` and ``lora.abstract_lora`` under eval_shape): no weight
is allocated, so it runs on a laptop. Adam/AdamW keep two moments (mu, nu) per trained parameter in the
parameter's dtype (fp32 master weights here). Also prints the other per-parameter training memory
(weights and gradients) for context, and, with --devices=N, the per-device share under pure FSDP.
Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402
from nextstep_jax.training import lora as lora_lib  # noqa: E402
from nextstep_jax.training import trainer as trainer_lib  # noqa: E402

GIB = 1024 ** 3


def _names(text: str) -> tuple[str, ...]:
  return tuple(n.strip() for n in text.split(",") if n.strip())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stage", default="stage2")
  parser.add_argument("--rank", type=int, default=32)
  parser.add_argument("--alpha", type=float, default=32.0)
  parser.add_argument("--targets", default="q,k,v,o")
  parser.add_argument("--head_targets", default="")
  parser.add_argument("--devices", type=int, default=0, help="also print per-device shares for N devices")
  args = parser.parse_args()

  config = common.stage_config(args.stage)
  cfg = lora_lib.LoraConfig(rank=args.rank, alpha=args.alpha, targets=_names(args.targets),
                            head_targets=_names(args.head_targets))
  _, abstract, axes = trainer_lib.abstract_model(config)
  lora = lora_lib.abstract_lora(abstract, axes, cfg)

  n_full, n_lora = lora_lib.param_count(abstract), lora_lib.param_count(lora)
  targeted = lora_lib.param_count(lora_lib.targeted_kernels(abstract, cfg))
  opt_full = lora_lib.optimizer_memory_bytes(abstract, None, "adamw")
  opt_lora = lora_lib.optimizer_memory_bytes(abstract, lora, "adamw")
  w_bytes = lora_lib.param_bytes(abstract)
  l_bytes = lora_lib.param_bytes(lora)
  # apply_lora(..., dtype=compute dtype) inside the loss: a merged copy of the targeted kernels and its
  # gradient live through the step, in the compute dtype.
  compute_itemsize = 2 if config.model.dtype in ("bfloat16", "float16") else 4
  t_bytes = 2 * targeted * compute_itemsize

  print(f"{args.stage}: backbone {config.model.preset}, head {config.head.preset}, "
        f"param_dtype {config.model.param_dtype}")
  print(f"LoRA rank {cfg.rank}, alpha {cfg.alpha}, targets {cfg.targets}, head_targets {cfg.head_targets}")
  print(f"  parameters (full)          {n_full:>16,}")
  print(f"  targeted kernels           {targeted:>16,}")
  print(f"  LoRA parameters            {n_lora:>16,}  ({100 * n_lora / n_full:.3f}% of the model)")
  print()
  print("AdamW state (mu + nu)")
  print(f"  full fine-tune             {opt_full / GIB:12.3f} GiB")
  print(f"  LoRA                       {opt_lora / GIB:12.3f} GiB")
  print(f"  ratio LoRA / full          {opt_lora / opt_full:12.5f}  ({opt_full / opt_lora:,.0f}x smaller)")
  print()
  full_total = w_bytes * 2 + opt_full                       # weights + grads + moments
  lora_total = w_bytes + l_bytes * 2 + opt_lora + t_bytes  # frozen base; adapters, their grads, moments;
  #                                                          the merged targeted kernels and their gradient
  print("Weights + gradients + AdamW state (activations excluded)")
  print(f"  full fine-tune             {full_total / GIB:12.3f} GiB")
  print(f"  LoRA                       {lora_total / GIB:12.3f} GiB  (incl. {t_bytes / GIB:.3f} GiB: the merged "
        f"targeted kernels and their gradient in {config.model.dtype}, alive during the step)")
  if args.devices > 0:
    n = args.devices
    print()
    print(f"Per device under pure FSDP over {n} devices")
    print(f"  AdamW state: full {opt_full / n / GIB:.3f} GiB, LoRA {opt_lora / n / GIB:.4f} GiB")
    print(f"  weights + grads + state: full {full_total / n / GIB:.3f} GiB, LoRA {lora_total / n / GIB:.3f} GiB")


if __name__ == "__main__":
  main()
