"""The VAE trainer's optional adversarial critic (``train.adv_weight`` > 0), trained from scratch."""

from __future__ import annotations

import jax
from flax import nnx

from nextstep_jax.models.vae import Conv, GroupNorm


class PatchDiscriminator(nnx.Module):
  """Small PatchGAN: two stride-2 4x4 convs (LeakyReLU 0.2, GroupNorm), then 3x3 conv to logits."""

  def __init__(self, in_ch: int, ch: int, *, rngs: nnx.Rngs):
    self.c1 = Conv(in_ch, ch, 4, stride=2, padding=((1, 1), (1, 1)), rngs=rngs)
    self.c2 = Conv(ch, 2 * ch, 4, stride=2, padding=((1, 1), (1, 1)), rngs=rngs)
    self.n2 = GroupNorm(2 * ch, min(32, 2 * ch), 1e-6)
    self.c3 = Conv(2 * ch, 1, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.leaky_relu(self.c1(x), 0.2)
    h = jax.nn.leaky_relu(self.n2(self.c2(h)), 0.2)
    return self.c3(h)
