"""The latent path of the data command (``python -m nextstep_jax.data prepare --vae=...``): the
stored latents are the VAE's tokens of the same pixels, latent_stats.json is their mean and std,
3 training steps read them with data.payload=image_tokens; batching by shape keeps the input order;
resume and several processes give the same bytes; another VAE is refused; user errors in one line.
Inputs are built here with PIL; everything is written under tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nextstep_jax import run as run_lib
from nextstep_jax import vae_tokens
from nextstep_jax.batch import from_uint8
from nextstep_jax.data import __main__ as data_main
from nextstep_jax.data import formats as F
from nextstep_jax.data import mixture as M
from nextstep_jax.data import prepare as P
from nextstep_jax.data import sources as S
from nextstep_jax.errors import UserError
from nextstep_jax.models import vae as vae_lib
from tests.runs import demo_assets, jit_build
from tests.test_mixture import demo_config
from tests.test_prepare import run_cli, run_prepare, train3, tree, write_jsonl
from tests.tolerance import assert_close_fp32

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return demo_assets(str(tmp_path_factory.mktemp("latent_assets")))


@pytest.fixture(scope="module")
def encoder(assets) -> F.LatentEncoder:
  """The demo VAE's encoder as the command builds it (shared: compiled once per shape)."""
  vae = run_lib.load_vae(assets["vae"])
  return F.LatentEncoder(vae_tokens.pixel_encoder(vae), batch_size=3, patch_size=2,
                         identity=vae_tokens.vae_identity(vae), dtype="float32")


def photos(folder, n: int = 7) -> str:
  """n captioned images: squares (the 4x4 bucket) and, every third, a 32x64 one (the 3x6 bucket)."""
  folder.mkdir(parents=True)
  for i in range(n):
    side = (32, 64) if i % 3 == 2 else (40, 40)
    Image.fromarray(np.random.default_rng(i).integers(0, 255, side + (3,), dtype=np.uint8)).save(
        folder / f"{i}.png")
    (folder / f"{i}.txt").write_text(f"photo {i}")
  return str(folder)


def stored(root, kind: str = "pair") -> list[tuple[np.ndarray, np.ndarray]]:
  """(pixels uint8 (H, W, 3), latents (h, w, d)) of every image of every record, in order."""
  src = S.open_records(str(root), kind)
  pixel = S.RecordDecoder(kind, 8, (4,), pixel=True)
  latent = S.RecordDecoder(kind, 8, (4,), pixel=False)
  out = []
  for i in range(len(src)):
    images, latents = pixel(src[i]).images, latent(src[i]).latents
    out += list(zip(images, latents))
  return out


def test_prepare_with_vae_stores_the_vae_tokens_and_their_stats_and_trains(tmp_path, assets,
                                                                           capsys):
  folder = photos(tmp_path / "photos")
  root = tmp_path / "root"
  data_main.main(["prepare", f"--input={folder}", f"--out={root}", "--config=configs/demo.py",
                  f"--vae={assets['vae']}", "--latent_batch=2", "--latent_dtype=float32",
                  "--image_format=png", "--shard_size=4", "--progress_every=1e9"])
  out = capsys.readouterr().out
  assert "latents: 7 images, " in out and "latent_stats.json" in out, out
  assert "--config.data.payload=image_tokens --config.data.renormalize=True" in out, out
  pairs = stored(root)
  assert len(pairs) == 7 and {p.shape for p, _ in pairs} == {(32, 32, 3), (24, 48, 3)}
  # The latents are what the VAE encodes from the stored pixels (eager, one image at a time).
  vae = run_lib.load_vae(assets["vae"])
  for px, lat in pairs:
    assert lat.dtype == np.float32 and lat.shape == (px.shape[0] // 8, px.shape[1] // 8, 16)
    direct = np.asarray(vae_tokens.encode_tokens(vae, from_uint8(px[None])))[0]
    assert_close_fp32(lat.reshape(-1, 16), direct)
  # latent_stats.json: numpy's mean and std of the stored tokens, per dimension and per channel.
  stats = json.loads((root / P.LATENT_STATS_FILE).read_text())
  tokens = np.concatenate([lat.reshape(-1, 16) for _, lat in pairs]).astype(np.float64)
  assert (stats["num_images"], stats["num_tokens"], stats["token_dim"]) == (7, len(tokens), 16)
  np.testing.assert_allclose(stats["token_mean"], tokens.mean(0), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(stats["token_std"], tokens.std(0), rtol=1e-9, atol=1e-12)
  channels = tokens.reshape(-1, 4, 4).transpose(1, 0, 2).reshape(4, -1)   # (c, pi*p+pj)
  np.testing.assert_allclose(stats["channel_mean"], channels.mean(1), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(stats["channel_std"], channels.std(1), rtol=1e-9, atol=1e-12)
  assert stats["splits"]["pair/train"]["num_images"] == 7
  assert stats["encoder"]["identity"] == vae_tokens.vae_identity(vae)
  # One field: data.payload=image_tokens trains on them (pairs only: renormalized), no VAE.
  counters = train3(assets, root, tmp_path / "work", payload="image_tokens", renormalize=True)
  assert counters["samples/pair"] > 0, counters
  assert not [k for k in counters if k.startswith("skipped/")], counters


def test_float16_latents_by_default(tmp_path, assets, encoder):
  folder = photos(tmp_path / "photos", 3)
  half = F.LatentEncoder(encoder.encode, 3, 2, encoder.identity)   # dtype float16
  run_prepare(F.open_inputs([folder]), tmp_path / "half", options=F.ConvertOptions(
      unit=8, sides=(4,), image_format="png", latents=half))
  run_prepare(F.open_inputs([folder]), tmp_path / "full", options=F.ConvertOptions(
      unit=8, sides=(4,), image_format="png", latents=encoder))
  for (_, h), (_, f) in zip(stored(tmp_path / "half"), stored(tmp_path / "full")):
    assert h.dtype == np.float16 and f.dtype == np.float32
    np.testing.assert_allclose(h.astype(np.float32), f, rtol=1e-3, atol=1e-3)


def test_batches_of_one_shape_keep_the_input_order():
  """A fake encoder (each image's mean colour per token) that logs its batches."""
  calls = []

  def encode(x):
    calls.append(x.shape)
    b, h, w = x.shape[0], x.shape[1] // 8, x.shape[2] // 8
    return x.reshape(b, h, 8, w, 8, 3).mean((2, 4)).repeat(2, -1).astype(np.float32)

  batcher = F.LatentBatcher(F.LatentEncoder(encode, batch_size=3), unit=8, max_pending=4)
  rng = np.random.default_rng(0)
  shapes = [(32, 32), (24, 48), (32, 32), (32, 32), (24, 48), (32, 32), (40, 16), (32, 32)]
  pixels = [rng.integers(0, 255, s + (3,), dtype=np.uint8) for s in shapes]
  out = []
  for i, px in enumerate(pixels):
    out += batcher.add({"texts": [str(i)], F.PIXELS: [px]})
  assert calls == [(3, 32, 32, 3), (3, 24, 48, 3)]   # (24, 48): the oldest waiting, padded
  out += batcher.flush()
  assert [r["texts"][0] for r in out] == [str(i) for i in range(8)]
  assert calls[2:] == [(3, 32, 32, 3), (3, 40, 16, 3)]
  for r, px in zip(out, pixels):
    lat = np.frombuffer(r["latents"][0], np.float16).reshape(r["latent_shapes"][0])
    np.testing.assert_allclose(lat, encode(px[None])[0], rtol=1e-3)
    assert F.PIXELS not in r
  tokens = np.concatenate([np.frombuffer(r["latents"][0], np.float16).reshape(-1, 6)
                           for r in out]).astype(np.float64)
  assert (batcher.sums.images, batcher.sums.tokens) == (8, len(tokens))
  np.testing.assert_allclose(batcher.sums.stats(1)["token_std"], tokens.std(0), rtol=1e-9)


def test_resume_and_processes_give_the_same_bytes(tmp_path, encoder, monkeypatch):
  folder = photos(tmp_path / "photos")
  options = F.ConvertOptions(unit=8, sides=(4,), image_format="png", latents=encoder)
  run_prepare(F.open_inputs([folder], shard_size=2), tmp_path / "whole", options=options)
  whole = tree(tmp_path / "whole")
  assert json.loads(whole[P.LATENT_STATS_FILE])["num_images"] == 7
  # Two processes, the second one finishing last: the same files, latent_stats.json included.
  for index in (1, 0):
    run_prepare(F.open_inputs([folder], shard_size=2), tmp_path / "two", options=options,
                process_index=index, process_count=2)
  assert tree(tmp_path / "two") == whole
  # Interrupted in the third unit, then resumed.
  calls, write = {"n": 0}, S.ShardWriter.write

  def dies_at_the_fifth_record(self, record):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt
    write(self, record)
  monkeypatch.setattr(S.ShardWriter, "write", dies_at_the_fifth_record)
  with pytest.raises(KeyboardInterrupt):
    run_prepare(F.open_inputs([folder], shard_size=2), tmp_path / "resumed", options=options)
  monkeypatch.setattr(S.ShardWriter, "write", write)
  run_prepare(F.open_inputs([folder], shard_size=2), tmp_path / "resumed", options=options)
  assert tree(tmp_path / "resumed") == whole


def test_another_vae_is_refused(tmp_path, encoder):
  folder = photos(tmp_path / "photos", 3)
  root = tmp_path / "root"
  run_prepare(F.open_inputs([folder]), root, options=F.ConvertOptions(
      unit=8, sides=(4,), latents=encoder))
  other = jit_build(lambda: vae_lib.build_vae("demo", seed=1))
  latents = F.LatentEncoder(vae_tokens.pixel_encoder(other), 3, 2, vae_tokens.vae_identity(other),
                            "float32")   # all as before but the weights
  options = F.ConvertOptions(unit=8, sides=(4,), latents=latents)
  with pytest.raises(UserError, match=r"another input or other options \(options.latents.identity"
                                      r".weights_sha256: .*--overwrite"):
    run_prepare(F.open_inputs([folder]), root, options=options)   # a resume
  edits = write_jsonl(tmp_path / "edits.jsonl", [
      {"source": "photos/0.png", "instruction": "flip it", "target": "photos/1.png"}])
  with pytest.raises(UserError,
                     match=r"holds pair/train latents of another encoder \(weights_sha256"):
    run_prepare(F.open_inputs([edits], "edit"), root, options=options)   # another kind


def test_latent_path_checks_what_it_reads(tmp_path):
  good = S.encode_image(np.zeros((32, 32, 3), np.uint8), "png")
  lat = np.arange(4 * 4 * 16, dtype=np.float32).reshape(4, 4, 16)

  def record(blob, shape):
    return dict(layout="TI", texts=["x"], images=[good], latents=[blob],
                latent_shapes=np.asarray([shape], np.int32))
  decode = S.RecordDecoder("pair", 8, (4,), pixel=False)
  for blob in (lat.tobytes(), lat.astype(np.float16).tobytes()):
    got = decode(record(blob, lat.shape))
    assert got.images == [None] and np.array_equal(got.latents[0], lat)   # pixels not decoded
  for blob, shape, reason in ((lat.tobytes()[:-4], lat.shape, "bad_latents"),
                              (lat[:2].tobytes(), (2, 4, 16), "bad_latents")):
    with pytest.raises(S.BadRecord) as e:
      decode(record(blob, shape))
    assert e.value.reason == reason
  with pytest.raises(S.BadRecord) as e:   # 32 px at 8 px per token: not a bucket of side 8
    S.RecordDecoder("pair", 8, (8,), pixel=False)(record(lat.tobytes(), lat.shape))
  assert e.value.reason == "latents_off_bucket"
  # Tokens of another VAE (16-d where the config reads 64-d) are refused before training starts.
  S.write_records(str(tmp_path), "pair", {"train": [record(lat.tobytes(), lat.shape)]})
  config = demo_config(tmp_path / "w", dict(pair=1.0), source=str(tmp_path), payload="image_tokens")
  config.image.update(latent_channels=16, token_dim=64)
  with pytest.raises(UserError, match=r"pair latents are 16-d tokens, the config's image.token_dim "
                                      r"is 64: prepared with another VAE"):
    M.build_train_iterator(config, None)


@pytest.mark.parametrize("case", ["not_a_dir", "no_vae_there", "unit_of_config", "unit_flag",
                                  "text_kind", "batch"])
def test_vae_user_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, assets, case):
  monkeypatch.delenv("NEXTSTEP_DEBUG", raising=False)
  folder = photos(tmp_path / "photos", 1)
  (tmp_path / "empty").mkdir()
  base = ["prepare", f"--input={folder}", f"--out={tmp_path / 'root'}"]
  vae = f"--vae={assets['vae']}"
  args, names = {
      "not_a_dir": ([f"--vae={tmp_path}/nope"], [f"--vae={tmp_path}/nope", "not a directory"]),
      "no_vae_there": ([f"--vae={tmp_path / 'empty'}"], [f"--vae={tmp_path / 'empty'}"]),
      "unit_of_config": ([vae, "--config=configs/stage2.py"],
                         ["--vae=", "8 px", "--config=configs/stage2.py asks 16 px"]),
      "unit_flag": ([vae, "--unit=16"], ["--vae=", "--unit asks 16 px"]),
      "text_kind": ([vae, "--kind=text"], ["--vae", "--kind=text"]),
      "batch": ([vae, "--latent_batch=0"], ["--latent_batch=0"]),
  }[case]
  if case == "text_kind":
    base[1] = f"--input={write_jsonl(tmp_path / 't.jsonl', [{'text': 'a text'}])}"
  code, err = run_cli(capsys, *base, *args)
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
  for name in names:
    assert name in err, (name, err)
  assert not (tmp_path / "root").exists()
