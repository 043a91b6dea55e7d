"""Checkpoints: bitwise round trip into NamedShardings, retention, latest step, init_from;
integrity manifests, corrupt and unfinished steps, fallback to the newest readable step."""

import json
import logging
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common
from nextstep_jax import parallel as par
from nextstep_jax.training.data_state import decode_data_state, encode_data_state
from nextstep_jax.training.checkpoint import (Checkpointer, CorruptCheckpointError, check_integrity,
                                     read_step,
                                     restore_params_from, write_integrity)


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (tests/conftest.py sets 8 CPU devices)")
  return par.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:2])


class _Model(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.w_kernel = nnx.Param(jax.random.normal(rngs.params(), (8, 6)), axes=("embed", "mlp"))
    self.w_bias = nnx.Param(jax.random.normal(rngs.params(), (6,)).astype(jnp.bfloat16),
                            axes=("mlp",))
    self.norm_scale = nnx.Param(jax.random.uniform(rngs.params(), (8,)), axes=("embed",))


def _train_state(mesh, seed=0, step=7):
  """A train state like train.py's: params (nnx.State), an optimiser-like tree, a step."""
  params = nnx.state(_Model(nnx.Rngs(seed)), nnx.Param)
  sh = par.shardings_for(params, mesh, par.DEFAULT_RULES)
  params = jax.device_put(params, sh)
  mu = jax.tree.map(lambda x: x * 0.5, params)
  rep = NamedSharding(mesh, P())
  return {"params": params, "opt": {"mu": mu, "count": jax.device_put(jnp.int32(step), rep)},
          "step": jax.device_put(jnp.int32(step), rep)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_bitwise_equal(a, b):
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert x.sharding == y.sharding, (path, x.sharding, y.sharding)
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8), err_msg=str(path))


@pytest.mark.parametrize("async_save", [False, True])
def test_relative_directories_work(mesh, tmp_path, monkeypatch, async_save):
  """README's commands pass relative work directories (--workdir=runs/demo); orbax wants absolute ones."""
  monkeypatch.chdir(tmp_path)
  state = _train_state(mesh)
  ckpt = Checkpointer(os.path.join("runs", "x", "checkpoints"), every=1, keep=2, async_save=async_save)
  assert ckpt.directory.is_absolute()
  assert ckpt.save(3, state, data_state={"i": 1})
  ckpt.wait()
  step, restored, data = ckpt.restore_latest_good(_abstract(state))
  ckpt.close()
  assert step == 3 and data == {"i": 1}
  _assert_bitwise_equal(restored, state)
  assert read_step(os.path.join("runs", "x", "checkpoints"))[0] == 3
  params = restore_params_from(os.path.join("runs", "x", "checkpoints"), _abstract(state["params"]))
  _assert_bitwise_equal(params, state["params"])


def test_read_only_loads_do_not_warn(mesh, tmp_path, caplog):
  state = _train_state(mesh)
  ckpt = Checkpointer(tmp_path / "c", every=1, keep=1, async_save=False)
  ckpt.save(1, state)
  ckpt.close()
  with caplog.at_level(logging.WARNING):
    assert read_step(tmp_path / "c")[0] == 1
    restore_params_from(tmp_path / "c", _abstract(state["params"]))
  assert not [r for r in caplog.records if "read_only" in r.getMessage() or "read only" in r.getMessage()]


def test_data_state_envelope():
  for s in (None, b"\x00\xff{json}", {"next_index": 5, "workers": [1, 2]}):
    env = encode_data_state(s)
    assert decode_data_state(json.loads(json.dumps(env))) == s
  with pytest.raises(TypeError, match="data_state"):
    encode_data_state([1, 2])


def test_round_trip_bitwise_with_shardings(mesh, tmp_path):
  state = _train_state(mesh)
  config = common.base_config()
  ckpt = Checkpointer(tmp_path / "ckpt", every=10, keep=3, async_save=True, config=config)
  assert ckpt.latest_step() is None
  assert ckpt.save(10, state, data_state=b"grain-bytes\x00")
  ckpt.wait()
  assert ckpt.latest_step() == 10
  restored, data_state = ckpt.restore(10, _abstract(state))
  _assert_bitwise_equal(restored, state)
  assert data_state == b"grain-bytes\x00"
  q = restored["params"]["w_kernel"].get_value()
  assert q.sharding.spec == P("fsdp", "tensor") and len(q.addressable_shards) == 2
  # Config provenance: in the directory and in the step.
  saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
  assert saved["optim"]["b2"] == 0.95 and saved["model"]["num_layers"] == config.model.num_layers
  ckpt.close()


def test_restore_into_other_shardings(mesh, tmp_path):
  state = _train_state(mesh)
  with Checkpointer(tmp_path, every=1, keep=1) as ckpt:
    ckpt.save(1, state, data_state={"pos": 3})
  rep = NamedSharding(mesh, P())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
  with Checkpointer(tmp_path, every=1, keep=1) as ckpt:
    restored, data_state = ckpt.restore(None, target)
  assert data_state == {"pos": 3}
  w = restored["params"]["w_kernel"].get_value()
  assert w.sharding.spec == P()
  np.testing.assert_array_equal(np.asarray(w), np.asarray(state["params"]["w_kernel"].get_value()))


def test_retention_latest_step_and_schedule(mesh, tmp_path):
  state = _train_state(mesh)
  ckpt = Checkpointer(tmp_path, every=2, keep=2)
  saved = [s for s in range(1, 8) if ckpt.save(s, state, data_state=None)]
  assert saved == [2, 4, 6]
  assert ckpt.save(7, state, force=True)
  assert not ckpt.save(7, state, force=True)  # never twice
  ckpt.wait()
  assert ckpt.all_steps() == [6, 7]
  assert ckpt.latest_step() == 7
  assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["6", "7"]
  _, data_state = ckpt.restore(7, _abstract(state))
  assert data_state is None
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 2"):
    ckpt.restore(2, _abstract(state))
  ckpt.close()
  # A new manager over the same directory resumes from there.
  again = Checkpointer(tmp_path, every=2, keep=2)
  assert again.latest_step() == 7
  again.close()


def test_init_from_reads_params_only(mesh, tmp_path):
  source = _train_state(mesh, seed=1, step=500)
  with Checkpointer(tmp_path / "stage1" / "checkpoints", every=100, keep=2) as ckpt:
    ckpt.save(400, _train_state(mesh, seed=2, step=400))
    ckpt.save(500, source)
  # A fresh run of the next stage: params come from the newest step, nothing else.
  abstract_params = _abstract(_train_state(mesh, seed=3)["params"])
  params = restore_params_from(tmp_path / "stage1" / "checkpoints", abstract_params)
  _assert_bitwise_equal(params, source["params"])
  # A step directory works too.
  older = restore_params_from(tmp_path / "stage1" / "checkpoints" / "400", abstract_params)
  _assert_bitwise_equal(older, _train_state(mesh, seed=2)["params"])
  # The target's dtype wins (e.g. reading fp32 masters as bf16).
  bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding),
                      abstract_params)
  cast = restore_params_from(tmp_path / "stage1" / "checkpoints", bf16)
  assert cast["w_kernel"].get_value().dtype == jnp.bfloat16
  with pytest.raises(FileNotFoundError, match="does not exist"):
    restore_params_from(tmp_path / "nowhere", abstract_params)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    restore_params_from(tmp_path / "empty", abstract_params)


def test_from_config(tmp_path):
  config = common.base_config()
  config.workdir = str(tmp_path / "run")
  config.checkpoint.every = 5
  ckpt = Checkpointer.from_config(config)
  assert str(ckpt.directory) == os.path.join(str(tmp_path / "run"), "checkpoints")
  assert ckpt.should_save(10) and not ckpt.should_save(11)
  ckpt.close()
  with pytest.raises(ValueError, match="checkpoint.every=0"):
    Checkpointer(tmp_path / "x", every=0, keep=1)


# ------------------------------------------------------------------------------------------
# Faults: integrity manifests, corrupt steps, fallback, unfinished saves, no pickle
# ------------------------------------------------------------------------------------------


def _array_files(step_dir):
  """The OCDBT data files of the state (``d/`` directories; small arrays live inline in the
  top-level b-tree files, larger ones in each process's data files)."""
  return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")


def _largest_array_file(step_dir):
  return max(_array_files(step_dir), key=lambda p: p.stat().st_size)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)


def _flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(path.stat().st_size // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0x5A]))


# (The filterwarnings marks below: orbax's reader leaves an asyncio callback behind when a
# restore raises; harmless.)


def _tree_bytes(root):
  return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _two_steps(mesh, directory, async_save=True):
  """Steps 2 and 4 of a run (different states), saved every 2 steps."""
  states = {2: _train_state(mesh, seed=2, step=2), 4: _train_state(mesh, seed=4, step=4)}
  with Checkpointer(directory, every=2, keep=3, async_save=async_save) as ckpt:
    for step, state in states.items():
      assert ckpt.save(step, state, data_state={"pos": step})
  return states


@pytest.mark.parametrize("async_save", [True, False])
def test_every_step_has_an_integrity_manifest(mesh, tmp_path, async_save):
  _two_steps(mesh, tmp_path, async_save)
  for step in (2, 4):
    manifest = json.loads((tmp_path / str(step) / "integrity.json").read_text())
    assert manifest["mode"] == "crc32"
    listed = set(manifest["files"])
    on_disk = {p.relative_to(tmp_path / str(step)).as_posix()
               for p in (tmp_path / str(step)).rglob("*") if p.is_file()}
    # Every array and iterator-state file is listed, with its size.
    assert {f for f in on_disk if "/d/" in f or f.startswith("data/process_")} <= listed
    for rel, entry in manifest["files"].items():
      assert (tmp_path / str(step) / rel).stat().st_size == entry["size"], rel
  assert check_integrity(tmp_path / "4") is None
  # No temporary manifest or unfinished save is left behind.
  assert not [p for p in tmp_path.rglob("*") if "partial" in p.name or "tmp" in p.name]


_CORRUPTIONS = {
  "truncated array file": lambda d: _truncate(_largest_array_file(d)),
  "flipped byte in an array file": lambda d: _flip_byte(_largest_array_file(d)),
  "missing state directory": lambda d: shutil.rmtree(d / "state"),
  "missing iterator state": lambda d: (d / "data" / "process_0-of-1.json").unlink(),
  "half-written step (no manifest, truncated files)": lambda d: (
    (d / "integrity.json").unlink(), [_truncate(p) for p in _array_files(d)]),
  "half-written step (empty directory)": lambda d: (shutil.rmtree(d), d.mkdir()),
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", list(_CORRUPTIONS))
def test_corrupt_newest_step_falls_back_to_previous(mesh, tmp_path, caplog, kind):
  states = _two_steps(mesh, tmp_path)
  good_before = _tree_bytes(tmp_path / "2")
  _CORRUPTIONS[kind](tmp_path / "4")
  ckpt = Checkpointer(tmp_path, every=2, keep=3)
  assert ckpt.all_steps() == [2, 4]
  with caplog.at_level(logging.WARNING):
    step, restored, data_state = ckpt.restore_latest_good(_abstract(states[2]))
  assert step == 2 and data_state == {"pos": 2}
  _assert_bitwise_equal(restored, states[2])
  warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert "step 4" in warnings and "unusable" in warnings and "trying step 2" in warnings, warnings
  # The bad step is moved aside (kept), the good one is untouched, and step 4 can be saved again.
  assert ckpt.all_steps() == [2] and (tmp_path / "4.corrupt").is_dir()
  assert _tree_bytes(tmp_path / "2") == good_before
  assert ckpt.save(4, states[4], data_state={"pos": 4})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 4] and ckpt.verify(4) is None
  step, restored, _ = ckpt.restore_latest_good(_abstract(states[4]))
  assert step == 4
  _assert_bitwise_equal(restored, states[4])
  ckpt.close()


def test_explicit_restore_of_a_corrupt_step_raises(mesh, tmp_path):
  states = _two_steps(mesh, tmp_path)
  _truncate(_largest_array_file(tmp_path / "4"))
  with Checkpointer(tmp_path, every=2, keep=3) as ckpt:
    with pytest.raises(CorruptCheckpointError, match=r"step 4 .* is corrupt: state/.* has \d+ bytes"):
      ckpt.restore(4, _abstract(states[4]))
    assert (tmp_path / "4").is_dir()  # an explicit restore moves nothing
    restored, _ = ckpt.restore(None, _abstract(states[2]))  # None = newest readable
    _assert_bitwise_equal(restored, states[2])
  with pytest.raises(CorruptCheckpointError, match="step 2 is corrupt"):
    _truncate(_largest_array_file(tmp_path / "2"))
    restore_params_from(tmp_path / "2", _abstract(states[2]["params"]))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_readable_step_moves_nothing(mesh, tmp_path):
  states = _two_steps(mesh, tmp_path)
  before = _tree_bytes(tmp_path)
  # A target that does not fit (another model shape): every step fails the same way.
  wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct((3,) + x.shape, x.dtype), _abstract(states[2]))
  with Checkpointer(tmp_path, every=2, keep=3) as ckpt:
    with pytest.raises(CorruptCheckpointError, match=r"(?s)step 4: .*step 2: .*Nothing was moved"):
      ckpt.restore_latest_good(wrong)
    assert ckpt.all_steps() == [2, 4]
  assert _tree_bytes(tmp_path) == before
  with Checkpointer(tmp_path / "empty", every=2, keep=3) as ckpt:
    assert ckpt.restore_latest_good(wrong) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
      ckpt.restore(None, wrong)


def test_unfinished_save_is_ignored_then_replaced(mesh, tmp_path, caplog):
  """What a writer killed mid-save leaves: orbax's temporary directory, never a step."""
  states = _two_steps(mesh, tmp_path)
  shutil.copytree(tmp_path / "4", tmp_path / "6.orbax-checkpoint-tmp")
  _truncate(_largest_array_file(tmp_path / "6.orbax-checkpoint-tmp"))
  with caplog.at_level(logging.WARNING):
    ckpt = Checkpointer(tmp_path, every=2, keep=3)
  assert "unfinished save" in caplog.text and "6.orbax-checkpoint-tmp" in caplog.text
  assert ckpt.all_steps() == [2, 4] and ckpt.latest_step() == 4
  step, _, _ = ckpt.restore_latest_good(_abstract(states[4]))
  assert step == 4
  state6 = _train_state(mesh, seed=6, step=6)
  assert ckpt.save(6, state6, data_state={"pos": 6})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 4, 6] and not (tmp_path / "6.orbax-checkpoint-tmp").exists()
  step, restored, _ = ckpt.restore_latest_good(_abstract(state6))
  assert step == 6
  _assert_bitwise_equal(restored, state6)
  ckpt.close()


def test_integrity_modes(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "x.bin").write_bytes(b"\x01" * 1000)
  assert "crc32" not in write_integrity(tmp_path, "size")["files"]["a/x.bin"]
  _flip_byte(tmp_path / "a" / "x.bin")
  assert check_integrity(tmp_path) is None  # sizes only: a flipped byte passes
  assert write_integrity(tmp_path, "auto")["mode"] == "crc32"
  _flip_byte(tmp_path / "a" / "x.bin")
  assert "CRC-32" in check_integrity(tmp_path)
  assert check_integrity(tmp_path, checksums=False) is None
  (tmp_path / "integrity.json").write_text("{not json")
  assert "integrity.json is unreadable" in check_integrity(tmp_path)
  with pytest.raises(ValueError, match="integrity mode"):
    write_integrity(tmp_path, "md5")
  with pytest.raises(ValueError, match="checkpoint.integrity"):
    Checkpointer(tmp_path / "c", every=1, keep=1, integrity="sha")
  with Checkpointer(tmp_path / "off", every=1, keep=1, integrity="off") as ckpt:
    ckpt.save(1, {"x": jnp.ones((3,))}, force=True)
  assert not (tmp_path / "off" / "1" / "integrity.json").exists()


def test_read_step_and_restore_never_unpickle(mesh, tmp_path, monkeypatch):
  states = _two_steps(mesh, tmp_path)

  def refuse(*args, **kwargs):
    raise AssertionError("a checkpoint read tried to unpickle")

  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  step, state, data_state = read_step(tmp_path)
  assert step == 4 and data_state == {"pos": 4}
  np.testing.assert_array_equal(np.asarray(state["params"]["w_kernel"]["value"]),
                                np.asarray(states[4]["params"]["w_kernel"].get_value()))
  with Checkpointer(tmp_path, every=2, keep=3) as ckpt:
    restored, _ = ckpt.restore(2, _abstract(states[2]))
  _assert_bitwise_equal(restored, states[2])
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 8"):
    read_step(tmp_path, 8)
