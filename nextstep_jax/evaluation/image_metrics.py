"""Reconstruction metrics: PSNR and SSIM, pure jnp, per image.

Conventions (the usual ones, so numbers compare with papers): images are NHWC; both metrics take
a ``data_range`` (1.0 for pixels in [0, 1]; ``reconstruction_metrics`` maps [-1, 1] pixels to
[0, 1] and clips first). SSIM is Wang et al. (2004): 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, computed per channel on the 'valid' region and averaged over the map and
the channels. PSNR of identical images is +inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _check_pair(a: Array, b: Array) -> None:
  if a.shape != b.shape:
    raise ValueError(f"images to compare have different shapes {a.shape} and {b.shape}")
  if a.ndim != 4:
    raise ValueError(f"images must be NHWC (B, H, W, C), got shape {a.shape}")


def psnr(a: Array, b: Array, data_range: float = 1.0) -> Array:
  """(B,) peak signal-to-noise ratio in dB: 10 log10(range^2 / MSE) per image."""
  _check_pair(a, b)
  mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Normalised 1-D Gaussian of ``size`` taps."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-0.5 * (x / sigma) ** 2)
  return (g / g.sum()).astype(np.float32)


def _filter_valid(x_bhwc: Array, g: np.ndarray) -> Array:
  """Separable 'valid' Gaussian filter of every channel."""
  b, h, w, c = x_bhwc.shape
  k = len(g)
  x = x_bhwc.transpose(0, 3, 1, 2).reshape(b * c, h, w, 1)
  gh = jnp.asarray(g).reshape(k, 1, 1, 1)
  gw = jnp.asarray(g).reshape(1, k, 1, 1)
  dn = ("NHWC", "HWIO", "NHWC")
  hp = jax.lax.Precision.HIGHEST
  x = jax.lax.conv_general_dilated(x, gh, (1, 1), "VALID", dimension_numbers=dn, precision=hp)
  x = jax.lax.conv_general_dilated(x, gw, (1, 1), "VALID", dimension_numbers=dn, precision=hp)
  return x.reshape(b, c, h - k + 1, w - k + 1)


def ssim(a: Array, b: Array, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Array:
  """(B,) structural similarity per image (mean over the valid SSIM map and the channels)."""
  _check_pair(a, b)
  if min(a.shape[1], a.shape[2]) < win_size:
    raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {a.shape[1:3]}")
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  g = gaussian_window(win_size, sigma)
  mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
  s_aa = _filter_valid(a * a, g) - mu_a ** 2
  s_bb = _filter_valid(b * b, g) - mu_b ** 2
  s_ab = _filter_valid(a * b, g) - mu_a * mu_b
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  smap = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
  return jnp.mean(smap, axis=(1, 2, 3))


def to_unit(x: Array) -> Array:
  """[-1, 1] pixels -> [0, 1], clipped."""
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def reconstruction_metrics(originals: Array, reconstructions: Array) -> dict[str, Array]:
  """Per-image PSNR and SSIM of [-1, 1] images (compared in [0, 1] after clipping)."""
  a, b = to_unit(originals), to_unit(reconstructions)
  return {"psnr": psnr(a, b), "ssim": ssim(a, b)}


def reconstruction_summary(originals: np.ndarray, reconstructions: np.ndarray) -> dict[str, float]:
  """Mean (and spread of) PSNR / SSIM over images; pixels in [-1, 1]."""
  m = reconstruction_metrics(jnp.asarray(originals), jnp.asarray(reconstructions))
  psnr, ssim = np.asarray(m["psnr"], np.float64), np.asarray(m["ssim"], np.float64)
  return {"psnr": float(psnr.mean()), "psnr_std": float(psnr.std()), "ssim": float(ssim.mean()),
          "ssim_std": float(ssim.std()), "num_images": int(len(psnr))}
