"""Analytic FLOPs of one train step, TFLOP/s per device and MFU.

XLA's ``cost_analysis()`` counts the body of a ``lax.scan`` once (the backbone's layers and the FM head's
blocks are scanned), so the step's FLOPs are counted here from the config instead. Conventions:

- a matmul of (m, k) by (k, n) is 2*m*k*n FLOPs; elementwise work, norms, softmax and the optimizer are
  left out (a fraction of a percent at scale);
- training = forward + backward = 3 x forward (the backward pass does two matmuls per forward one);
  rematerialisation is *not* counted (MFU measures useful work; recomputation shows up as lower MFU);
- attention: QK^T and PV over the causal half of the (L, L) square per row (a document mask makes the
  real work smaller still; it is not credited);
- what the step computes is counted as it is laid out: the LM head over every position, the image
  in-projection at every position, the out-projection and the flow-matching head over every slot of the
  row's image-token buffer (``data.max_row_image_tokens``), the head ``head.batch_mul`` times.

``step_flops(config)`` is the number to log; ``mfu(flops, step_time, num_devices, device_kind)`` turns it
into model-FLOPs utilisation against the bf16 dense peak of the device kind (None on CPU or unknown kinds).
"""

from __future__ import annotations

from typing import Any

from nextstep_jax.models.fm_head import TIME_FREQ_DIM

# Dense bf16 peak per device (jax.Device), FLOP/s. TPU v4 and v5p run one device per chip (megacore).
PEAK_FLOPS: dict[str, float] = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5p": 459e12,
    "tpu v5e": 197e12,
    "tpu v6e": 918e12,
}

# device.device_kind strings as jax reports them, to the keys above (longest match first).
_KIND_ALIASES: tuple[tuple[str, str], ...] = (
    ("tpu v5 lite", "tpu v5e"),
    ("tpu v5e", "tpu v5e"),
    ("tpu v6 lite", "tpu v6e"),
    ("tpu v6e", "tpu v6e"),
    ("tpu v5p", "tpu v5p"),
    ("tpu v5", "tpu v5p"),
    ("tpu v4", "tpu v4"),
    ("h200", "h200"),
    ("h100", "h100"),
    ("a100", "a100"),
)


def peak_flops(device_kind: str) -> float | None:
  """bf16 dense peak FLOP/s of one device of `device_kind` (e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite"),
  or None when unknown (CPU)."""
  kind = device_kind.lower()
  for alias, key in _KIND_ALIASES:
    if alias in kind:
      return PEAK_FLOPS[key]
  return None


def forward_flops_per_row(config: Any) -> dict[str, float]:
  """Forward FLOPs of one packed row, by component: backbone matmuls, attention, LM head, image
  projectors, flow-matching head."""
  m, h, d = config.model, config.head, config.data
  seq = int(d.seq_len)
  slots = int(d.max_row_image_tokens)
  hid, layers = int(m.hidden_size), int(m.num_layers)
  nh, nkv, hd, ff = int(m.num_heads), int(m.num_kv_heads), int(m.head_dim), int(m.intermediate_size)
  vocab = int(m.vocab_size)
  token_dim = int(config.image.latent_channels) * int(config.image.patch_size) ** 2
  dh, nb, mul = int(h.dim), int(h.num_layers), int(h.batch_mul)

  per_token_layer = hid * nh * hd + 2 * hid * nkv * hd + nh * hd * hid + 3 * hid * ff  # weights touched
  backbone = 2.0 * seq * layers * per_token_layer
  attention = 2.0 * 2.0 * seq * seq * nh * hd * layers / 2.0  # QK^T + PV, causal half
  lm_head = 2.0 * seq * hid * vocab
  projectors = 2.0 * seq * token_dim * hid + 2.0 * slots * hid * hid
  head_per_row = (TIME_FREQ_DIM * dh + dh * dh          # time MLP
                  + hid * dh + token_dim * dh            # cond and input projections
                  + nb * (dh * 3 * dh + 2 * dh * dh)     # adaLN modulation + MLP per block
                  + dh * 2 * dh + dh * token_dim)        # final adaLN + output
  fm_head = 2.0 * slots * mul * head_per_row
  return {"backbone": backbone, "attention": attention, "lm_head": lm_head, "projectors": projectors,
          "fm_head": fm_head}


def step_flops(config: Any) -> float:
  """Model FLOPs of one train step over the global batch (``data.batch_size`` rows): 3 x forward."""
  per_row = sum(forward_flops_per_row(config).values())
  return 3.0 * per_row * int(config.data.batch_size)


def tflops_per_device(flops: float, step_time: float, num_devices: int) -> float:
  """Achieved TFLOP/s per device for `flops` per step taking `step_time` seconds on `num_devices`."""
  if step_time <= 0 or num_devices <= 0:
    raise ValueError(f"step_time ({step_time}) and num_devices ({num_devices}) must be positive")
  return flops / step_time / num_devices / 1e12


def mfu(flops: float, step_time: float, num_devices: int, device_kind: str) -> float | None:
  """Model-FLOPs utilisation in [0, 1] (None where the device kind has no known peak, e.g. CPU)."""
  peak = peak_flops(device_kind)
  if peak is None:
    return None
  return tflops_per_device(flops, step_time, num_devices) * 1e12 / peak
