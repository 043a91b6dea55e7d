"""The data command (``python -m nextstep_jax.data prepare``): every input format -> prepare -> 3
training steps on the shrunk demo; skipped files named in the summary; an interrupted prepare
resumed to the same bytes; two processes' shards equal to one process's; user errors in one line;
mixtures over the kinds present (data.renormalize). Inputs are built here with PIL; everything is
written under tmp_path."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nextstep_jax import cli
from nextstep_jax.data import __main__ as data_main
from nextstep_jax.data import formats as F
from nextstep_jax.data import mixture as M
from nextstep_jax.data import prepare as P
from nextstep_jax.data import settings as settings_lib
from nextstep_jax.data import sources as S
from nextstep_jax.errors import UserError
from tests.runs import demo_assets, shrink
from tests.test_mixture import demo_config

REPO = Path(__file__).resolve().parents[1]
# The demo's buckets: 8 px per token (vae_factor 4 * patch 2), 16 tokens per image (32 px).
DEMO = F.ConvertOptions(unit=8, sides=(4,))


def png(path, side: int, seed: int = 0, fmt: str = "PNG") -> str:
  """A square random image (square: every record lands in the demo's 32 x 32 bucket)."""
  arr = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt)
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Path(path).write_bytes(buf.getvalue())
  return str(path)


def write_jsonl(path, rows) -> str:
  Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def tree(root) -> dict[str, bytes]:
  """Every file under `root` (relative path -> bytes)."""
  root = Path(root)
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_prepare(source, root, *, options=DEMO, **job) -> dict | None:
  return P.prepare(source, P.Job(str(root), progress_every=1e9, **job), options, log=lambda _: None)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return demo_assets(str(tmp_path_factory.mktemp("prepare_assets")))


def train3(assets, root, work, **data) -> dict[str, int]:
  """Three steps of the shrunk demo on data.source=root; returns the data counters it consumed."""
  from configs import demo
  from nextstep_jax.training import loop
  from nextstep_jax.training.checkpoint import read_step
  c = demo.get_config()
  with c.unlocked():
    shrink(c)
    c.data.source = str(root)
    c.data.update(data)
    c.vae.checkpoint, c.tokenizer.path = assets["vae"], assets["tokenizer"]
    c.steps, c.log_every, c.eval_every, c.sample_prompts = 3, 3, 1000, ()   # no held-out split
    c.optim.warmup_steps = 1
    c.checkpoint.every, c.checkpoint.async_save = 3, False
  last = loop.train(c, str(work))
  assert np.isfinite(last["loss"]) and last["image_tokens"] > 0, last
  step, _, data_state = read_step(os.path.join(work, "checkpoints"))
  assert step == 3
  return M.collect_counters(data_state)


# ------------------------------------------------------------------------------------------------
# Each format -> prepare -> 3 training steps
# ------------------------------------------------------------------------------------------------

def test_folder_and_jsonl_kinds_train(tmp_path, assets):
  folder = tmp_path / "photos"
  for i in range(6):
    png(folder / f"{i}.png", 24 + 8 * i, seed=i)   # 24 and 32 px: below the 32 px bucket's area
    (folder / f"{i}.txt").write_text(f"a photo number {i}")
  png(folder / "nested" / "6.jpg", 48, seed=6, fmt="JPEG")
  (folder / "nested" / "6.txt").write_text("a nested photo")
  (folder / "nested" / "nocaption.png").write_bytes((folder / "0.png").read_bytes())
  imgs = tmp_path / "img"
  for i in range(4):
    png(imgs / f"{i}.png", 40, seed=10 + i)
  edits = write_jsonl(tmp_path / "edits.jsonl", [
      {"source": "img/0.png", "instruction": "invert it", "target": "img/1.png"},
      {"source": ["img/1.png", "img/2.png"], "instruction": "merge them", "target": "img/3.png"}])
  inter = write_jsonl(tmp_path / "inter.jsonl", [
      {"segments": [{"text": "first"}, {"image": "img/0.png"}, {"text": "then"},
                    {"image": "img/2.png"}]}])
  text = write_jsonl(tmp_path / "text.jsonl", [{"text": "A document about photos. " * 8},
                                               {"text": "Another, shorter one."}])
  root = tmp_path / "root"
  summary = run_prepare(F.open_inputs([str(folder)]), root)
  assert summary["records"] == 7 and summary["read"] == 8
  assert summary["skipped"] == {"missing_caption": {
      "count": 1, "first": [f"{folder}/nested/nocaption.png ({folder}/nested/nocaption.txt)"]}}
  assert summary["converted"]["upscaled_small"] == 1   # 24 px (the 32 px one is within 90%)
  for kind, path in (("edit", edits), ("interleaved", inter), ("text", text)):
    s = run_prepare(F.open_inputs([path], kind), root)
    assert s["records"] == s["read"] and not s["skipped"], s
  assert S.available_kinds(str(root), "train") == list(S.KINDS)
  counters = train3(assets, root, tmp_path / "work")
  for kind in S.KINDS:
    assert counters.get(f"samples/{kind}", 0) > 0, (kind, counters)


def official_tar(path, samples, *, sorted_members: bool = False) -> str:
  """A tar in the official NextStep layout: key.json (caption with <image_n>) + key-{n}.png."""
  members = []
  for key, caption, sides in samples:
    members.append((f"{key}.json", json.dumps({"caption": caption, "metadata": {}}).encode()))
    for n, side in enumerate(sides):
      buf = io.BytesIO()
      Image.fromarray(np.full((side, side, 3), 40 * n + 20, np.uint8)).save(buf, format="PNG")
      members.append((f"{key}-{n}.png", buf.getvalue()))
  if sorted_members:   # a re-packed tar: key-0.png sorts before key.json
    members.sort()
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


def test_csv_index_and_official_webdataset_train(tmp_path, assets):
  for i in range(4):
    png(tmp_path / "img" / f"{i}.png", 40, seed=i)
  (tmp_path / "index.csv").write_text(
      "file_name,text\n" + "".join(f"img/{i}.png,\"a picture, number {i}\"\n" for i in range(4)))
  edits = [official_tar(tmp_path / "edit-0.tar", [
               ("a1", "<image_0>make it brighter<image_1>", (40, 40)),
               ("a2", "<image_0><image_1>put them together<image_2>", (40, 40, 40))]),
           official_tar(tmp_path / "edit-1.tar", [
               ("b1", "<image_0>darker<image_1>", (40, 40)),
               ("b2", "<image_0>no target here", (40,))], sorted_members=True)]
  inter = official_tar(tmp_path / "inter.tar", [
      ("c1", "a story: <image_0> and then <image_1>, the end", (40, 40)),
      ("c2", "caption first, images after", (40, 40))], sorted_members=True)
  root = tmp_path / "root"
  s = run_prepare(F.open_inputs([str(tmp_path / "index.csv")]), root)
  assert s["records"] == 4 and s["input"]["keys"] == {"image": "file_name", "caption": "text"}
  s = run_prepare(F.open_inputs([str(tmp_path / "edit-*.tar")], "edit"), root)
  assert (s["records"], s["shards"]) == (3, 2)
  assert s["skipped"] == {"bad_layout": {"count": 1, "first": [f"{edits[1]}:b2"]}}
  assert run_prepare(F.open_inputs([inter], "interleaved"), root)["records"] == 2
  decode = S.RecordDecoder("interleaved", 8, (4,), pixel=True)
  src = S.open_records(str(root), "interleaved")
  assert [decode(src[i]).record["segments"] for i in range(2)] == [
      ["a story:", 0, "and then", 1, ", the end"], ["caption first, images after", 0, 1]]
  edit = S.RecordDecoder("edit", 8, (4,), pixel=True)
  src = S.open_records(str(root), "edit")
  assert sorted(edit(src[i]).record["instruction"] for i in range(3)) == [
      "darker", "make it brighter", "put them together"]
  counters = train3(assets, root, tmp_path / "work", renormalize=True)   # no text records
  for kind in ("pair", "edit", "interleaved"):
    assert counters.get(f"samples/{kind}", 0) > 0, (kind, counters)


def tfds_dataset(data_dir, n: int = 6) -> None:
  """A small TFDS dataset, prepared here as ArrayRecord (images encoded by PIL, no tensorflow)."""
  import tensorflow_datasets as tfds

  class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(), "caption": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=["cat", "dog"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((36, 36, 3), 30 * i, np.uint8)).save(buf, format="PNG")
        buf.seek(0)
        yield i, {"image": buf, "caption": f"a grey square {i}", "label": i % 2}

  tfds.disable_progress_bar()
  TinyCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_dataset_trains_with_renormalized_ratios(tmp_path, assets):
  tfds_dataset(tmp_path / "tfds")
  root = tmp_path / "root"
  source = F.open_inputs(["tfds:tiny_captions"], tfds_data_dir=str(tmp_path / "tfds"), shard_size=4)
  s = run_prepare(source, root)
  assert (s["records"], s["shards"]) == (6, 2)
  decode = S.RecordDecoder("pair", 8, (4,), pixel=True)
  src = S.open_records(str(root), "pair")
  assert sorted(decode(src[i]).record["caption"] for i in range(6)) == [
      f"a grey square {i}" for i in range(6)]
  # A class label as the caption: its name.
  labels = F.open_inputs(["tfds:tiny_captions"], keys={"caption": "label"},
                         tfds_data_dir=str(tmp_path / "tfds"))
  run_prepare(labels, tmp_path / "labels")
  src = S.open_records(str(tmp_path / "labels"), "pair")
  assert {decode(src[i]).record["caption"] for i in range(6)} == {"cat", "dog"}
  counters = train3(assets, root, tmp_path / "work", renormalize=True)   # pair only
  assert counters["samples/pair"] > 0 and set(k for k in counters if k.startswith("samples/")) == {
      "samples/pair"}


# ------------------------------------------------------------------------------------------------
# The summary names what it skipped; the command's output
# ------------------------------------------------------------------------------------------------

def bad_index(tmp_path) -> Path:
  d = tmp_path / "data"
  png(d / "good-0.png", 40, seed=0)
  png(d / "good-1.png", 40, seed=1)
  png(d / "small.png", 12, seed=2)
  (d / "dir.png").mkdir()
  (d / "corrupt.png").write_bytes((d / "good-0.png").read_bytes()[:60])
  (d / "zero.png").write_bytes(b"")
  return Path(write_jsonl(d / "pairs.jsonl", [
      {"image": "good-0.png", "caption": "fine"},
      {"image": "dir.png", "caption": "a directory"},
      {"image": "corrupt.png", "caption": "cut short"},
      {"image": "zero.png", "caption": "nothing"},
      {"image": "small.png", "caption": "tiny"},
      {"image": "gone.png", "caption": "no such file"},
      "{not json",
      {"image": "good-1.png", "caption": "fine too"}]))


def test_summary_names_the_skipped_files(tmp_path):
  index = bad_index(tmp_path)
  out = tmp_path / "root"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("NEXTSTEP_DEBUG", None)
  proc = subprocess.run(
      [sys.executable, "-m", "nextstep_jax.data", "prepare", f"--input={index}", f"--out={out}",
       "--config=configs/demo.py", "--small=drop", "--progress_every=0"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((out / "prepare-pair-train.json").read_text())
  d = index.parent
  want = {"is_directory": f"{index}:2 ({d}/dir.png)",
          "decode_error": f"{index}:3 ({d}/corrupt.png)", "empty_file": f"{index}:4 ({d}/zero.png)",
          "too_small": f"{index}:5 ({d}/small.png)", "missing_file": f"{index}:6 ({d}/gone.png)", "bad_json": f"{index}:7"}
  assert summary["skipped"] == {k: {"count": 1, "first": [v]} for k, v in want.items()}
  assert (summary["records"], summary["read"]) == (2, 8)
  for name in want.values():
    assert name in proc.stdout, proc.stdout          # the console summary names them too
  assert "8 read, 2 kept, 6 skipped" in proc.stderr   # progress lines
  assert len(S.open_records(str(out), "pair")) == 2
  # By default small images are resized up into a bucket, not dropped.
  s = run_prepare(F.open_inputs([str(index)]), tmp_path / "upscaled")
  assert "too_small" not in s["skipped"] and s["converted"]["upscaled_small"] == 1
  assert s["records"] == 3


def test_no_record_kept_names_the_counts(tmp_path):
  folder = tmp_path / "tiny"
  for i in range(3):
    png(folder / f"{i}.png", 8, seed=i)
    (folder / f"{i}.txt").write_text("small")
  with pytest.raises(F.NoRecords, match=r"no pair records kept of 3 read; skipped: too_small 3 "
                                        r"\(.*0\.png.*1\.png.*2\.png\)"):
    run_prepare(F.open_inputs([str(folder)]), tmp_path / "root",
                options=F.ConvertOptions(unit=8, sides=(4,), small="drop"))
  assert not (tmp_path / "root" / S.BUILDER_NAME / "pair" / "1.0.0" / "dataset_info.json").exists()
  assert json.loads((tmp_path / "root" / "prepare-pair-train.json").read_text())["records"] == 0
  # The one-process converters say the same instead of TFDS's "No examples were yielded".
  with pytest.raises(F.NoRecords, match="too_small 3"):
    F.convert_image_folder(str(folder), str(tmp_path / "conv"), F.ConvertOptions(
        unit=8, sides=(4,), small="drop"))
  assert not (tmp_path / "conv" / "nextstep_records" / "pair" / "1.0.0").exists()


# ------------------------------------------------------------------------------------------------
# Resume and processes
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """A folder of 11 captioned images (4 shards of 3) and one uninterrupted one-process prepare."""
  tmp = tmp_path_factory.mktemp("photos")
  for i in range(11):
    png(tmp / "photos" / f"{i:02d}.png", 24 + 4 * i, seed=i)
    (tmp / "photos" / f"{i:02d}.txt").write_text(f"photo {i}")
  (tmp / "photos" / "99.png").write_bytes(b"")          # one skipped, in the last shard
  (tmp / "photos" / "99.txt").write_text("empty")
  source = F.open_inputs([str(tmp / "photos")], shard_size=3)
  assert source.num_units == 4
  summary = run_prepare(source, tmp / "whole")
  assert summary["records"] == 11 and summary["skipped"]["empty_file"]["count"] == 1
  return str(tmp / "photos"), tree(tmp / "whole")


def test_interrupted_prepare_resumes_to_the_same_bytes(tmp_path, photos, monkeypatch):
  folder, whole = photos
  root = tmp_path / "root"
  out = root / "nextstep_records" / "pair" / "1.0.0"
  calls = {"n": 0}
  write = S.ShardWriter.write

  def dies_at_the_eighth_record(self, record):
    calls["n"] += 1
    if calls["n"] == 8:   # in unit 2 (records 7-9), after two records of it
      raise KeyboardInterrupt
    write(self, record)

  monkeypatch.setattr(S.ShardWriter, "write", dies_at_the_eighth_record)
  with pytest.raises(KeyboardInterrupt):
    run_prepare(F.open_inputs([folder], shard_size=3), root)
  monkeypatch.setattr(S.ShardWriter, "write", write)
  left = tree(root)
  done = [S.shard_name("train", u, 4) for u in (0, 1)]
  partial = S.shard_name("train", 2, 4) + ".partial"
  assert [n for n in left if "array_record" in n] == [f"nextstep_records/pair/1.0.0/{n}"
                                                      for n in done + [partial]]
  assert not (out / "dataset_info.json").exists()
  stamps = {n: os.stat(out / n).st_mtime_ns for n in done}
  lines = []
  summary = P.prepare(F.open_inputs([folder], shard_size=3), P.Job(str(root), progress_every=1e9),
                      DEMO, log=lines.append)
  assert summary["records"] == 11
  assert any("resuming, 2 of 4 units already done" in ln for ln in lines), lines
  assert {n: os.stat(out / n).st_mtime_ns for n in done} == stamps, "finished shards were redone"
  assert tree(root) == whole
  # The same command once more converts nothing and leaves the same bytes.
  run_prepare(F.open_inputs([folder], shard_size=3), root)
  assert tree(root) == whole


def test_two_processes_write_what_one_process_writes(tmp_path, photos):
  folder, whole = photos
  root = tmp_path / "root"
  out = root / "nextstep_records" / "pair" / "1.0.0"
  # Process 1 of 2 first: its units (1, 3) only, and no dataset yet.
  assert run_prepare(F.open_inputs([folder], shard_size=3), root, process_index=1,
                     process_count=2) is None
  assert sorted(n for n in os.listdir(out) if "array_record" in n) == [
      S.shard_name("train", u, 4) for u in (1, 3)]
  assert not (out / "dataset_info.json").exists() and S.available_kinds(str(root)) == []
  # Process 0 finishes last: it writes the dataset and the summary.
  summary = run_prepare(F.open_inputs([folder], shard_size=3), root, process_index=0,
                        process_count=2)
  assert summary["records"] == 11
  # "Equal": the same files, byte for byte, as one process's output (so the same records, in
  # the same order, read by training as one dataset).
  assert tree(root) == whole
  src = S.open_records(str(root), "pair")
  decode = S.RecordDecoder("pair", 8, (4,), pixel=True)
  assert sorted(decode(src[i]).record["caption"] for i in range(len(src))) == sorted(
      f"photo {i}" for i in range(11))


def test_process_defaults_from_the_launcher_environment():
  assert P.process_from_env({"JAX_PROCESS_ID": "1", "JAX_NUM_PROCESSES": "4"}) == (1, 4)
  assert P.process_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}) == (2, 3)
  assert P.process_from_env({}) == (0, 1)
  with pytest.raises(UserError, match="index 2 of 2"):
    P.Job("root", process_index=2, process_count=2)


def test_another_input_is_refused_unless_overwrite(tmp_path, photos):
  folder, whole = photos
  root = tmp_path / "root"
  run_prepare(F.open_inputs([folder], shard_size=3), root)
  with pytest.raises(UserError, match="input.shard_size: 3 then, 4 now.*--overwrite"):
    run_prepare(F.open_inputs([folder], shard_size=4), root)
  s = run_prepare(F.open_inputs([folder], shard_size=4), root, overwrite=True)
  assert s["shards"] == 3 and len(S.open_records(str(root), "pair")) == 11
  assert not [n for n in tree(root) if n.endswith("-of-00004")], "old shards left behind"
  with pytest.raises(UserError, match="one process"):
    P.Job(str(root), process_count=2, overwrite=True)


# ------------------------------------------------------------------------------------------------
# User errors: one line, status 2
# ------------------------------------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str]:
  with pytest.raises(SystemExit) as e:
    cli.run(data_main.main, argv=["nextstep_jax.data", *args], absl_flags=False)
  return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing_input", "unknown_kind", "empty_folder", "unknown_flag",
                                  "bad_value", "kind_of_format", "unknown_tfds", "no_command"])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, case):
  monkeypatch.delenv("NEXTSTEP_DEBUG", raising=False)
  (tmp_path / "empty").mkdir()
  (tmp_path / "i.csv").write_text("image,caption\n")
  out = f"--out={tmp_path / 'root'}"
  args, names = {
      "missing_input": (["prepare", f"--input={tmp_path}/nope.jsonl", out], ["nope.jsonl"]),
      "unknown_kind": (["prepare", f"--input={tmp_path}", "--kind=video", out],
                       ["--kind", "video"]),
      "empty_folder": (["prepare", f"--input={tmp_path / 'empty'}", out], ["empty", "no images"]),
      "unknown_flag": (["prepare", f"--input={tmp_path}", out, "--bogus=1"], ["--bogus"]),
      "bad_value": (["prepare", f"--input={tmp_path}", out, "--shard_size=many"], ["--shard_size"]),
      "kind_of_format": (["prepare", f"--input={tmp_path / 'i.csv'}", "--kind=edit", out],
                         ["csv", "edit"]),
      "unknown_tfds": (["prepare", "--input=tfds:no_such_set", f"--tfds_data_dir={tmp_path}", out],
                       ["tfds:no_such_set"]),
      "no_command": ([f"--input={tmp_path}"], ["prepare"]),
  }[case]
  code, err = run_cli(capsys, *args)
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  for name in names:
    assert name in err, (name, err)
  assert not (tmp_path / "root").exists()


def test_the_command_exits_2_without_a_traceback(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("NEXTSTEP_DEBUG", None)
  proc = subprocess.run([sys.executable, "-m", "nextstep_jax.data", "prepare",
                         f"--input={tmp_path}/missing", f"--out={tmp_path}/root"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip() == f"error: input {tmp_path}/missing does not exist"


# ------------------------------------------------------------------------------------------------
# Mixtures by the kinds present
# ------------------------------------------------------------------------------------------------

def test_absent_kind_is_refused_or_renormalized(tmp_path):
  good = S.encode_image(np.zeros((32, 32, 3), np.uint8))
  for kind, layout, images in (("pair", "TI", [good]), ("edit", "ITI", [good, good])):
    S.write_records(str(tmp_path), kind, {"train": [dict(
        layout=layout, texts=["x"], images=images, latents=[],
        latent_shapes=np.zeros((0, 3), np.int32))]})
  ratios = dict(text=0.2, pair=0.6, edit=0.1, interleaved=0.1)
  config = demo_config(tmp_path / "w", ratios, source=str(tmp_path))
  with pytest.raises(UserError, match=r"data.ratios.text=0.2 but data.source .* holds no text "
                                      r"records \(.*nextstep_records/text/1.0.0; kinds found: "
                                      r"pair, edit\).*data.renormalize=True"):
    settings_lib.data_settings(config)
  config.data.renormalize = True
  assert settings_lib.data_settings(config).ratios == pytest.approx(dict(pair=6 / 7, edit=1 / 7))
  config.data.ratios = dict(text=1.0, pair=0.0, edit=0.0, interleaved=1.0)
  with pytest.raises(UserError, match="none of the kinds with a positive ratio"):
    settings_lib.data_settings(config)
  # The digits hold every kind; a present kind is never renormalized away.
  assert settings_lib.present_ratios(ratios, "digits") == pytest.approx(ratios)
  assert settings_lib.present_ratios(dict(pair=0.5, edit=0.5), str(tmp_path)) == pytest.approx(
      dict(pair=0.5, edit=0.5))


def test_renormalize_lets_the_ratios_be_weights():
  from configs import demo
  from nextstep_jax import config as config_lib
  c = demo.get_config()
  with c.unlocked():
    c.data.ratios.pair = 2.0
  with pytest.raises(config_lib.ConfigError, match="data.ratios sum to .*data.renormalize=True"):
    config_lib.validate(c, paths=False)
  with c.unlocked():
    c.data.renormalize = True
  config_lib.validate(c, paths=False)
