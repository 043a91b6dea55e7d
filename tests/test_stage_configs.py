"""The headline command as shipped: stage configs ask for their inputs first, run at tiny size with one
config argument, keep the paper's global batch with a derived micro-batch and accumulation, and compile
for a TPU topology as shipped (at reduced depth)."""

import os
import subprocess
import sys

import pytest

from configs import common, stage2
from nextstep_jax import config as config_lib
from nextstep_jax.training import aot, loop
from tests.runs import make_base_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stage2_without_paths_names_tokenizer_path_first(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "nextstep_jax.train", "--config=configs/stage2.py",
                         f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ))
  assert proc.returncode != 0
  assert "tokenizer.path" in proc.stderr and "--config.tokenizer.path=" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "Vocabulary size too high" not in proc.stderr + proc.stdout
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_check_paths_names_each_missing_input_with_its_override():
  c = stage2.get_config()
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, num_devices=32)
  text = str(e.value)
  assert "tokenizer.path is empty" in text and "data.source is empty" in text
  with c.unlocked():
    c.tokenizer.path, c.data.source, c.data.payload = "tok.json", "gs://bucket/records", "images"
  with pytest.raises(config_lib.ConfigError, match=r"vae.checkpoint is empty.*--config.vae.checkpoint="):
    config_lib.check_paths(c)
  with c.unlocked():
    c.vae.checkpoint = "runs/vae"
  config_lib.check_paths(c)


@pytest.mark.parametrize("devices, accum", [(32, 12), (128, 3), (64, 6), (8, 48)])
def test_stage2_keeps_the_global_batch_and_derives_the_accumulation(devices, accum):
  c = stage2.get_config()
  assert c.data.batch_size == common.STAGE_BATCH_ROWS["stage2"] == 384
  config_lib.validate(c, num_devices=devices, paths=False)
  assert config_lib.batch_plan(c, devices) == (1, accum)  # 1 row per device x accum x devices = 384


def test_batch_plan_refuses_what_does_not_divide_naming_the_numbers():
  c = stage2.get_config()
  with pytest.raises(config_lib.ConfigError, match=r"data.batch_size=384 is not divisible by the data-parallel "
                                                   r"size data\*fsdp=1\*7=7"):
    config_lib.validate(c, num_devices=7, paths=False)
  with pytest.raises(config_lib.ConfigError, match=r"data.batch_size=384 is not a multiple of .* = 1 \* 7 = 7"):
    config_lib.batch_plan(c, 7)
  with c.unlocked():
    c.data.micro_batch_per_device = 5
  with pytest.raises(config_lib.ConfigError, match=r"5 \* 32 = 160"):
    config_lib.batch_plan(c, 32)
  with c.unlocked():
    c.optim.grad_accum = 5           # explicit: 384 / 5 does not divide
  with pytest.raises(config_lib.ConfigError, match="not divisible by optim.grad_accum=5"):
    config_lib.validate(c, num_devices=32, paths=False)
  with c.unlocked():
    c.optim.grad_accum = 4           # 96 rows per micro-batch over 32 devices: 3 each
  assert config_lib.batch_plan(c, 32) == (3, 4)


def test_tiny_stage2_trains_three_steps_on_the_digits(tmp_path):
  c = stage2.get_config("tiny")
  assert c.model.preset == "tiny" and c.model.num_layers == 4 and c.data.source == "digits"
  assert dict(c.data.ratios) == dict(common.STAGES["stage2"]["ratios"])
  base, _ = make_base_run(str(tmp_path / "base"), c)
  with c.unlocked():
    c.vae.checkpoint = os.path.join(base, "vae")
    c.steps, c.eval_every = 3, 3
    c.workdir = str(tmp_path / "run")
  last = loop.train(c, c.workdir)
  assert set(("loss", "ce", "fm")) <= set(last) and all(v == v for v in last.values())
  assert sorted(int(s) for s in os.listdir(os.path.join(c.workdir, "checkpoints")) if s.isdigit())[-1] == 3


@pytest.mark.aot
@pytest.mark.slow
@pytest.mark.skipif(not aot.libtpu_available(), reason='needs libtpu (pip install "jax[tpu]")')
def test_shipped_stage2_compiles_for_v5p_64_at_reduced_depth():
  c = stage2.get_config()
  with c.unlocked():
    c.model.num_layers = 2        # the shipped widths, batch, sequence and head; 2 of the 48 layers
  topo = aot.parse_topology("v5p-64")
  config = aot.prepare_config(c, topo)
  assert config.data.batch_size == 384 and config.data.seq_len == 16384
  r = aot.compile_train_step(config, aot.topology_devices(topo), topology_name="v5p-64",
                             hbm_bytes=topo.spec.hbm_bytes)
  text = aot.format_result(r)
  assert r.fits, text
  assert (r.micro_batch_per_device, r.grad_accum) == (1, 12), text
  assert "12 micro-batch(es) of 1 row(s) per data-parallel device" in text
  assert 0 < r.total_bytes < topo.spec.hbm_bytes
