"""Compile the real train step for a TPU topology on this (CPU) host and say whether it fits in HBM.

``python -m nextstep_jax.aot --config=configs/stage2.py --topology=v5p-64 [--num_slices=2] [--config.x=..]``

The library: ``nextstep_jax/training/aot.py`` (its docstring says how the verdict and the memory
figures are obtained).
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import flags
from ml_collections import config_flags

from nextstep_jax import cli
from nextstep_jax.training import aot


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  topo = aot.parse_topology(f.topology, f.num_slices)
  devices = aot.topology_devices(topo)
  config = aot.prepare_config(f.config, topo, rows_per_device=f.rows_per_device)
  result = aot.compile_train_step(config, devices, topology_name=topo.name + (
      f" x {topo.num_slices} slices" if topo.num_slices > 1 else ""), hbm_bytes=topo.spec.hbm_bytes,
      num_slices=topo.num_slices, dump_dir=f.dump_dir or None)
  print(aot.format_result(result), flush=True)
  if f.json:
    with open(f.json, "a", encoding="utf-8") as out:
      name = config_flags.get_config_filename(f["config"])
      out.write(json.dumps(dict(dataclasses.asdict(result), verdict=result.verdict(), config=name)) + "\n")


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/<name>.py)", lock_config=True)
  flags.DEFINE_string("topology", "v5p-64", "TPU topology: v5p-64, v5p-256, v5e-16, v6e-64, v4-32, ...")
  flags.DEFINE_integer("num_slices", 1, "slices joined by DCN (config.mesh.dcn_axes sets the DCN mesh)")
  flags.DEFINE_integer("rows_per_device", 0, "0: the config's global batch as shipped, with the micro-batch "
                       "and accumulation it derives for the mesh; N > 0: N rows of data.seq_len per "
                       "data-parallel device instead")
  flags.DEFINE_string("dump_dir", "", "keep XLA's dump (optimized HLO, memory-usage report) here")
  flags.DEFINE_string("json", "", "append the result as one JSON line to this file")
  flags.mark_flags_as_required(["config"])
  cli.run(main)
