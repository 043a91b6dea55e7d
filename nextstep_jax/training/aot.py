"""Compile the real train step for a TPU topology on this (CPU) host and say whether it fits in HBM
(``python -m nextstep_jax.aot --config=configs/stage2.py --topology=v5p-64 [--num_slices=2]`` is the
command line).

libtpu (``pip install "jax[tpu]"``, matching the installed jax) describes the chips of a named topology
(``jax.experimental.topologies.get_topology_desc``); the mesh is built over those compile-only devices
(``parallel.make_hybrid_mesh``: ``config.mesh.axes`` per slice, ``config.mesh.dcn_axes`` across slices),
``Trainer(config, mesh).step_fn`` -- the jitted step with its real in/out shardings and donation --
is lowered on abstract inputs and compiled by the TPU compiler. Nothing runs and no weight is allocated.

Verdict: the TPU compiler refuses a program that does not fit in HBM (``RESOURCE_EXHAUSTED``), so a compile
that succeeds fits. Memory per device comes from the memory-usage report XLA writes next to the dumped HLO
(its "Total bytes" is the allocation the runtime will make); ``memory_analysis()`` is printed beside it
(its temp figure runs a few GiB above the real allocation). When it does not fit, hints name the config
changes that cut memory (more FSDP, another remat policy, a smaller per-device batch, a CE chunk).

Batch: the config's global batch as shipped, split into the micro-batches and accumulation steps the
config derives for the mesh (``config.batch_plan``; printed). ``--rows_per_device=N`` sets
``data.batch_size`` to N rows per data-parallel shard (``data * fsdp`` devices) instead.
The latent path (``data.payload="image_tokens"``) is compiled; the pixel path needs a trained VAE.
On CPU the attention implementation is taken from the config; ``cudnn`` (the stage configs' default,
GPU only) is replaced by ``splash`` for TPU targets, ``auto`` resolves to ``splash``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
import time
from typing import Any

# libtpu takes a host-wide lock file when it loads (one TPU user per VM); compile-only use on a CPU host
# must not collide with other jax processes that load it too.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from nextstep_jax import config as config_lib  # pylint: disable=wrong-import-position

from nextstep_jax import overrides as overrides_lib  # pylint: disable=wrong-import-position
from nextstep_jax import parallel  # pylint: disable=wrong-import-position
from nextstep_jax.training import flops as flops_lib  # pylint: disable=wrong-import-position
from nextstep_jax.training.trainer import Trainer, count_params  # pylint: disable=wrong-import-position

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class TpuFamily:
  """A TPU generation: how its user-facing names map to libtpu topology names, and its chip."""
  prefix: str                       # libtpu topology prefix: "v5" in "v5:2x4x4"
  chip_config: str | None           # libtpu chip_config_name (None = default)
  host_bounds: tuple[int, int, int] | None  # chips_per_host_bounds (None: 2x2x1), clipped to the slice
  cores_per_chip_in_name: int       # v5p-64 counts TensorCores: 2 per chip; v5e-16 counts chips
  dims: int                         # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  hbm_bytes: int                    # per chip (one jax device per chip for every family here)
  device_kind: str                  # as jax names the device


FAMILIES: dict[str, TpuFamily] = {
    "v4": TpuFamily("v4", "megacore_dense", (2, 2, 1), 2, 3, 32 * GiB, "TPU v4"),
    "v5p": TpuFamily("v5", "megacore", (2, 2, 1), 2, 3, int(95.74 * GiB), "TPU v5"),
    "v5e": TpuFamily("v5e", None, None, 1, 2, 16 * GiB, "TPU v5 lite"),
    "v6e": TpuFamily("v6e", None, None, 1, 2, 32 * GiB, "TPU v6 lite"),
}

# Slice shapes (chips) of the standard sizes.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str               # user-facing, e.g. "v5p-64"
  family: str             # "v5p"
  libtpu_name: str        # "v5:2x4x4"
  chips: int              # per slice
  num_slices: int

  @property
  def spec(self) -> TpuFamily:
    return FAMILIES[self.family]

  @property
  def num_devices(self) -> int:
    return self.chips * self.num_slices


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """'v5p-64' / 'v5e-16' / 'v6e-64' / 'v4-32' (or a libtpu name such as 'v5:2x4x4') -> Topology."""
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices} must be >= 1")
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
  if m:
    family, count = m.group(1), int(m.group(2))
    spec = FAMILIES[family]
    if count % spec.cores_per_chip_in_name:
      raise ValueError(f"--topology={name}: {family} sizes count {spec.cores_per_chip_in_name} per chip")
    chips = count // spec.cores_per_chip_in_name
    shapes = _SHAPES_3D if spec.dims == 3 else _SHAPES_2D
    if chips not in shapes:
      sizes = sorted(n * spec.cores_per_chip_in_name for n in shapes)
      raise ValueError(f"--topology={name}: no standard {family} slice of {chips} chips; "
                       f"sizes: {', '.join(f'{family}-{s}' for s in sizes)}")
    libtpu = f"{spec.prefix}:" + "x".join(map(str, shapes[chips]))
    return Topology(name, family, libtpu, chips, num_slices)
  m = re.fullmatch(r"(v4|v5|v5e|v6e):(\d+(?:x\d+)+)", name.strip().lower())
  if m:
    family = {"v4": "v4", "v5": "v5p", "v5e": "v5e", "v6e": "v6e"}[m.group(1)]
    chips = math.prod(int(x) for x in m.group(2).split("x"))
    return Topology(name, family, name, chips, num_slices)
  raise ValueError(f"--topology={name!r}: expected e.g. v5p-64, v5p-256, v5e-16, v6e-64, v4-32 "
                   "(or a libtpu name such as v5:2x4x4)")


def topology_devices(topo: Topology) -> list[Any]:
  """Compile-only devices of the topology (needs libtpu: pip install "jax[tpu]")."""
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - jax always ships it
    raise RuntimeError(f"jax.experimental.topologies is unavailable: {e}") from e
  spec = topo.spec
  kwargs: dict[str, Any] = dict(platform="tpu", topology_name=topo.libtpu_name, num_slices=topo.num_slices,
                                wrap=(False, False, False))
  if spec.chip_config:
    kwargs["chip_config_name"] = spec.chip_config
  # Chips per host: the family's default, clipped to the slice (a v5e-1 is one chip on one host).
  shape = [int(x) for x in topo.libtpu_name.split(":")[1].split("x")] + [1] * (3 - spec.dims)
  bounds = spec.host_bounds or (2, 2, 1)
  kwargs["chips_per_host_bounds"] = tuple(min(b, s) for b, s in zip(bounds, shape))
  try:
    desc = topologies.get_topology_desc(**kwargs)
  except Exception as e:  # libtpu missing or a name it rejects
    raise RuntimeError(f"cannot describe TPU topology {topo.name} ({topo.libtpu_name}): {e} (compiling for "
                       "TPU on this host needs libtpu: pip install \"jax[tpu]\", the version matching "
                       "jax)") from e
  return list(desc.devices)


def libtpu_available() -> bool:
  """True when libtpu can describe a small topology here (AOT for TPU works)."""
  try:
    topology_devices(parse_topology("v5p-8"))
    return True
  except RuntimeError:
    return False


# ------------------------------------------------------------------------------------------------
# The compile
# ------------------------------------------------------------------------------------------------
def prepare_config(config, topo: Topology | None = None, rows_per_device: int = 0,
                   devices: list[Any] | None = None):
  """A copy of `config` set up for an AOT compile: TPU attention, validated (not its data paths). The
  global batch stays as shipped (`rows_per_device` 0), with the micro-batch and accumulation the config
  derives for this mesh (``config.batch_plan``); `rows_per_device` > 0 replaces the global batch by that
  many rows per data-parallel device instead."""
  config = config.copy_and_resolve_references()
  num_devices = topo.num_devices if topo is not None else len(devices or jax.devices())
  overrides: dict[str, Any] = {}
  if topo is not None and config.model.attention in ("cudnn", "auto"):
    overrides["model.attention"] = "splash"
  if rows_per_device > 0:
    granules = topo.num_slices if topo is not None else 1
    dcn = parallel._axes_of(config.mesh, "dcn_axes")  # pylint: disable=protected-access
    _, _, sizes = parallel.resolve_hybrid_axes(dict(config.mesh.axes), dcn, num_devices, granules)
    overrides["data.batch_size"] = rows_per_device * sizes["data"] * sizes["fsdp"]
  if config.data.payload != "image_tokens":
    raise config_lib.UserError("nextstep_jax.aot compiles the latent path: set --config.data.payload=image_tokens "
                     f"(got {config.data.payload!r}; the pixel path needs a trained VAE checkpoint)")
  overrides_lib.apply_overrides(config, overrides)
  config_lib.validate(config, num_devices=num_devices,
                      num_granules=topo.num_slices if topo is not None else None, paths=False)
  return config


def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of one global batch (nextstep_jax/batch.py, latent path) with its sharding."""
  b, seq = int(config.data.batch_size), int(config.data.seq_len)
  m, d = int(config.data.max_row_image_tokens), int(config.image.token_dim)
  sharding = parallel.data_sharding(mesh)
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  batch = {k: sds((b, seq), jnp.int32) for k in ("tokens", "targets", "segment_ids", "positions", "image_index")}
  batch["fm_mask"] = sds((b, seq), jnp.float32)
  batch["image_tokens"] = sds((b, m, d), jnp.float32)
  batch["num_images"] = sds((b,), jnp.int32)
  return batch


@dataclasses.dataclass
class AotResult:
  """What one compile found. Bytes are per device."""
  topology: str
  devices: int
  device_kind: str
  mesh: str
  remat: str
  attention: str
  batch_size: int
  seq_len: int
  num_layers: int
  params: int
  lower_s: float
  compile_s: float
  fits: bool
  hbm_bytes: int | None
  total_bytes: int | None = None         # memory-usage report "Total bytes" (the real allocation)
  argument_bytes: int | None = None      # memory_analysis(): parameters, optimizer state, batch
  output_bytes: int | None = None
  alias_bytes: int | None = None
  temp_bytes: int | None = None
  analysis_peak_bytes: int | None = None  # argument + output - alias + temp
  step_tflops: float = 0.0
  micro_batch_per_device: int = 0        # rows per data-parallel device in each micro-batch
  grad_accum: int = 1                    # micro-batches per update (config.batch_plan)
  error: str = ""
  hints: list[str] = dataclasses.field(default_factory=list)

  @property
  def peak_bytes(self) -> int | None:
    return self.total_bytes if self.total_bytes is not None else self.analysis_peak_bytes

  def verdict(self) -> str:
    if not self.fits:
      return "DOES NOT FIT"
    if self.hbm_bytes and self.peak_bytes:
      return f"fits ({100 * self.peak_bytes / self.hbm_bytes:.0f}% of HBM)"
    return "fits"


_TOTAL_RE = re.compile(r"Total bytes:\s*(\d+)")


def read_total_bytes(dump_dir: str, program: str = "train_step") -> int | None:
  """'Total bytes' of the default memory space in the memory-usage report XLA dumped for `program` (the
  jitted function's name), or None."""
  best = None
  for name in sorted(os.listdir(dump_dir)):
    if program in name and name.endswith("memory-usage-report.txt"):
      with open(os.path.join(dump_dir, name), encoding="utf-8") as f:
        m = _TOTAL_RE.search(f.read())
      if m:
        best = int(m.group(1))
  return best


def hints_for(config, mesh, result: AotResult) -> list[str]:
  """Config changes that cut per-device memory, most effective first."""
  sizes = dict(mesh.shape)
  hints = []
  n = math.prod(sizes.values())
  if sizes.get("fsdp", 1) < n // max(sizes.get("tensor", 1), 1):
    hints.append("shard parameters and optimizer state over more devices: --config.mesh.axes.fsdp=-1 "
                 "--config.mesh.axes.data=1 (FSDP over every device of the slice)")
  if config.model.remat != "full":
    hints.append(f"rematerialise more: --config.model.remat=full (now {config.model.remat!r})")
  rows_per_shard = int(config.data.batch_size) // max(sizes.get("data", 1) * sizes.get("fsdp", 1), 1)
  if rows_per_shard > 1:
    hints.append(f"a smaller per-device batch: --rows_per_device={rows_per_shard // 2} (now {rows_per_shard}), "
                 "with gradient accumulation or more devices for the same global batch")
  else:
    hints.append(f"shorter rows per device: --config.data.seq_len={int(config.data.seq_len) // 2} (or tensor "
                 "parallelism: --config.mesh.axes.tensor=2, which splits heads and MLP and halves "
                 "activations per device)")
  chunk = int(config.loss.ce_chunk)
  if chunk == 0 or chunk > 1024:
    hints.append(f"compute the LM head and CE in chunks: --config.loss.ce_chunk=1024 (now {chunk})")
  if int(config.head.batch_mul) > 1:
    hints.append(f"the FM head runs on {config.head.batch_mul}x the image tokens: a lighter head preset "
                 "or a smaller head.batch_mul cuts its activations")
  hints.append("more chips: a larger topology or --num_slices=2 with --config.mesh.dcn_axes")
  del result
  return hints


def compile_train_step(config, devices: list[Any], *, topology_name: str = "", hbm_bytes: int | None = None,
                       num_slices: int = 1, dump_dir: str | None = None) -> AotResult:
  """Lowers and compiles ``Trainer(config, mesh).step_fn`` over `devices`; returns sizes and the verdict.

  `config` should come from ``prepare_config``. `dump_dir`: where XLA writes the optimized HLO and the
  memory-usage report (a temporary directory, removed afterwards, when None).
  """
  mesh = parallel.make_hybrid_mesh(config.mesh, devices,
                                      process_is_granule=None if num_slices > 1 else True)
  t0 = time.perf_counter()
  trainer = Trainer(config, mesh)
  state = parallel.with_shardings(trainer.abstract_state, trainer.state_shardings)
  batch = abstract_batch(config, mesh)
  lowered = trainer.step_fn.lower(state, batch)  # traced under the mesh (trainer.UnderMesh)
  lower_s = time.perf_counter() - t0
  result = AotResult(
      topology=topology_name, devices=len(devices), device_kind=str(devices[0].device_kind),
      mesh=parallel.describe(mesh, config.mesh), remat=str(config.model.remat),
      attention=str(config.model.attention), batch_size=int(config.data.batch_size),
      seq_len=int(config.data.seq_len), num_layers=int(config.model.num_layers),
      params=count_params(trainer.abstract_params), lower_s=lower_s, compile_s=0.0, fits=True,
      hbm_bytes=hbm_bytes, step_tflops=flops_lib.step_flops(config) / 1e12,
      micro_batch_per_device=config_lib.batch_plan(config, mesh.shape["data"] * mesh.shape["fsdp"])[0],
      grad_accum=trainer.grad_accum)
  own_dump = dump_dir is None
  dump_dir = dump_dir or tempfile.mkdtemp(prefix="nextstep_aot_")
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile(compiler_options={"xla_dump_to": dump_dir})
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
      raise
    result.compile_s = time.perf_counter() - t1
    result.fits = False
    result.error = text.strip().splitlines()[0][:2000] if text.strip() else "RESOURCE_EXHAUSTED"
    result.hints = hints_for(config, mesh, result)
    if own_dump:
      shutil.rmtree(dump_dir, ignore_errors=True)
    return result
  result.compile_s = time.perf_counter() - t1
  ma = compiled.memory_analysis()
  if ma is not None:
    result.argument_bytes = int(ma.argument_size_in_bytes)
    result.output_bytes = int(ma.output_size_in_bytes)
    result.alias_bytes = int(ma.alias_size_in_bytes)
    result.temp_bytes = int(ma.temp_size_in_bytes)
    result.analysis_peak_bytes = (result.argument_bytes + result.output_bytes - result.alias_bytes
                                  + result.temp_bytes)
  result.total_bytes = read_total_bytes(dump_dir)
  if own_dump:
    shutil.rmtree(dump_dir, ignore_errors=True)
  if hbm_bytes and result.peak_bytes and result.peak_bytes > hbm_bytes:
    # GPU targets never refuse: compare the bytes with the memory ourselves.
    result.fits = False
    result.error = f"{result.peak_bytes / GiB:.1f} GiB per device > {hbm_bytes / GiB:.1f} GiB HBM"
  if not result.fits or (hbm_bytes and result.peak_bytes and result.peak_bytes > 0.9 * hbm_bytes):
    result.hints = hints_for(config, mesh, result)
  return result


def format_result(r: AotResult) -> str:
  g = lambda b: "n/a" if b is None else f"{b / GiB:.2f} GiB"
  lines = [
      f"topology      {r.topology} ({r.devices} x {r.device_kind}), mesh {r.mesh}",
      f"model         {r.params / 1e9:.2f}B parameters, {r.num_layers} layers, remat={r.remat}, "
      f"attention={r.attention}",
      f"batch         {r.batch_size} rows x {r.seq_len} tokens (global) = {r.grad_accum} micro-batch(es) of "
      f"{r.micro_batch_per_device} row(s) per data-parallel device "
      f"({r.batch_size * r.seq_len // max(r.devices, 1)} tokens per device per update); "
      f"{r.step_tflops:.1f} TFLOP per step",
      f"lower         {r.lower_s:.1f} s; compile {r.compile_s:.1f} s",
  ]
  if r.fits:
    lines += [
        f"memory        {g(r.total_bytes)} per device (memory-usage report 'Total bytes') of "
        f"{g(r.hbm_bytes)} HBM",
        f"analysis      arguments {g(r.argument_bytes)}, outputs {g(r.output_bytes)} (aliased "
        f"{g(r.alias_bytes)}), temp {g(r.temp_bytes)}; peak estimate {g(r.analysis_peak_bytes)}",
    ]
  else:
    lines.append(f"error         {r.error}")
  lines.append(f"verdict       {r.verdict()}")
  for h in r.hints:
    lines.append(f"hint          {h}")
  return "\n".join(lines)
