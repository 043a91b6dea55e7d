"""Object storage (nextstep_jax/storage.py) through fsspec's in-memory backend, never a real bucket.

The "gs" protocol is registered here as a MemoryFileSystem with a store of its own: nothing of a gs://
path can then reach the local disk by accident (a plain open() of "gs://..." would fail, and a
makedirs would leave a "gs:" folder, which the tests look for), and, as in an object store, there is
no atomic rename of a directory, so the markers are what tell a complete upload from a partial one.
Every test runs with the host cache (NEXTSTEP_STORAGE_CACHE) and the working directory in tmp_path.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.utils import stringify_path
from flax import nnx

from nextstep_jax import storage
from nextstep_jax.errors import UserError
from tests.runs import demo_assets, shrink


class FakeGCS(MemoryFileSystem):
  """gs:// kept in memory (its own store, apart from memory://)."""
  protocol = ("gs",)
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = stringify_path(path)
    return MemoryFileSystem._strip_protocol(path[len("gs://"):] if path.startswith("gs://") else path)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The fake gs:// registered, empty; the host cache and the working directory in tmp_path."""
  previous = fsspec.registry.get("gs")
  fsspec.register_implementation("gs", FakeGCS, clobber=True)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  FakeGCS.clear_instance_cache()
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)
  yield fsspec.filesystem("gs")
  assert not (tmp_path / "gs:").exists(), "a gs:// path was used as a local path"
  FakeGCS.store.clear()
  if previous is not None:
    fsspec.register_implementation("gs", previous, clobber=True)
  else:
    importlib.import_module("fsspec.registry")._registry.pop("gs", None)  # pylint: disable=protected-access  # back to gcsfs's entry


def upload(fs, local: str | Path, url: str) -> None:
  """Every file under `local` to `url` (the way gsutil cp -r lays them out)."""
  local = Path(local)
  for path in sorted(local.rglob("*")):
    if path.is_file():
      fs.put_file(str(path), f"{url}/{path.relative_to(local).as_posix()}")


def remote_files(fs, url: str) -> dict[str, int]:
  return storage._listing(fs, fs._strip_protocol(url))  # pylint: disable=protected-access


def download(fs, url: str, local: Path) -> Path:
  for rel in remote_files(fs, url):
    (local / rel).parent.mkdir(parents=True, exist_ok=True)
    fs.get_file(f"{url}/{rel}", str(local / rel))
  return local


# ------------------------------------------------------------------------------------------------
# Paths, inputs, errors (fast)
# ------------------------------------------------------------------------------------------------

def test_remote_urls_and_local_paths():
  assert storage.is_remote("gs://b/x") and storage.is_remote("S3://b/x") and storage.is_remote("memory://x")
  for local in ("runs/demo", "/abs/path", "digits", "file://runs/x", "", "a:b/c"):
    assert not storage.is_remote(local), local
  assert storage.local_input("runs/demo", "data.source") == "runs/demo"   # local: untouched


def test_input_is_staged_once_and_an_interrupted_copy_is_completed(bucket, tmp_path):
  src = tmp_path / "src"
  (src / "sub").mkdir(parents=True)
  (src / "a.bin").write_bytes(b"a" * 100)
  (src / "sub" / "b.bin").write_bytes(b"b" * 10)
  upload(bucket, src, "gs://bucket/inputs")
  local = storage.local_input("gs://bucket/inputs/", "data.source")
  assert local == str(tmp_path / "cache" / "inputs" / "gs" / "bucket" / "inputs")
  assert Path(local, "a.bin").read_bytes() == b"a" * 100 and Path(local, "sub", "b.bin").read_bytes() == b"b" * 10
  marker = json.loads(Path(local, storage.INPUT_MARKER).read_text())
  assert marker == {"source": "gs://bucket/inputs", "files": {"a.bin": 100, "sub/b.bin": 10}}

  # Complete: nothing is copied again (a file changed locally stays as it is).
  Path(local, "a.bin").write_bytes(b"x" * 100)
  assert storage.local_input("gs://bucket/inputs", "data.source") == local
  assert Path(local, "a.bin").read_bytes() == b"x" * 100
  # Interrupted (no marker, a file cut short, an unfinished one aside): completed, the marker last.
  Path(local, storage.INPUT_MARKER).unlink()
  Path(local, "a.bin").write_bytes(b"a" * 40)
  Path(local, "sub", "b.bin").unlink()
  storage.local_input("gs://bucket/inputs", "data.source")
  assert Path(local, "a.bin").read_bytes() == b"a" * 100 and Path(local, "sub", "b.bin").exists()
  assert Path(local, storage.INPUT_MARKER).exists()
  # The remote changed: the copy follows it (new and removed files).
  bucket.rm_file("gs://bucket/inputs/sub/b.bin")
  bucket.pipe_file("gs://bucket/inputs/c.bin", b"c" * 5)
  storage.local_input("gs://bucket/inputs", "data.source")
  assert sorted(p.name for p in Path(local).rglob("*.bin")) == ["a.bin", "c.bin"]


def test_a_single_file_is_staged_with_the_files_beside_it(bucket):
  bucket.pipe_file("gs://bucket/tok/tokenizer.json", b"{}")
  bucket.pipe_file("gs://bucket/tok/tokenizer_config.json", b"{\"eos_token\": \"x\"}")
  bucket.pipe_file("gs://bucket/tok/unrelated.bin", b"0" * 1000)
  local = storage.local_input("gs://bucket/tok/tokenizer.json", "tokenizer.path",
                              siblings=("tokenizer_config.json", "special_tokens_map.json"))
  assert local.endswith(os.path.join("gs", "bucket", "tok", "tokenizer.json")) and Path(local).read_bytes() == b"{}"
  assert sorted(os.listdir(os.path.dirname(local))) == [
      ".tokenizer.json" + storage.INPUT_MARKER, "tokenizer.json", "tokenizer_config.json"]


def test_missing_path_and_missing_protocol_are_one_line_user_errors(bucket):
  with pytest.raises(UserError) as e:
    storage.local_input("gs://bucket/nothing/here", "data.source")
  assert str(e.value) == "data.source='gs://bucket/nothing/here' does not exist"
  try:
    import s3fs  # noqa: F401  # pylint: disable=unused-import,import-outside-toplevel
    pytest.skip("s3fs is installed here: its protocol is not missing")
  except ImportError:
    pass
  with pytest.raises(UserError) as e:
    storage.local_input("s3://bucket/vae", "vae.checkpoint")
  msg = str(e.value)
  assert "\n" not in msg and "vae.checkpoint='s3://bucket/vae'" in msg and "pip install s3fs" in msg, msg
  with pytest.raises(UserError, match="nosuchproto://"):
    storage.RemoteWorkdir("nosuchproto://bucket/run")


# ------------------------------------------------------------------------------------------------
# The mirrored work directory, without training (fast)
# ------------------------------------------------------------------------------------------------

def _fake_step(root: Path, step: int, payload: bytes = b"w") -> Path:
  d = root / "checkpoints" / str(step)
  (d / "state").mkdir(parents=True)
  (d / "state" / "arr").write_bytes(payload * 64)
  (d / "_CHECKPOINT_METADATA").write_text("{}")
  return d


def test_half_uploaded_steps_are_ignored_and_uploads_put_the_marker_last(bucket, tmp_path):
  writer = storage.RemoteWorkdir("gs://bucket/run", local=str(tmp_path / "writer"))
  _fake_step(Path(writer.local), 3)
  (Path(writer.local) / "checkpoints" / "config.json").write_text("{\"a\": 1}")
  (Path(writer.local) / ".nextstep.lock").write_text("mine")
  writer.private = writer.private + (".nextstep.lock*",)
  writer.publish(3)
  files = remote_files(bucket, "gs://bucket/run")
  assert f"checkpoints/3/{storage.UPLOAD_MARKER}" in files and "checkpoints/config.json" in files
  assert ".nextstep.lock" not in files
  # An upload cut short (the connection drops on the second file): no marker, so no step.
  _fake_step(Path(writer.local), 6, b"v")
  real_put, calls = bucket.put_file, []

  def flaky(lpath, rpath, *a, **k):
    calls.append(rpath)
    if len(calls) == 2:
      raise OSError("connection reset")
    return real_put(lpath, rpath, *a, **k)

  bucket.put_file = flaky
  try:
    with pytest.raises(UserError, match="uploading step 6 failed"):
      writer.publish(6)
  finally:
    del bucket.put_file
  assert writer.complete_steps() == [3]
  assert any(r.startswith("checkpoints/6/") for r in remote_files(bucket, "gs://bucket/run"))
  # A new host's mirror: the run files and step 3 come down, the partial step 6 does not.
  reader = storage.RemoteWorkdir("gs://bucket/run", local=str(tmp_path / "reader"))
  assert reader.pull() == 3
  assert (Path(reader.local) / "checkpoints" / "3" / "state" / "arr").read_bytes() == b"w" * 64
  assert not (Path(reader.local) / "checkpoints" / "3" / storage.UPLOAD_MARKER).exists()
  assert (Path(reader.local) / "checkpoints" / "config.json").read_text() == "{\"a\": 1}"
  assert reader.local_steps() == [3] and reader.pull() is None   # nothing newer: nothing pulled
  # Published again in full, step 6 is complete; retention then drops step 3 remotely, marker first.
  writer.publish(6)
  assert writer.complete_steps() == [3, 6]
  writer.retain([6])
  assert writer.complete_steps() == [6]
  assert not any(r.startswith("checkpoints/3/") for r in remote_files(bucket, "gs://bucket/run"))


def test_a_checkpoint_url_stages_only_its_newest_complete_step(bucket, tmp_path):
  """checkpoint.init_from=gs://...: a checkpoint directory, a run's work directory or one step."""
  writer = storage.RemoteWorkdir("gs://bucket/stage1", local=str(tmp_path / "writer"))
  for step, payload in ((3, b"a"), (6, b"b")):
    _fake_step(Path(writer.local), step, payload)
    writer.publish(step)
  bucket.pipe_file("gs://bucket/stage1/checkpoints/9/state/arr", b"partial")   # an upload cut short
  staged = tmp_path / "cache" / "inputs" / "gs" / "bucket" / "stage1" / "checkpoints"
  for url in ("gs://bucket/stage1/checkpoints", "gs://bucket/stage1/checkpoints/", "gs://bucket/stage1"):
    assert storage.local_checkpoint(url) == str(staged / "6"), url
  assert sorted(os.listdir(staged)) == ["6"]                                    # only that step came down
  assert (staged / "6" / "state" / "arr").read_bytes() == b"b" * 64
  assert storage.local_checkpoint("gs://bucket/stage1/checkpoints/3") == str(staged / "3")   # a step URL
  assert (staged / "3" / "state" / "arr").read_bytes() == b"a" * 64
  assert storage.local_checkpoint("runs/stage1/checkpoints") == "runs/stage1/checkpoints"   # local: untouched

  def refused(url, what="checkpoint.init_from"):
    with pytest.raises(UserError) as e:
      storage.local_checkpoint(url, what)
    assert "\n" not in str(e.value) and f"{what}={url!r}" in str(e.value), str(e.value)
    return str(e.value)

  assert "step 9 has no upload marker" in refused("gs://bucket/stage1/checkpoints/9")
  assert refused("gs://bucket/stage2/checkpoints", "dpo.reference").endswith("does not exist")
  bucket.pipe_file("gs://bucket/stage1/checkpoints/3/state/arr", b"changed")  # altered after its upload
  assert "does not match its upload marker" in refused("gs://bucket/stage1/checkpoints/3")
  bucket.rm_file(f"gs://bucket/stage1/checkpoints/6/{storage.UPLOAD_MARKER}")
  bucket.rm_file(f"gs://bucket/stage1/checkpoints/3/{storage.UPLOAD_MARKER}")
  assert "no step has its upload marker .upload_complete.json (steps [3, 6, 9]:" in refused("gs://bucket/stage1")
  # The checkpoint reader (what checkpoint.init_from and dpo.reference go through) names the URL too.
  from nextstep_jax.training import checkpoint as ckpt_lib
  with pytest.raises(UserError, match=r"^checkpoint.init_from='gs://bucket/stage1/checkpoints/9': step 9 has"):
    ckpt_lib.restore_params_step("gs://bucket/stage1/checkpoints/9", {})


def test_a_remote_workdir_is_refused_for_a_job_of_several_processes(bucket, monkeypatch):
  storage.check_workdir("gs://bucket/run", 1)
  storage.check_workdir("/nfs/runs/stage1", 16)   # a shared local path: any number of processes
  with pytest.raises(UserError) as e:
    storage.check_workdir("gs://bucket/run", 2)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("workdir='gs://bucket/run': ") and "2 processes" in msg, msg
  assert "NFS" in msg and "one process with this URL" in msg, msg
  # The trainers refuse it at start-up, before any directory is made (the fixture looks for "gs:").
  from configs import demo
  from nextstep_jax.training import loop
  monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
  with pytest.raises(UserError, match="2 processes"):
    loop.start(demo.get_config(), "gs://bucket/run")
  with pytest.raises(UserError, match="2 processes"):
    loop.Session().local_workdir("gs://bucket/run")     # the VAE trainer's way in
  assert loop.Session().local_workdir("runs/x") == "runs/x"


# ------------------------------------------------------------------------------------------------
# Training from gs:// and into gs://, then resuming from the remote step
# ------------------------------------------------------------------------------------------------

def _config(steps: int):
  from configs import demo
  c = demo.get_config()
  with c.unlocked():
    shrink(c)
    c.data.source = "gs://bucket/data"
    c.vae.checkpoint, c.tokenizer.path = "gs://bucket/vae", "gs://bucket/tokenizer"
    c.data.renormalize = True   # pairs only
    c.steps, c.log_every, c.eval_every, c.sample_prompts = steps, 3, 1000, ()
    c.optim.warmup_steps = 1
    c.checkpoint.every, c.checkpoint.async_save = 3, False
  return c


def _init_from_url_equals_local_restore(saved_params, url: str, local_step: Path) -> None:
  """loop.restore_or_init's init_from branch (with stand-ins for the trainer and the run's own empty
  checkpoints) given `url`, against restore_params_step of the local copy `local_step`."""
  import jax
  from nextstep_jax.training import loop
  from nextstep_jax.training.checkpoint import restore_params_step

  class Trainer:
    lora, abstract_state, state_shardings = None, {}, {}
    abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), saved_params)
    param_shardings = jax.tree.map(lambda a: a.sharding, saved_params)

    def state_from_params(self, params):
      return {"params": params, "step": 0}

  class NoCheckpoints:
    def restore_latest_good(self, _):
      return None

    def write_config(self):
      pass

  state = loop.restore_or_init(Trainer(), NoCheckpoints(), None, init_from=url)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), saved_params)
  step, local = restore_params_step(local_step, target)
  assert step == int(local_step.name)
  staged = storage.local_checkpoint(url)
  assert Path(staged).name == local_step.name and sorted(os.listdir(Path(staged).parent)) == [local_step.name]
  got, want = jax.tree_util.tree_leaves_with_path(state["params"]), jax.tree_util.tree_leaves_with_path(local)
  assert [p for p, _ in got] == [p for p, _ in want] and got
  for (path, a), (_, b) in zip(got, want):
    assert a.dtype == b.dtype, path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_training_reads_gs_inputs_writes_gs_checkpoints_and_resumes_from_them(bucket, tmp_path, capsys):
  from nextstep_jax.data import formats as F
  from nextstep_jax.training import loop
  from nextstep_jax.training.checkpoint import read_step
  from tests.test_prepare import png, run_prepare

  assets = demo_assets(str(tmp_path / "assets"))
  for i in range(4):
    png(tmp_path / "photos" / f"{i}.png", 32, seed=i)
    (tmp_path / "photos" / f"{i}.txt").write_text(f"a photo number {i}")
  run_prepare(F.open_inputs([str(tmp_path / "photos")]), tmp_path / "records")
  upload(bucket, tmp_path / "records", "gs://bucket/data")
  upload(bucket, assets["vae"], "gs://bucket/vae")
  upload(bucket, assets["tokenizer"], "gs://bucket/tokenizer")
  shutil.rmtree(tmp_path / "records")
  shutil.rmtree(tmp_path / "assets")   # only the bucket holds the inputs now

  last = loop.train(_config(3), "gs://bucket/run")
  assert np.isfinite(last["loss"]) and last["image_tokens"] > 0, last
  files = remote_files(bucket, "gs://bucket/run")
  assert f"checkpoints/3/{storage.UPLOAD_MARKER}" in files, sorted(files)
  assert "checkpoints/config.json" in files and "metrics.jsonl" in files
  assert not any(".nextstep.lock" in r for r in files)
  # What the bucket holds is a checkpoint step in its own right.
  step, state, _ = read_step(download(bucket, "gs://bucket/run/checkpoints/3", tmp_path / "copy" / "3").parent)
  assert step == 3 and int(state["step"]) == 3
  saved = json.loads(bucket.cat_file("gs://bucket/run/checkpoints/config.json"))
  assert saved["data"]["source"] == "gs://bucket/data" and saved["vae"]["checkpoint"] == "gs://bucket/vae"

  # The next stage's checkpoint.init_from=gs://bucket/run/checkpoints: a params-only init from the
  # bucket's newest complete step equals the local restore of that step, tensor by tensor.
  _init_from_url_equals_local_restore(state["params"], "gs://bucket/run/checkpoints", tmp_path / "copy" / "3")

  # The finished run read from the bucket alone (no mirror): loaded, sampled, exported; a few-step head
  # from a URL.
  from nextstep_jax import run as run_lib
  from nextstep_jax.interop import runs as runs_lib
  from nextstep_jax.sampling import few_step
  from nextstep_jax.sampling.runner import sample_run
  mirror = storage.RemoteWorkdir("gs://bucket/run").local
  shutil.rmtree(mirror)
  loaded = run_lib.load_run("gs://bucket/run")
  assert loaded.step == 3 and loaded.workdir == mirror
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param)), state["params"])
  index = runs_lib.export_workdir("gs://bucket/run", str(tmp_path / "hf"))
  assert index and os.path.isfile(tmp_path / "hf" / "config.json")
  shutil.rmtree(mirror)
  stats = sample_run("gs://bucket/run", "a photo number 1", num=1, steps=2, out=str(tmp_path / "samples"))
  assert stats["images"] == 1 and os.path.isfile(tmp_path / "samples" / "sample_000.png")
  head = nnx.clone(loaded.model.head)  # a head of its own weights, so the swap shows
  head.final_kernel[...] = head.final_kernel[...] + np.random.default_rng(0).normal(
      size=head.final_kernel.shape).astype(np.float32)
  few_step.save_head(str(tmp_path / "k2"), head, {"evaluations": 2, "cfg": 3.0, "time_shift": 1.0,
                                                  "use_norm": True, "teacher_steps": 28})
  upload(bucket, tmp_path / "k2", "gs://bucket/heads/k2")
  swapped, meta = few_step.with_head(loaded.model, "gs://bucket/heads/k2")
  assert meta["evaluations"] == 2
  np.testing.assert_array_equal(np.asarray(swapped.head.final_kernel[...]), np.asarray(head.final_kernel[...]))
  assert not np.array_equal(np.asarray(swapped.head.final_kernel[...]), np.asarray(loaded.model.head.final_kernel[...]))

  # A new host: no mirror; and a step whose upload never finished (no marker) beside step 3.
  shutil.rmtree(mirror)
  for rel in [r for r in files if r.startswith("checkpoints/3/") and not r.endswith(storage.UPLOAD_MARKER)]:
    bucket.pipe_file(f"gs://bucket/run/checkpoints/9/{rel[len('checkpoints/3/'):]}", b"partial")
  capsys.readouterr()
  last = loop.train(_config(6), "gs://bucket/run")
  assert np.isfinite(last["loss"])
  assert "resumed from step 3" in capsys.readouterr().out   # not from scratch, not the partial 9
  metrics = [json.loads(line) for line in bucket.cat_file("gs://bucket/run/metrics.jsonl").decode().splitlines()]
  assert sorted({m["step"] for m in metrics}) == [3, 6], metrics   # the first run's lines kept
  assert storage.RemoteWorkdir("gs://bucket/run").complete_steps() == [3, 6]
  step, state, _ = read_step(download(bucket, "gs://bucket/run/checkpoints/6", tmp_path / "copy2" / "6").parent)
  assert step == 6 and int(state["step"]) == 6


@pytest.mark.slow
def test_vae_trainer_reads_a_gs_image_folder_and_writes_a_gs_workdir(bucket, tmp_path):
  import jax
  from configs import vae_demo
  from nextstep_jax import run as run_lib
  from nextstep_jax.training import vae_trainer
  from tests.test_prepare import png

  for i in range(6):
    png(tmp_path / "photos" / f"{i}.png", 16, seed=i)
  upload(bucket, tmp_path / "photos", "gs://bucket/photos")
  shutil.rmtree(tmp_path / "photos")
  c = vae_demo.get_config()
  c.vae.base_channels, c.vae.channel_mults, c.vae.norm_groups, c.vae.mid_attention = 8, (1,), 4, False
  c.data.source, c.data.image_size, c.data.heldout_every = "gs://bucket/photos", 16, 3
  c.data.batch_size = jax.device_count()
  c.steps, c.log_every, c.eval_every, c.optim.warmup_steps = 2, 1, 2, 1
  c.eval.num_images, c.eval.batch_size, c.eval.grid_images = 2, 2, 2
  c.checkpoint.every, c.checkpoint.async_save = 2, False

  result = vae_trainer.train_and_evaluate(c, "gs://bucket/vae")
  assert result["step"] == 2 and result["source"] == "gs://bucket/photos" and np.isfinite(result["psnr"])
  files = remote_files(bucket, "gs://bucket/vae")
  assert f"checkpoints/2/{storage.UPLOAD_MARKER}" in files, sorted(files)
  for name in ("config.json", vae_trainer.VAE_CONFIG_FILE, vae_trainer.EVAL_FILE, "metrics.jsonl"):
    assert name in files, (name, sorted(files))
  assert any(r.startswith(vae_trainer.EXPORT_DIR + "/") for r in files)
  assert not any(".nextstep.lock" in r or r.endswith(".partial") for r in files), sorted(files)
  # The bucket's run is a VAE in its own right (load_vae stages it; what vae.checkpoint=gs://... reads).
  vae = run_lib.load_vae("gs://bucket/vae")
  assert vae.config.base_channels == 8 and vae.config.channel_mults == (1,)
