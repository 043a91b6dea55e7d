"""Per-device memory of the 14B sampler (configs/stage2.py: Qwen2.5-14B backbone, base head, bf16 weights)
compiled for a v5p-8 slice and for one 8 x H200 node from this CPU host: the prefill, one KV-cached decode
step and one head integration (50 SDE steps) of ``nextstep_jax/sampling/aot.py``.

  python benchmarks/aot_sampler.py --targets=v5p-8            # needs libtpu (requirements-test.txt has it)
  python benchmarks/aot_sampler.py --targets=8xh200           # needs the CUDA plugin (see benchmarks/aot_gpu.py)
  python benchmarks/aot_sampler.py --targets=v5p-8 --images=1,16 --size=512
  python benchmarks/aot_sampler.py --targets=v5p-8 --images=1 --programs=sample   # the whole sampler

Rows: 2 per image (the caption and the negative prompt), a 256-position prompt, 512 x 512 images (1024 tokens).
Mesh: tensor parallelism over every device of the target (heads, kv heads, MLP and vocabulary split; the
head's MLP too), batch rows unsharded. Prints one line per program and the table; never asserts.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nextstep_jax import overrides  # noqa: E402
from nextstep_jax.sampling import aot as sampler_aot  # noqa: E402

GiB = 1024 ** 3


def target_devices(name: str):
  """(devices, HBM bytes per device, label) of 'v5p-8'-style TPU names or '8xh200' / '8xh100' GPU nodes."""
  if "x" in name and name.split("x", 1)[0].isdigit():
    from nextstep_jax.training import aot_gpu  # pylint: disable=import-outside-toplevel
    count, kind = name.split("x", 1)
    return aot_gpu.gpu_node_devices(kind, int(count)), aot_gpu.gpu_spec(kind).hbm_bytes, aot_gpu.node_name(kind, int(count))
  from nextstep_jax.training import aot  # pylint: disable=import-outside-toplevel
  topo = aot.parse_topology(name)
  return aot.topology_devices(topo), topo.spec.hbm_bytes, topo.name


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--targets", default="v5p-8", help="comma-separated: v5p-8, v5p-16, 8xh200, 8xh100, ...")
  p.add_argument("--config", default="configs/stage2.py")
  p.add_argument("--images", default="1,16", help="images sampled at once (2 rows each)")
  p.add_argument("--size", type=int, default=512, help="image side in pixels (16 per token)")
  p.add_argument("--prompt_len", type=int, default=256)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--programs", default=",".join(sampler_aot.PROGRAMS),
                 help=f"comma-separated, of {', '.join(sampler_aot.PROGRAMS + (sampler_aot.WHOLE,))} ("
                      f"{sampler_aot.WHOLE}: the whole sampler in one program, what a call holds at once)")
  a = p.parse_args()
  rows = []
  for target in filter(None, a.targets.split(",")):
    devices, hbm, label = target_devices(target.strip())
    config = sampler_aot.sampling_config(overrides.load_config(a.config), a.dtype)
    with config.unlocked():
      config.mesh.axes.data, config.mesh.axes.fsdp, config.mesh.axes.tensor = 1, 1, -1
    for images in (int(x) for x in a.images.split(",")):
      for r in sampler_aot.compile_sampler(config, devices, target=label, hbm_bytes=hbm, rows=2 * images,
                                           prompt_len=a.prompt_len, image_tokens=(a.size // 16) ** 2,
                                           steps=a.steps, programs=tuple(filter(None, a.programs.split(",")))):
        print(f"{r.target} {r.mesh} images={images} {r.program}: params {r.params_bytes / GiB:.2f} GiB, "
              f"cache {r.cache_bytes / GiB:.2f} GiB, scratch {(r.temp_bytes or 0) / GiB:.3f} GiB, report "
              f"{'n/a' if r.total_bytes is None else f'{r.total_bytes / GiB:.2f} GiB'}, compiled in "
              f"{r.compile_s:.1f} s -> {r.verdict()}", flush=True)
        rows.append((images, r))
  print()
  print("| target | mesh | images (rows) | program | params / device | KV cache / device | scratch | "
        "resident / HBM |")
  print("|---|---|---|---|---|---|---|---|")
  for images, r in rows:
    print(f"| {r.target} | {r.mesh} | {images} ({r.rows}) | {r.program} | {r.params_bytes / GiB:.2f} GiB | "
          f"{r.cache_bytes / GiB:.2f} GiB | {(r.temp_bytes or 0) / GiB:.3f} GiB | "
          f"{r.resident_bytes / GiB:.2f} of {r.hbm_bytes / GiB:.0f} GiB ({100 * r.resident_bytes / r.hbm_bytes:.0f}%) |")


if __name__ == "__main__":
  main()
