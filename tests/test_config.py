"""Configs: presets and stage numbers against SPEC, validation errors, overrides and loading."""

import os

import ml_collections
import pytest

from configs import common
from nextstep_jax.config import ConfigError, validate
from nextstep_jax.overrides import apply_overrides, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_NAMES = ("stage1", "stage2", "anneal", "sft")

# SPEC §7, written out here independently of configs/common.py:
# (min lr, max lr, schedule, weight decay, ce weight, fm weight, steps, warm-up, seq len per rank,
#  image area (min, max), image tokens (min, max), training tokens, ratios text/pair/edit/interleaved)
SPEC_TABLE = {
  "stage1": (1e-4, 1e-4, "constant", 0.1, 0.01, 1.0, 200_000, 5_000, 16384,
             (65536, 65536), (256, 256), 1.23e12, (0.2, 0.6, 0.0, 0.2)),
  "stage2": (1e-5, 1e-5, "constant", 0.1, 0.01, 1.0, 100_000, 5_000, 16384,
             (65536, 262144), (256, 1024), 0.61e12, (0.2, 0.6, 0.0, 0.2)),
  "anneal": (0.0, 1e-5, "cosine", 0.1, 0.01, 1.0, 20_000, 0, 16384,
             (65536, 262144), (256, 1024), 40e9, (0.2, 0.6, 0.1, 0.1)),
  "sft": (0.0, 1e-5, "cosine", 0.1, 0.01, 1.0, 10_000, 500, 8192,
          (65536, 262144), (256, 1024), 5e9, (0.0, 0.9, 0.1, 0.0)),
}


def _config(name: str) -> ml_collections.ConfigDict:
  return load_config(os.path.join(REPO, "configs", f"{name}.py"), check=False)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_config_matches_spec_table(name):
  c = _config(name)
  validate(c, num_devices=64, paths=False)
  (min_lr, lr, schedule, wd, ce, fm, steps, warmup, seq, area, tokens, total,
   ratios) = SPEC_TABLE[name]
  assert c.optim.min_lr == pytest.approx(min_lr, abs=1e-12)
  assert c.optim.lr == pytest.approx(lr, rel=1e-12)
  assert c.optim.schedule == schedule
  assert c.optim.weight_decay == wd
  assert (c.loss.ce_weight, c.loss.fm_weight) == (ce, fm)
  assert c.steps == steps
  assert c.optim.warmup_steps == warmup
  assert c.data.seq_len == seq
  assert (c.data.min_image_tokens, c.data.max_image_tokens) == tokens
  assert c.data.image_size ** 2 == area[1]
  got = c.data.ratios
  assert (got.text, got.pair, got.edit, got.interleaved) == pytest.approx(ratios)
  # The global batch is not published; it is sized so the run sees the table's tokens.
  seen = c.data.batch_size * c.data.seq_len * c.steps
  assert abs(seen / total - 1.0) < 0.05, (seen, total)
  # Open-code details (SPEC §7) and the 14B backbone with the base head (SPEC §3, §4).
  assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.clip_norm) == (0.9, 0.95, 1e-8, 1.0)
  m = c.model
  assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim,
          m.intermediate_size, m.vocab_size, m.rope_theta) == (
            5120, 48, 40, 8, 128, 13824, 152064, 1e6)
  assert (c.head.num_layers, c.head.dim, c.head.batch_mul) == (12, 1536, 4)
  assert (m.dtype, m.param_dtype, m.remat) == ("bfloat16", "float32", "full")
  assert dict(c.mesh.axes) == {"data": 1, "fsdp": -1, "tensor": 1}
  assert (c.image.latent_channels, c.image.patch_size, c.image.token_dim) == (16, 2, 64)


@pytest.mark.parametrize("name", STAGE_NAMES + ("demo",))
def test_configs_are_locked(name):
  c = _config(name)
  with pytest.raises(AttributeError, match="does not exist"):
    c.optim.learning_rate = 1.0
  with pytest.raises(ConfigError, match="optim.learning_rate"):
    apply_overrides(c, {"optim.learning_rate": 1.0})


def test_dpo_row_kept_as_data():
  dpo = common.STAGES["dpo"]
  assert (dpo["lr"], dpo["schedule"], dpo["steps"], dpo["warmup_steps"], dpo["weight_decay"]) == (
    2e-6, "constant", 300, 200, 0.1)


def test_backbone_presets_match_published_qwen25_configs():
  want = {  # hidden, layers, heads, kv heads, head_dim, intermediate, vocab, rms eps
    "qwen2.5-0.5b": (896, 24, 14, 2, 64, 4864, 151936, 1e-6),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 128, 8960, 151936, 1e-6),
    "qwen2.5-3b": (2048, 36, 16, 2, 128, 11008, 151936, 1e-6),
    "qwen2.5-7b": (3584, 28, 28, 4, 128, 18944, 152064, 1e-6),
    "qwen2.5-14b": (5120, 48, 40, 8, 128, 13824, 152064, 1e-5),
  }
  for name, dims in want.items():
    b = common.BACKBONES[name]
    assert (b["hidden_size"], b["num_layers"], b["num_heads"], b["num_kv_heads"], b["head_dim"],
            b["intermediate_size"], b["vocab_size"], b["rms_norm_eps"]) == dims, name
    assert b["rope_theta"] == 1e6
  heads = {k: (v["num_layers"], v["dim"], v["batch_mul"]) for k, v in common.HEADS.items()}
  assert heads == {"tiny": (2, 128, 4), "small": (6, 1024, 4), "base": (12, 1536, 4),
                   "large": (24, 2048, 4)}


def test_demo_config():
  c = _config("demo")
  for n in (1, 2, 8):
    validate(c, num_devices=n, paths=False)
  assert (c.model.hidden_size, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads) == (
    128, 4, 4, 2)
  assert (c.data.seq_len, c.data.batch_size, c.data.image_size, c.data.payload) == (
    128, 8, 32, "images")
  assert (c.image.vae_factor, c.image.latent_channels, c.image.patch_size, c.image.token_dim) == (
    4, 4, 2, 16)
  assert (c.model.dtype, c.model.remat, dict(c.mesh.axes)["data"]) == ("float32", "none", -1)
  assert c.data.ratios.edit > 0  # deliberately unlike stage1
  assert c.optim.schedule == "cosine" and 0 < c.optim.warmup_steps < c.steps


def test_token_dim_follows_overrides():
  c = _config("demo")
  apply_overrides(c, ["image.latent_channels=16"])
  assert c.image.token_dim == 64


def test_string_overrides_are_typed():
  c = load_config(os.path.join(REPO, "configs", "demo.py"),
                  ["optim.lr=3e-4", "steps=50", "model.document_mask=false", "workdir=out/x",
                   "--config.data.seq_len=256", "mesh.axes.fsdp=2", "mesh.axes.data=1"],
                  num_devices=2)
  assert c.optim.lr == 3e-4 and c.steps == 50 and c.model.document_mask is False
  assert c.workdir == "out/x" and c.data.seq_len == 256 and c.mesh.axes.fsdp == 2
  with pytest.raises(ConfigError, match="steps"):
    apply_overrides(c, ["steps=abc"])
  with pytest.raises(ConfigError, match="model.dropout"):
    apply_overrides(c, ["model.dropout=0.1"])
  with pytest.raises(ConfigError, match="key.sub=value"):
    apply_overrides(c, ["steps"])


def test_load_config_by_module_name():
  c = load_config("configs.demo", {"steps": 100}, num_devices=1)
  assert c.steps == 100


def _bad(overrides, num_devices=8, match=""):
  c = _config("demo")
  apply_overrides(c, overrides)
  with pytest.raises(ConfigError, match=match):
    validate(c, num_devices=num_devices, paths=False)


def test_mesh_must_fit_device_count():
  _bad({"mesh.axes.data": 3}, num_devices=8,
       match=r"mesh.axes .* product 3, but there are 8 devices")
  _bad({"mesh.axes.fsdp": 3}, num_devices=8, match="fixed axes' product 3 does not divide the 8")
  _bad({"mesh.axes.fsdp": -1}, match="at most one -1")
  _bad({"mesh.axes.tensor": 0}, match="must be >= 1 or -1")


def test_dcn_axes_are_checked_against_the_granules():
  c = _config("demo")
  apply_overrides(c, {"mesh.axes.data": -1, "mesh.dcn_axes.data": 2})
  validate(c, num_devices=8, num_granules=2, paths=False)  # 2 granules of 4 devices, data=4 inside each
  validate(c, num_devices=8, paths=False)  # fixed DCN sizes name the granule count
  with pytest.raises(ConfigError, match="mesh.dcn_axes"):
    validate(c, num_devices=8, num_granules=4, paths=False)
  apply_overrides(c, {"mesh.dcn_axes.data": -1})
  validate(c, num_devices=8, paths=False)  # granule count unknown: structure only
  validate(c, num_devices=8, num_granules=4, paths=False)
  _bad({"mesh.dcn_axes.data": -1, "mesh.dcn_axes.fsdp": -1}, match=r"mesh.dcn_axes .*at most one -1")
  _bad({"mesh.axes.data": 8, "mesh.dcn_axes.data": 2}, match="mesh.axes .* is per granule")


def test_heads_must_divide_by_kv_heads():
  _bad({"model.num_kv_heads": 3}, match="model.num_heads=4 is not divisible by model.num_kv_heads=3")


def test_head_dim_consistency():
  _bad({"model.num_heads": 8, "model.num_kv_heads": 2},
       match=r"model.num_heads \* model.head_dim = 8 \* 32 != model.hidden_size=128")
  c = _config("demo")
  apply_overrides(c, {"model.num_heads": 8, "model.free_head_dim": True})
  validate(c, num_devices=8, paths=False)
  _bad({"model.head_dim": 31, "model.free_head_dim": True}, match="head_dim=31 must be even")


def test_warmup_longer_than_run():
  _bad({"optim.warmup_steps": 1300}, match=r"optim.warmup_steps=1300 is longer than the run \(steps=1200\)")


def test_learning_rates():
  _bad({"optim.lr": -1e-3}, match=r"optim.lr=-0.001 must be a positive number")
  _bad({"optim.lr": 0.0, "optim.min_lr": 0.0}, match=r"optim.lr=0.0 must be a positive number")
  _bad({"optim.min_lr": 1e-2}, match=r"optim.min_lr=0.01 is larger than optim.lr=0.002")
  _bad({"optim.min_lr": -1e-5}, match=r"optim.min_lr=-1e-05 must be >= 0")


def test_ratios():
  _bad({"data.ratios.text": 0.3}, match="data.ratios sum to 1.2")
  _bad({"data.ratios.text": -0.1, "data.ratios.pair": 0.8}, match="data.ratios must be >= 0")


def test_batch_divisible_by_data_parallel_size():
  _bad({"data.batch_size": 6}, num_devices=4,
       match=r"data.batch_size=6 is not divisible by the data-parallel size data\*fsdp=4\*1=4")
  c = _config("demo")
  apply_overrides(c, {"data.batch_size": 6, "mesh.axes.data": 2, "mesh.axes.tensor": -1})
  validate(c, num_devices=8, paths=False)  # data-parallel size 2 divides 6


@pytest.mark.parametrize("field,value", [
  ("model.dtype", "float16"), ("model.param_dtype", "bf16"), ("model.remat", "some"),
  ("model.attention", "flash"), ("optim.schedule", "linear"), ("data.payload", "latents"),
  ("tokenizer.kind", "bpe"), ("vae.preset", "f16")])
def test_unknown_enum_values(field, value):
  _bad({field: value}, match=f"{field}='{value}' is not one of")


def test_every_problem_is_reported_at_once():
  c = _config("demo")
  apply_overrides(c, {"optim.lr": -1.0, "model.num_kv_heads": 3, "data.payload": "x"})
  with pytest.raises(ConfigError) as e:
    validate(c, num_devices=1, paths=False)
  msg = str(e.value)
  assert "optim.lr" in msg and "model.num_kv_heads" in msg and "data.payload" in msg


def test_image_buffer_checks():
  _bad({"data.max_images": 6}, match=r"data.max_images \* tokens per image = 6 \* 16 > "
                                     "data.max_row_image_tokens=80")
  _bad({"data.image_size": 36}, match="data.image_size=36 is not a multiple of")
  _bad({"image.token_dim": 12}, match="image.token_dim=12 != image.latent_channels")


def test_missing_fields_are_named():
  c = common.base_config()
  del c.optim["clip_norm"]
  with pytest.raises(ConfigError, match="missing fields: optim.clip_norm"):
    validate(c, paths=False)


def test_validate_without_device_count_checks_structure():
  c = _config("demo")
  validate(c, paths=False)  # data=-1: nothing to check against devices
  _bad({"mesh.axes.fsdp": -1}, num_devices=None, match="at most one -1")


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_model_builds_abstractly_with_expected_sizes(name):
  """eval_shape of the full 14B NextStep model: nothing is allocated."""
  import importlib

  import jax

  from nextstep_jax.training import trainer as trainer_lib

  cfg = importlib.import_module(f"configs.{name}").get_config()
  _, abstract, axes = trainer_lib.abstract_model(cfg)
  count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  backbone, head = count(abstract["backbone"]), count(abstract["head"])
  assert backbone == 14_770_033_664  # embed + 48 layers + norm + untied lm_head (about 14.8B)
  assert head == 157_228_096  # the base head of SPEC §4
  projectors = count({k: v for k, v in abstract.items() if k.startswith("image_")})
  assert projectors == 64 * 5120 + 5120 + 5120 * 5120 + 5120
  # Every parameter carries logical axes of its rank.
  jax.tree.map(lambda a, x: None if len(a) == x.ndim else pytest.fail(f"axes {a} vs {x.shape}"), axes, abstract,
               is_leaf=lambda t: isinstance(t, tuple))
