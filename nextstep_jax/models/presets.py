"""Model size presets: Qwen2.5-style backbones and flow-matching heads (plain dicts of sizes).

Backbones: Qwen2.5-style decoders. The Qwen2.5 numbers are those of the published
config.json of each checkpoint (rms_norm_eps is 1e-6 for 0.5B..7B and 1e-5 for 14B). Importers read
the real numbers from the checkpoint; these presets size fresh models and abstract shapes.
Note: the 0.5B, 1.5B and 3B checkpoints tie lm_head to embed_tokens (QWEN25_TIED_EMBEDDINGS); this
project's model always has a separate lm_head, so an importer copies embed_tokens into lm_head.
"""

from __future__ import annotations


def _backbone(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, mlp: int,
              vocab: int, rope_theta: float, eps: float) -> dict:
  return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
              head_dim=head_dim, intermediate_size=mlp, vocab_size=vocab,
              rope_theta=rope_theta, rms_norm_eps=eps)


BACKBONES: dict[str, dict] = {
  # The demo backbone: about 0.9M parameters, trains on 2 CPU cores.
  "tiny": _backbone(128, 4, 4, 2, 32, 384, 512, 10_000.0, 1e-6),
  "qwen2.5-0.5b": _backbone(896, 24, 14, 2, 64, 4864, 151_936, 1e6, 1e-6),
  "qwen2.5-1.5b": _backbone(1536, 28, 12, 2, 128, 8960, 151_936, 1e6, 1e-6),
  "qwen2.5-3b": _backbone(2048, 36, 16, 2, 128, 11_008, 151_936, 1e6, 1e-6),
  "qwen2.5-7b": _backbone(3584, 28, 28, 4, 128, 18_944, 152_064, 1e6, 1e-6),
  "qwen2.5-14b": _backbone(5120, 48, 40, 8, 128, 13_824, 152_064, 1e6, 1e-5),
}

QWEN25_TIED_EMBEDDINGS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b")

# Flow-matching heads (MAR's SimpleMLPAdaLN), paper Table 4: residual blocks x width.
HEADS: dict[str, dict] = {
  "tiny": dict(num_layers=2, dim=128, batch_mul=4),
  "small": dict(num_layers=6, dim=1024, batch_mul=4),
  "base": dict(num_layers=12, dim=1536, batch_mul=4),
  "large": dict(num_layers=24, dim=2048, batch_mul=4),
}
