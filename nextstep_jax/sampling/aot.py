"""The sampler's programs compiled ahead of time for a TPU topology or a GPU node from this (CPU) host, and
the bytes each takes per device (``benchmarks/aot_sampler.py`` prints the table).

Three programs make a sample (``sampling/sampler.py``): the prefill of the prompt rows into a fresh KV
cache, one KV-cached decode step (an image token in-projected and fed back into every row; the cache
donated), and one head integration (the condition out-projected, then the SDE of ``steps`` guided head
evaluations for one token), each reading the weights as the sampling commands hold them: laid out once
for the sampler (``layout.sampler_weights``: one array per layer and per head block, the head's adaLN
projections fused), so no program holds a second copy. Each is lowered on abstract inputs under the
mesh, the params placed by the config's logical rules (``run.param_target``, each layer's weights as its
stacked weight less the layers axis) and the cache's kv heads over ``tensor``, and compiled by the
target's compiler; nothing runs and no weight is allocated. ``WHOLE`` is the whole sampler as one program
(what one call holds at once). Bytes per device: the params as placed and the
KV cache (from their shardings), each program's scratch (``memory_analysis().temp_size_in_bytes``) and the
memory-usage report's "Total bytes" (the buffers the program itself allocates: the params it reads, not the
ones it prunes). A device holds every param and the cache throughout, so the verdict compares
params + cache + the program's scratch with the chip's memory.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from nextstep_jax import parallel
from nextstep_jax import run as run_lib
from nextstep_jax.models import nextstep as ns
from nextstep_jax.sampling import layout
from nextstep_jax.sampling.flow import eval_grid, token_noise
from nextstep_jax.sampling.sampler import _sample_jit, draw_token  # pylint: disable=protected-access
from nextstep_jax.training import aot as aot_lib

GiB = 1024 ** 3
PROGRAMS = ("prefill", "decode_step", "head_sample")
# The whole sampler as one program (``sampler._sample_jit``: the prefill and every image token), for the
# figure of what a call holds at once; its compile takes about as long as the three above together.
WHOLE = "sample"


@dataclasses.dataclass
class SamplerAot:
  """One compiled program. Bytes are per device."""
  target: str
  program: str
  devices: int
  mesh: str
  rows: int
  prompt_len: int
  image_tokens: int
  steps: int
  params_bytes: int            # the model's params on one device, as placed (resident between programs)
  cache_bytes: int             # the KV cache of `rows` rows of prompt_len + image_tokens positions
  argument_bytes: int | None   # memory_analysis(): the arguments the program reads (unused params pruned)
  output_bytes: int | None
  alias_bytes: int | None
  temp_bytes: int | None       # the program's scratch
  total_bytes: int | None      # the memory-usage report's "Total bytes" (what the program allocates), if written
  hbm_bytes: int | None
  compile_s: float

  @property
  def resident_bytes(self) -> int:
    """What a device holds while this program runs: every param, the cache, and the program's scratch."""
    return self.params_bytes + self.cache_bytes + (self.temp_bytes or 0)

  def verdict(self) -> str:
    if not self.hbm_bytes:
      return "compiled"
    share = 100 * self.resident_bytes / self.hbm_bytes
    return f"{'fits' if self.resident_bytes <= self.hbm_bytes else 'DOES NOT FIT'} ({share:.0f}% of HBM)"


def sampling_config(config, dtype: str = "bfloat16"):
  """A copy of `config` for sampling: weights and compute in `dtype`, plain XLA attention (the cached
  decode step attends one query to the cache), no rematerialisation."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dtype = config.model.param_dtype = dtype
    config.model.attention = "xla"
    config.model.remat = "none"
  return config


def _programs(config, mesh, *, rows: int, prompt_len: int, image_tokens: int, steps: int, groups: int):
  """{name: (jitted fn, abstract args)} of the programs (``PROGRAMS`` and ``WHOLE``) on `mesh`."""
  graphdef = run_lib.abstract_model(config)[0]
  weights = layout.sampler_weights(nnx.merge(graphdef, run_lib.param_target(config, mesh)))  # abstract
  cfg = ns.NextStepConfig.from_config(config)
  c = cfg.backbone
  rules = config.mesh.rules
  sharded = lambda axes, shape: NamedSharding(mesh, parallel.logical_to_spec(axes, rules, shape=shape, mesh=mesh))
  sds = lambda shape, dtype, axes: jax.ShapeDtypeStruct(shape, dtype, sharding=sharded(axes, shape))
  act = jnp.dtype(c.dtype)
  length = prompt_len + image_tokens
  kv = (rows, length, c.num_kv_heads, c.head_dim)
  cache_axes = ("batch", "length", "kv_heads", "head_dim")
  cache = {"k": tuple(sds(kv, act, cache_axes) for _ in range(c.num_layers)),
           "v": tuple(sds(kv, act, cache_axes) for _ in range(c.num_layers)),
           "segments": sds((rows, length), jnp.int32, ("batch", "length")),
           "index": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharded((), ()))}
  cache_shardings = jax.tree.map(lambda s: s.sharding, cache)
  b = rows // groups

  # Each program lays the weights out as the sampler does (sampling/layout.py).
  def prefill(weights, tokens, mask):
    model = weights.model()
    fresh = layout.init_cache(c, rows, length)
    fresh = jax.tree.map(lambda x, sh: jax.lax.with_sharding_constraint(x, sh), fresh, cache_shardings)
    seg = mask.astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    hs, fresh = layout.decode(c, weights.decoder(model), model.backbone.embed(tokens), pos, seg, fresh)
    return hs[:, -1], fresh

  def decode_step(weights, cache, token, pos):
    model = weights.model()
    x_in = model.image_in(jnp.tile(token, (groups, 1)))[:, None]
    hs, cache = layout.decode(c, weights.decoder(model), x_in, pos[:, None], jnp.ones((rows, 1), jnp.int32),
                              cache)
    return hs[:, 0], cache

  def head_sample(weights, h_last, key, cfg_scale):
    model = weights.model()
    head = model.head
    x0, zs = token_noise(key, b, cfg.token_dim, steps, sde=True)
    return draw_token(weights.head(model), head.time_embed(eval_grid(steps, 1.0, True)),
                      head.cond_embed(model.image_out(h_last)), x0, zs, groups=groups, steps=steps, cfg=cfg_scale,
                      cfg_img=2.0, time_shift=1.0)

  tok_rows = sds((rows, prompt_len), jnp.int32, ("batch", "length"))
  hidden = sds((rows, c.hidden_size), act, ("batch", "embed"))

  def sample(weights, tokens, mask, key):  # an h x w grid costs what h * w tokens in one row do
    return _sample_jit(weights, tokens, mask, None, None, key, jnp.float32(7.5), jnp.float32(2.0), jnp.float32(1.0),
                       groups=groups, h=image_tokens, w=1, steps=steps, sde=True, use_norm=True,
                       cfg_schedule="constant", noise_repeat=0)

  scalar_key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sharded((), ()))
  return {
      WHOLE: (jax.jit(sample), (weights, tok_rows, sds((rows, prompt_len), jnp.bool_, ("batch", "length")),
                                scalar_key)),
      "prefill": (jax.jit(prefill, out_shardings=(hidden.sharding, cache_shardings)),
                  (weights, tok_rows, sds((rows, prompt_len), jnp.bool_, ("batch", "length")))),
      "decode_step": (jax.jit(decode_step, donate_argnums=(1,), out_shardings=(hidden.sharding, cache_shardings)),
                      (weights, cache, sds((b, cfg.token_dim), jnp.float32, ("batch", None)),
                       sds((rows,), jnp.int32, ("batch",)))),
      "head_sample": (jax.jit(head_sample),
                      (weights, hidden, scalar_key, jax.ShapeDtypeStruct((), jnp.float32, sharding=sharded((), ())))),
  }


def compile_sampler(config, devices: list[Any], *, target: str, hbm_bytes: int | None, rows: int = 2,
                    prompt_len: int = 256, image_tokens: int = 1024, steps: int = 50, groups: int = 2,
                    programs: tuple[str, ...] = PROGRAMS) -> list[SamplerAot]:
  """Compiles the sampler's programs of `config` (from ``sampling_config``) over `devices` with the mesh
  ``config.mesh`` names; `rows` = groups x images (2 rows for one guided image). `programs`: of
  ``PROGRAMS`` and ``WHOLE`` (the whole sampler in one program)."""
  mesh = parallel.make_mesh(config.mesh, devices)
  out = []
  with jax.set_mesh(mesh), parallel.activation_rules(config.mesh.rules):
    progs = _programs(config, mesh, rows=rows, prompt_len=prompt_len, image_tokens=image_tokens, steps=steps,
                      groups=groups)
    params_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(progs["prefill"][1][0]))
    cache_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(progs["decode_step"][1][1]))
    for name in programs:
      fn, args = progs[name]
      dump = tempfile.mkdtemp(prefix=f"nextstep_aot_{name}_")
      t0 = time.perf_counter()
      try:
        compiled = fn.lower(*args).compile(compiler_options={"xla_dump_to": dump})
        ma = compiled.memory_analysis()
        total = aot_lib.read_total_bytes(dump, name)
      finally:
        seconds = time.perf_counter() - t0
        shutil.rmtree(dump, ignore_errors=True)
      out.append(SamplerAot(
          target=target, program=name, devices=len(devices), mesh=parallel.describe(mesh, config.mesh), rows=rows,
          prompt_len=prompt_len, image_tokens=image_tokens, steps=steps, params_bytes=params_bytes,
          cache_bytes=cache_bytes,
          argument_bytes=None if ma is None else int(ma.argument_size_in_bytes),
          output_bytes=None if ma is None else int(ma.output_size_in_bytes),
          alias_bytes=None if ma is None else int(ma.alias_size_in_bytes),
          temp_bytes=None if ma is None else int(ma.temp_size_in_bytes), total_bytes=total, hbm_bytes=hbm_bytes,
          compile_s=seconds))
  return out


def _shard_bytes(s: jax.ShapeDtypeStruct) -> int:
  return math.prod(s.sharding.shard_shape(s.shape)) * jnp.dtype(s.dtype).itemsize
