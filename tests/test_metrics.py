"""Metrics: JSONL + TensorBoard + console from process 0 only; images as TB and PNG."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from nextstep_jax.training.metrics import MetricsWriter, StepTimer, image_grid, read_jsonl


def test_scalars_go_to_jsonl_tensorboard_and_console(tmp_path, capsys):
  w = MetricsWriter(tmp_path, process_index=0, console_every=10)
  w.write_scalars(10, {"loss": jnp.float32(1.5), "ce": 3.25, "fm": np.float32(0.75),
                       "grad_norm": 0.5, "lr": 1e-3, "step_time": 0.125, "tokens_per_s": 12345.0,
                       "mfu": 0.4})
  w.write_scalars(11, {"loss": 1.25})
  w.close()
  records = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [10, 11]
  assert records[0]["loss"] == 1.5 and records[0]["fm"] == 0.75 and records[1]["loss"] == 1.25
  assert records[0]["lr"] == pytest.approx(1e-3)
  events = os.listdir(tmp_path / "tensorboard")
  assert any(e.startswith("events.out.tfevents") for e in events)
  assert os.path.getsize(os.path.join(tmp_path / "tensorboard", events[0])) > 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out == ["step 10 | loss 1.5000 | ce 3.2500 | fm 0.7500 | grad_norm 0.5000 | lr 1.000e-03"
                 " | 0.125 s/step | 12,345 tok/s | mfu 0.4000"]  # step 11 is not a console step


def test_jsonl_appends_across_writers(tmp_path):
  with MetricsWriter(tmp_path, process_index=0) as w:
    w.write_scalars(1, {"loss": 2.0})
  with MetricsWriter(tmp_path, process_index=0) as w:
    w.write_scalars(2, {"loss": 1.0})
  assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_other_processes_write_nothing(tmp_path, capsys):
  w = MetricsWriter(tmp_path / "p1", process_index=1)
  w.write_scalars(1, {"loss": 1.0})
  assert w.write_images(1, "samples", np.zeros((4, 4, 3), np.uint8)) is None
  w.close()
  assert not os.path.exists(tmp_path / "p1")
  assert capsys.readouterr().out == ""


def test_write_images(tmp_path):
  imgs = np.stack([np.full((8, 6, 3), 40 * i, np.uint8) for i in range(5)])
  with MetricsWriter(tmp_path, process_index=0) as w:
    path = w.write_images(200, "samples/t2i", imgs)
    gray = w.write_images(200, "single", np.full((5, 7), 9, np.uint8))
  assert os.path.basename(path) == "samples_t2i_00000200.png"
  grid = np.asarray(Image.open(path))
  assert grid.shape == (16, 18, 3)  # 5 images -> 3 columns x 2 rows
  np.testing.assert_array_equal(grid[8:16, 6:12], 160)  # image 4 at row 1, col 1
  np.testing.assert_array_equal(grid[8:16, 12:18], 0)   # empty cell
  assert np.asarray(Image.open(gray)).shape == (5, 7)
  with pytest.raises(TypeError, match="uint8"):
    image_grid(np.zeros((2, 2, 3), np.float32))


def test_step_timer():
  t = StepTimer()
  m = t.lap(steps=10, tokens=1000)
  assert m["step_time"] > 0 and m["tokens_per_s"] > 0
  assert m["tokens_per_s"] == pytest.approx(1000 / (m["step_time"] * 10))
