"""Image tokens from the frozen VAE: the functions the transformer and the sampler call, and the
encoder of precomputed latents (``python -m nextstep_jax.data prepare --vae=...`` stores them in
the records training reads).

Two ways for the transformer to get its image tokens, both kept:
  * on the fly: ``encode_tokens(vae, images_bhwc)`` inside the jitted train step (pixel payload);
    the sampler calls ``decode_tokens(vae, tokens, h, w)`` and ``normalize_tokens``.
  * precomputed: ``pixel_encoder(vae)`` encodes the data command's fitted uint8 images in batches
    on the devices, once, and the records carry the tokens (token payload,
    ``data.payload=image_tokens``); ``vae_identity`` names the VAE in the command's plan.

Token convention (SPEC §2): latent (B, H/f, W/f, C) -> ``(z - shift_factor) * scaling_factor`` ->
``patchify`` with p = ``vae.config.patch_size`` -> (B, T, d), T = (H/(f p)) * (W/(f p)) in raster
order, d = C p^2 with channel order (c, pi, pj), c-major. With ``token_norm`` (NextStep's encoder
norm) each token of the posterior mean already has mean 0 and variance 1 over its d values.

``latent_stats`` gives the statistics of a VAE's latents over a set of images (``python -m
nextstep_jax.latents`` prints and writes them).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nextstep_jax.batch import padded_chunks
from nextstep_jax.models.vae import (AutoencoderKL, VAEConfig, normalize_tokens, patchify,
                                     unpatchify, validate_images)

__all__ = ["patchify", "unpatchify", "normalize_tokens", "encode_tokens", "decode_tokens",
           "token_grid", "token_encoder", "token_decoder", "make_encode_fn", "pixel_encoder",
           "vae_identity", "latent_stats"]

Array = jax.Array


def token_grid(cfg: VAEConfig, height: int, width: int) -> tuple[int, int]:
  """(h, w) token grid of an image of ``height`` x ``width`` pixels (error if not divisible)."""
  s = cfg.pixels_per_token
  if height % s or width % s:
    raise ValueError(f"image size {height}x{width} is not divisible by {s} pixels per token "
                     f"(VAE factor {cfg.factor} x patch size {cfg.patch_size})")
  return height // s, width // s


def encode_tokens(vae: AutoencoderKL, images_bhwc: Array, rng: Array | None = None) -> Array:
  """Pixels (B, H, W, 3) in [-1, 1] -> normalised patch tokens (B, T, d), fp32.

  Uses the posterior mean (the clean latent the transformer trains on); with ``rng`` and a
  non-deterministic VAE, a posterior sample instead. Jit-friendly (shapes are static).
  """
  cfg = vae.config
  token_grid(cfg, images_bhwc.shape[1], images_bhwc.shape[2])
  z = vae.encode(images_bhwc, rng)
  z = (z - cfg.shift_factor) * cfg.scaling_factor
  return patchify(z, cfg.patch_size)


def decode_tokens(vae: AutoencoderKL, tokens_btd: Array, h: int, w: int) -> Array:
  """Patch tokens (B, T, d) -> pixels (B, H, W, 3), fp32, not clipped.

  ``h``, ``w`` are the token grid (T = h * w); pixel sizes (h * f * p, w * f * p) are also
  accepted and recognised because they do not multiply to T.
  """
  cfg = vae.config
  if tokens_btd.ndim != 3 or tokens_btd.shape[-1] != cfg.token_dim:
    raise ValueError(f"tokens must be (B, T, {cfg.token_dim}), got shape {tuple(tokens_btd.shape)}")
  t = tokens_btd.shape[1]
  s = cfg.pixels_per_token
  if h * w != t:
    if h % s == 0 and w % s == 0 and (h // s) * (w // s) == t:
      h, w = h // s, w // s
    else:
      raise ValueError(f"{t} tokens do not fill a token grid of {h}x{w} (nor an image of "
                       f"{h}x{w} pixels at {s} pixels per token)")
  z = unpatchify(tokens_btd, h, w, cfg.patch_size)
  z = z / cfg.scaling_factor + cfg.shift_factor
  return vae.decode(z)


def token_encoder(vae: AutoencoderKL) -> tuple[Callable[[Any, Array], Array], dict]:
  """(encode(vae_params, images) -> tokens, vae_params): a pure function and the frozen VAE's
  parameters as a pure dict, for a train step that encodes pixels on the fly (the VAE's
  parameters are passed in, not closed over, so they are not baked into the compiled step)."""
  graphdef, state = nnx.split(vae)
  params = nnx.to_pure_dict(state)

  def encode(vae_params: Any, images_bhwc: Array) -> Array:
    return encode_tokens(nnx.merge(graphdef, vae_params), images_bhwc)

  return encode, params


def token_decoder(vae: AutoencoderKL) -> tuple[Callable[[Any, Array, int, int], Array], dict]:
  """(decode(vae_params, tokens, h, w) -> images, vae_params), the sampler's counterpart of
  ``token_encoder`` (``h``, ``w`` must be static under jit)."""
  graphdef, state = nnx.split(vae)
  params = nnx.to_pure_dict(state)

  def decode(vae_params: Any, tokens_btd: Array, h: int, w: int) -> Array:
    return decode_tokens(nnx.merge(graphdef, vae_params), tokens_btd, h, w)

  return decode, params


def make_encode_fn(vae: AutoencoderKL) -> Callable[[Array], Array]:
  """A jitted images -> tokens function over a frozen copy of the VAE's parameters."""
  graphdef, state = nnx.split(vae)

  @jax.jit
  def fn(state, images):
    return encode_tokens(nnx.merge(graphdef, state), images)

  return lambda images: fn(state, images)


def pixel_encoder(vae: AutoencoderKL, devices: Sequence[jax.Device] | None = None
                  ) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 images (B, H, W, 3) -> float32 patch tokens (B, H/s, W/s, d) (s = pixels per token):
  ``encode_tokens`` of the pixels in [-1, 1] (``batch.from_uint8``), the posterior mean, jitted
  (once per image shape), the batch split over `devices` (default: this process's local devices;
  padded to a multiple of their count) and the VAE's parameters replicated on them."""
  cfg = vae.config
  devices = list(devices or jax.local_devices())
  mesh = Mesh(np.asarray(devices), ("batch",))
  rows = NamedSharding(mesh, PartitionSpec("batch"))
  replicated = NamedSharding(mesh, PartitionSpec())
  graphdef, state = nnx.split(vae)
  state = jax.device_put(state, replicated)

  @jax.jit
  def fn(state, images_u8):
    x = images_u8.astype(jnp.float32) / 127.5 - 1.0   # batch.from_uint8, on the devices
    return encode_tokens(nnx.merge(graphdef, state), x)

  def encode(images_u8: np.ndarray) -> np.ndarray:
    b, height, width = images_u8.shape[:3]
    h, w = token_grid(cfg, height, width)
    x = np.asarray(images_u8, np.uint8)
    pad = -b % len(devices)
    if pad:
      x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    tokens = fn(state, jax.device_put(x, rows))   # (B + pad, T, d)
    return np.asarray(tokens, np.float32)[:b].reshape(b, h, w, cfg.token_dim)

  return encode


def vae_identity(vae: AutoencoderKL) -> dict[str, Any]:
  """What names a VAE: its config and the SHA-256 of its parameters (each leaf's path, dtype,
  shape and bytes, in tree order)."""
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(vae, nnx.Param)))
  for path, leaf in leaves:
    arr = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)} {arr.dtype} {arr.shape}".encode())
    digest.update(np.ascontiguousarray(arr).tobytes())
  return {"config": vae.config.to_dict(), "weights_sha256": digest.hexdigest()}


def _check_dataset(vae: AutoencoderKL, images: np.ndarray) -> None:
  cfg = vae.config
  validate_images(images, cfg, cfg.pixels_per_token, "dataset images")


def latent_stats(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 100) -> dict[str, Any]:
  """Statistics of the latents over a dataset (float64 accumulation).

  token_*: per token dimension (d values) of the tokens the transformer sees;
  channel_*: per latent channel (C values) of the same (scaled, normalised) latent;
  raw_channel_*: per channel of the encoder's raw posterior mean (before the token norm), what
    one would use to choose scaling/shift factors without the norm;
  token_mean_abs_max / token_var_range: the largest |per-token mean| and the range of per-token
    variances (0 and [1, 1] up to eps when the token norm is on).
  """
  _check_dataset(vae, images)
  cfg = vae.config
  encode = make_encode_fn(vae)
  graphdef, state = nnx.split(vae)
  raw_fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_raw_moments(x)[0])
  p, c = cfg.patch_size, cfg.latent_channels
  sums = {k: 0.0 for k in ("tok", "tok2", "raw", "raw2")}
  count = 0
  mean_abs_max, var_lo, var_hi = 0.0, np.inf, -np.inf
  for real, chunk in padded_chunks(images, batch_size):
    tok = np.asarray(encode(jnp.asarray(chunk)), np.float64)[:real]  # (b, T, d)
    raw = np.asarray(raw_fn(state, jnp.asarray(chunk)), np.float64)[:real]  # (b, h, w, C)
    sums["tok"] = sums["tok"] + tok.sum(axis=(0, 1))
    sums["tok2"] = sums["tok2"] + np.square(tok).sum(axis=(0, 1))
    sums["raw"] = sums["raw"] + raw.sum(axis=(0, 1, 2))
    sums["raw2"] = sums["raw2"] + np.square(raw).sum(axis=(0, 1, 2))
    count += tok.shape[0] * tok.shape[1]
    mean_abs_max = max(mean_abs_max, float(np.abs(tok.mean(-1)).max()))
    v = tok.var(-1)
    var_lo, var_hi = min(var_lo, float(v.min())), max(var_hi, float(v.max()))
  tok_mean = sums["tok"] / count
  tok_std = np.sqrt(np.maximum(sums["tok2"] / count - tok_mean ** 2, 0.0))
  # token dim index = ch * p*p + pi * p + pj: a channel's values are p*p consecutive dims
  ch_mean = tok_mean.reshape(c, p * p).mean(-1)
  ch_sq = (sums["tok2"] / count).reshape(c, p * p).mean(-1)
  ch_std = np.sqrt(np.maximum(ch_sq - ch_mean ** 2, 0.0))
  n_raw = count * p * p
  raw_mean = sums["raw"] / n_raw
  raw_std = np.sqrt(np.maximum(sums["raw2"] / n_raw - raw_mean ** 2, 0.0))
  return {
      "num_images": int(len(images)), "num_tokens": int(count), "token_dim": cfg.token_dim,
      "token_mean": tok_mean.tolist(), "token_std": tok_std.tolist(),
      "channel_mean": ch_mean.tolist(), "channel_std": ch_std.tolist(),
      "raw_channel_mean": raw_mean.tolist(), "raw_channel_std": raw_std.tolist(),
      "token_mean_abs_max": mean_abs_max, "token_var_range": [var_lo, var_hi],
      "token_norm": cfg.token_norm,
  }
