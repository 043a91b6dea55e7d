"""Training: the trainer and its step, the loop, optimizer, checkpoints, metrics, FLOPs, LoRA, DPO, the VAE trainer."""
