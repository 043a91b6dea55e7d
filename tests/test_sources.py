"""Converters and readers: aspect buckets, every kind of bad record (skipped or converted and
counted, never raising), ArrayRecord round trips, and the pipeline reading converted data."""

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from nextstep_jax.data import formats as F
from nextstep_jax.data import mixture as M
from nextstep_jax.data import sources as S
from nextstep_jax.batch import validate_batch
from tests.test_mixture import demo_config
from tests.test_sequences import CharTokenizer

# Small test buckets: 16 px per token, base sides 4 and 8 (64 px and 128 px images).
OPTS = dict(unit=16, sides=(4, 8))


def jpeg(w, h, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
  img = Image.fromarray(arr)
  if mode != "RGB":
    img = img.convert(mode)
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def png(w, h, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  if mode == "I;16":
    img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))   # mode I;16
  else:
    img = Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def png_bomb(w=100_000, h=100_000):
  """A valid PNG header claiming a gigantic image (never decodable)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00"))
          + chunk(b"IEND", b""))


def test_aspect_buckets_follow_spec():
  b16 = S.aspect_buckets(16)
  assert len(b16) == 17 and (16, 16) in b16 and (8, 32) in b16 and (32, 8) in b16
  assert all(240 <= h * w <= 256 for h, w in b16)
  b32 = S.aspect_buckets(32)
  assert (64, 16) in b32 and all(960 <= h * w <= 1024 for h, w in b32)
  assert S.area_sides(256, 256) == (16,) and S.area_sides(256, 1024) == (16, 32)
  assert S.area_sides(16, 16) == (4,)
  with pytest.raises(ValueError, match="square number"):
    S.area_sides(250, 1024)
  assert S.choose_bucket(512, 512, (16, 32), 16) == (32, 32)
  assert S.choose_bucket(400, 400, (16, 32), 16) == (16, 16)
  assert S.choose_bucket(300, 900, (16,), 16) == (9, 28)    # aspect 1/3: nearest 9 x 28
  assert S.choose_bucket(900, 300, (16,), 16) == (28, 9)
  assert S.choose_bucket(200, 200, (16,), 16) is None       # below 256^2 (and 90% of it)
  assert S.choose_bucket(250, 250, (16,), 16) == (16, 16)   # within 90%: slight upscale


def test_image_folder_bad_records(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  good = jpeg(100, 80)
  files = {
      "good.jpg": (good, b"a red square"),
      "truncated.jpg": (good[: len(good) // 2], b"cut in half"),
      "zero.jpg": (b"", b"empty file"),
      "notimage.jpg": (b"this is text, not a JPEG" * 10, b"text pretending"),
      "latin1.png": (png(90, 90), b"caf\xe9 au lait \xff"),
      "tiny.png": (png(20, 20), b"too small"),
      "huge.png": (png(1200, 1000), b"over max_pixels"),
      "bomb.png": (png_bomb(), b"decompression bomb"),
      "large.png": (png(800, 800), b"large but allowed"),
      "cmyk.jpg": (jpeg(100, 100, "CMYK"), b"cmyk"),
      "rgba.png": (png(100, 70, "RGBA"), b"rgba"),
      "gray.png": (png(70, 100, "L"), b"grey"),
      "gray16.png": (png(80, 80, "I;16"), b"16 bit grey"),
      "nocaption.png": (png(100, 100), None),
      "emptycaption.png": (png(100, 100), b"   \n"),
  }
  for name, (data, caption) in files.items():
    (folder / name).write_bytes(data)
    if caption is not None:
      (folder / (name.rsplit(".", 1)[0] + ".txt")).write_bytes(caption)
  counters = F.convert_image_folder(str(folder), str(tmp_path / "root"),
                                    F.ConvertOptions(max_pixels=1_000_000, small="drop", **OPTS))
  assert counters["written"] == 7
  assert counters["skipped/decode_error"] == 2
  assert counters["skipped/empty_file"] == 1
  assert counters["skipped/too_small"] == 1
  assert counters["skipped/too_large"] == 2
  assert counters["skipped/missing_caption"] == 2
  assert counters["converted/caption_not_utf8"] == 1
  assert counters["converted/downscaled_large"] == 1
  for mode in ("CMYK", "RGBA", "L", "I_16"):
    assert counters[f"converted/mode_{mode}"] == 1, mode

  src = S.open_records(str(tmp_path / "root"), "pair")
  assert len(src) == 7
  decode = S.RecordDecoder("pair", 16, (4, 8), pixel=True)
  captions = set()
  for i in range(len(src)):
    rec = decode(src[i])
    (img,) = rec.images
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    grid = (img.shape[0] // 16, img.shape[1] // 16)
    assert grid in S.aspect_buckets(4) + S.aspect_buckets(8), grid
    captions.add(rec.record["caption"])
  assert "café au lait ÿ" in captions and "a red square" in captions


def test_webdataset_shards(tmp_path):
  shard = tmp_path / "shard-000.tar"
  members = [("a.jpg", jpeg(120, 90)), ("a.txt", b"first"),
             ("b.png", png(90, 120)), ("b.json", json.dumps({"caption": "second"}).encode()),
             ("c.jpg", jpeg(100, 100)),
             ("d.txt", b"caption without image"),
             ("e.jpg", b""), ("e.txt", b"empty image")]
  with tarfile.open(shard, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  counters = F.convert_webdataset([str(shard)], str(tmp_path / "root"), F.ConvertOptions(**OPTS))
  assert counters["written"] == 2
  assert counters["skipped/missing_caption"] == 1
  assert counters["skipped/missing_image"] == 1
  assert counters["skipped/empty_file"] == 1
  src = S.open_records(str(tmp_path / "root"), "pair")
  decode = S.RecordDecoder("pair", 16, (4, 8), pixel=True)
  assert sorted(decode(src[i]).record["caption"] for i in range(2)) == ["first", "second"]


def write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(row if isinstance(row, str) else json.dumps(row))
      f.write("\n")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  """A data root with all four kinds (converted from jsonl) and the converters' counters."""
  tmp = tmp_path_factory.mktemp("sources")
  imgs = tmp / "img"
  imgs.mkdir()
  for i in range(6):
    (imgs / f"{i}.jpg").write_bytes(jpeg(100 + 10 * i, 90, seed=i))
  (imgs / "wide.png").write_bytes(png(200, 60))
  root = str(tmp / "root")
  opts = F.ConvertOptions(**OPTS)
  counters = {}
  write_jsonl(tmp / "pairs.jsonl", [
      *[{"image": f"img/{i}.jpg", "caption": f"picture {i}"} for i in range(6)],
      {"image": "img/missing.jpg", "caption": "no file"},
      "{broken json",
      {"image": "img/0.jpg"}])
  counters["pair"] = F.convert_pairs_jsonl(str(tmp / "pairs.jsonl"), root, opts)
  write_jsonl(tmp / "edits.jsonl", [
      {"source": "img/1.jpg", "instruction": "make it wide", "target": "img/wide.png"},
      {"source": ["img/2.jpg", "img/3.jpg"], "instruction": "merge", "target": "img/4.jpg"},
      {"source": "img/1.jpg", "instruction": "", "target": "img/2.jpg"}])
  counters["edit"] = F.convert_edits_jsonl(str(tmp / "edits.jsonl"), root, opts)
  write_jsonl(tmp / "inter.jsonl", [
      {"segments": [{"text": "first"}, {"image": "img/0.jpg"}, {"text": "then"},
                    {"image": "img/wide.png"}]},
      {"segments": [{"text": "no images here"}]}])
  counters["interleaved"] = F.convert_interleaved_jsonl(str(tmp / "inter.jsonl"), root, opts)
  write_jsonl(tmp / "text.jsonl", [{"text": "A document about digits. " * 40},
                                   {"text": "Short one."}, {"text": ""}])
  counters["text"] = F.convert_text_jsonl(str(tmp / "text.jsonl"), root)
  return root, counters


def test_jsonl_converters(data_root):
  root, counters = data_root
  assert counters["pair"] == {"written": 6, "skipped/missing_file": 1, "skipped/bad_json": 1,
                              "skipped/missing_caption": 1}
  assert counters["edit"]["written"] == 2 and counters["edit"]["skipped/missing_instruction"] == 1
  assert counters["interleaved"]["written"] == 1
  assert counters["interleaved"]["skipped/bad_layout"] == 1
  assert counters["text"] == {"written": 2, "skipped/missing_text": 1}
  assert S.available_kinds(root) == list(S.KINDS)
  edit = S.RecordDecoder("edit", 16, (4, 8), pixel=True)
  src = S.open_records(root, "edit")
  for i in range(len(src)):
    rec = edit(src[i])
    shapes = {im.shape for im in rec.images}
    assert len(shapes) == 1, "edit images share the source's bucket"
    assert rec.record["instruction"] in ("make it wide", "merge")
  inter = S.RecordDecoder("interleaved", 16, (4, 8), pixel=False)
  rec = inter(S.open_records(root, "interleaved")[0])
  assert rec.record["segments"] == ["first", 0, "then", 1]
  with pytest.raises(FileExistsError, match="overwrite=True"):
    F.convert_text_jsonl(str(root) + "/../text.jsonl", root)


def test_reader_rejects_bad_stored_records(tmp_path):
  good = S.encode_image(np.zeros((64, 64, 3), np.uint8))
  rows = [
      dict(layout="TI", texts=["fine"], images=[good]),
      dict(layout="TI", texts=["garbage bytes"], images=[b"\x00garbage" * 20]),
      dict(layout="TI", texts=[" "], images=[good]),
      dict(layout="TII", texts=["two images declared"], images=[good]),
      dict(layout="TI", texts=["odd size"], images=[S.encode_image(np.zeros((72, 60, 3), np.uint8))]),
  ]
  for r in rows:
    r.update(latents=[], latent_shapes=np.zeros((0, 3), np.int32))
  S.write_records(str(tmp_path), "pair", {"train": rows})
  src = S.open_records(str(tmp_path), "pair")
  decode = S.RecordDecoder("pair", 16, (4, 8), pixel=True)
  reasons = []
  for i in range(len(src)):
    try:
      rec = decode(src[i])
      reasons.append(("ok", tuple(rec.notes), rec.images[0].shape))
    except S.BadRecord as e:
      reasons.append((e.reason,))
  assert sorted(r[0] for r in reasons) == sorted(
      ["ok", "decode_error", "missing_caption", "bad_layout", "ok"])
  assert ("ok", ("refit_area",), (64, 64, 3)) in reasons, "off-bucket images are re-fitted"


def test_pipeline_reads_converted_data_and_counts_bad_records(data_root, tmp_path):
  root, _ = data_root
  # Add a pair component with corrupt stored records next to good ones.
  bad_root = tmp_path / "root"
  import shutil
  shutil.copytree(root, bad_root)
  good = [S.encode_image(np.full((64, 64, 3), 40 * i, np.uint8)) for i in range(4)]
  rows = [dict(layout="TI", texts=[f"good {i}"], images=[good[i]]) for i in range(4)]
  rows += [dict(layout="TI", texts=["broken"], images=[b"\xff\xd8\xff" + b"\x00" * 50]),
           dict(layout="TI", texts=[""], images=[good[0]])]
  for r in rows:
    r.update(latents=[], latent_shapes=np.zeros((0, 3), np.int32))
  S.write_records(str(bad_root), "pair", {"train": rows}, overwrite=True)
  config = demo_config(tmp_path, dict(text=0.2, pair=0.5, edit=0.1, interleaved=0.2),
                       source=str(bad_root), image_size=64, min_image_tokens=16,
                       max_image_tokens=64, max_images=4, max_row_image_tokens=256, seq_len=256,
                       batch_size=2)
  config.image.vae_factor = 8
  config.image.token_dim = 16
  it = M.build_train_iterator(config, CharTokenizer())
  shapes = set()
  for _ in range(12):
    batch = next(it)
    validate_batch(batch, 256)
    shapes.add(batch["images"].shape[2:4])
    assert batch["images"].shape[:2] == (2, 4)
    ids = batch["image_index"]
    h, w = batch["images"].shape[2:4]
    assert np.all(ids < 4 * (h // 16) * (w // 16))
  counters = it.counters
  assert counters["skipped/decode_error"] >= 1 and counters["skipped/missing_caption"] >= 1
  assert counters["samples/text"] > 0 and counters["samples/edit"] > 0
  assert counters["samples/interleaved"] > 0 and counters["samples/pair"] > 0
  print("pixel batch image shapes:", sorted(shapes), dict(counters))


def test_latent_records_feed_the_latent_path(tmp_path):
  imgs = tmp_path / "img"
  imgs.mkdir()
  for i in range(3):
    (imgs / f"{i}.png").write_bytes(png(64 + 32 * i, 64, seed=i))
  write_jsonl(tmp_path / "pairs.jsonl",
              [{"image": f"img/{i}.png", "caption": f"image {i}"} for i in range(3)])

  def encode(img):   # (B, H, W, 3) -> (B, H/16, W/16, 16): a fake encoder, mean colour per patch
    b, h, w = img.shape[0], img.shape[1] // 16, img.shape[2] // 16
    x = img.reshape(b, h, 16, w, 16, 3).mean(axis=(2, 4)) / 255.0
    return np.concatenate([x] * 5 + [x[..., :1]], axis=-1)
  root = tmp_path / "root"
  latents = F.LatentEncoder(encode, batch_size=2)
  counters = F.convert_pairs_jsonl(str(tmp_path / "pairs.jsonl"), str(root),
                                   F.ConvertOptions(latents=latents, **OPTS))
  assert counters["written"] == 3
  config = demo_config(tmp_path, dict(pair=1.0), source=str(root), payload="image_tokens",
                       image_size=64, min_image_tokens=16, max_image_tokens=64,
                       max_row_image_tokens=96, seq_len=128, batch_size=2)
  config.image.vae_factor = 8
  batch = next(M.build_train_iterator(config, CharTokenizer()))
  validate_batch(batch, 128)
  assert batch["image_tokens"].shape == (2, 96, 16)
  used = batch["image_index"][batch["image_index"] >= 0]
  assert used.size > 0 and np.abs(batch["image_tokens"]).sum() > 0
  # Without latents, the latent path refuses to start.
  plain = tmp_path / "plain"
  F.convert_pairs_jsonl(str(tmp_path / "pairs.jsonl"), str(plain), F.ConvertOptions(**OPTS))
  config.data.source = str(plain)
  with pytest.raises(ValueError, match="carry no latents"):
    M.build_train_iterator(config, CharTokenizer())


def test_all_bad_data_fails_loudly(tmp_path, monkeypatch):
  rows = [dict(layout="TI", texts=["x"], images=[b"not an image"], latents=[],
               latent_shapes=np.zeros((0, 3), np.int32)) for _ in range(3)]
  S.write_records(str(tmp_path / "root"), "pair", {"train": rows})
  config = demo_config(tmp_path, dict(pair=1.0), source=str(tmp_path / "root"), image_size=64,
                       min_image_tokens=16, max_image_tokens=64)
  config.image.vae_factor = 8
  monkeypatch.setattr(M.PackedBatchIterator, "MAX_BARREN", 50)
  it = M.build_train_iterator(config, CharTokenizer())
  with pytest.raises(RuntimeError, match="skipped/decode_error"):
    next(it)
