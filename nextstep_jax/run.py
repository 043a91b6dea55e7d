"""A finished work directory, read: its saved config, tokenizer, VAE, parameters and newest good step.

Every reader of a run goes through here: ``sample``, ``export``, ``evaluate``, ``latents``, DPO's
reference and policy, and training's ``checkpoint.init_from``. Layout of a training work directory::

  <workdir>/checkpoints/<step>/     orbax steps, each with its integrity manifest
  <workdir>/checkpoints/config.json the experiment config the run trained with
  <workdir>/tokenizer/              the demo tokenizer (when config.tokenizer.path is empty)

and of a VAE work directory (``python -m nextstep_jax.train_vae``)::

  <vae>/vae_config.json  <vae>/checkpoints/<step>/  <vae>/export/ (FLUX-named safetensors)

A step is read only after its integrity check; when the newest step of a directory is corrupt or
unreadable, the next older one is read and a warning names the step skipped and why (as training's
resume does, except that readers never move anything: a run is never changed by reading it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nextstep_jax import config as config_lib
from nextstep_jax import parallel
from nextstep_jax import storage
from nextstep_jax import vae_tokens
from nextstep_jax.data import tokenizer as tok_lib
from nextstep_jax.interop.vae import load_vae_dir
from nextstep_jax.models import nextstep as ns
from nextstep_jax.models import vae as vae_lib
from nextstep_jax.models.vae import AutoencoderKL, VAEConfig
from nextstep_jax.training import checkpoint as ckpt_lib
from nextstep_jax.training import lora as lora_lib
from nextstep_jax.training.trainer import abstract_model, lora_config

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
VAE_CONFIG_FILE = "vae_config.json"
VAE_EXPORT_DIR = "export"
# The files a tokenizer file's loader reads beside it (a gs:// tokenizer.json is staged with them).
TOKENIZER_SIDECARS = (tok_lib.META_FILE, tok_lib.HF_CONFIG_FILE, tok_lib.HF_SPECIAL_MAP_FILE)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS)


def local_run(workdir: str) -> str:
  """A finished run's work directory as a local path the readers take: `workdir` itself when it is local;
  for a URL (gs://, s3://, ...), its local mirror (``storage.RemoteWorkdir``, the one training keeps) with
  the run's files and its newest complete checkpoint step pulled from the bucket."""
  if not storage.is_remote(workdir):
    return workdir
  mirror = storage.RemoteWorkdir(workdir, steps_dir=CHECKPOINTS)
  if not mirror.complete_steps():
    raise config_lib.UserError(f"workdir={workdir!r} holds no complete checkpoint step (a step uploaded with its "
                               f"marker {storage.UPLOAD_MARKER} by a run with this remote work directory)")
  mirror.pull()
  return mirror.local


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The experiment config the run saved beside its checkpoints (``checkpoints/config.json``), completed
  with the schema's defaults for fields it lacks."""
  path = os.path.join(checkpoint_dir(workdir), CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir} holds no trained run's config (is it a "
                            "training work directory with checkpoints?)")
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except ValueError as e:  # JSONDecodeError is a ValueError
    raise config_lib.UserError(f"{path}: not a valid config JSON ({e})") from e
  return config_lib.with_defaults(saved)  # fields a run saved by an older version lacks: their defaults


# ------------------------------------------------------------------------------------------------
# Tokenizer and VAE
# ------------------------------------------------------------------------------------------------

def load_tokenizer(config, workdir: str, *, path: str | None = None, build: bool = False):
  """The run's tokenizer: `path`, else ``tokenizer.path``, else the demo tokenizer in
  ``<workdir>/tokenizer`` (trained there when `build`, as training does; readers need it to exist).
  Checked against ``model.vocab_size``."""
  path = path or config.tokenizer.path
  if path:
    kind = None if path != config.tokenizer.path else config.tokenizer.kind
    if storage.is_remote(path):  # copied into this host's cache (a file with the files beside it it reads)
      path = storage.local_input(path, "tokenizer.path", siblings=TOKENIZER_SIDECARS)
    tok = tok_lib.load_tokenizer(path, kind)
  elif build:
    if config.tokenizer.kind != "sentencepiece":
      raise config_lib.UserError(f"config tokenizer.path is empty but tokenizer.kind is {config.tokenizer.kind!r}: "
                       "only the demo sentencepiece model is trained on the fly; set tokenizer.path")
    tok = tok_lib.build_demo_tokenizer(workdir, vocab_size=int(config.tokenizer.vocab_size))
  else:
    path = os.path.join(workdir, TOKENIZER_DIR)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path} does not exist: the demo tokenizer is saved there by training "
                              "(config tokenizer.path is empty)")
    tok = tok_lib.load_tokenizer(path, config.tokenizer.kind)
  if tok.vocab_size > int(config.model.vocab_size):
    raise config_lib.UserError(f"tokenizer {tok.source} has {tok.vocab_size} ids but model.vocab_size is "
                     f"{config.model.vocab_size}")
  return tok


def _vae_workdir_config(workdir: str) -> VAEConfig:
  cfg_path = os.path.join(workdir, VAE_CONFIG_FILE)
  try:
    with open(cfg_path, encoding="utf-8") as f:
      return VAEConfig.from_dict(json.load(f))
  except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
    raise config_lib.UserError(f"{cfg_path}: not a valid VAE config ({e})") from e


def load_vae(path: str, step: int | None = None, config=None) -> AutoencoderKL:
  """The VAE at `path`: a ``train_vae`` work directory (its newest good checkpoint, or checkpoint
  `step`, else its ``export/``), or an exported VAE directory (config.json + weights).

  With the experiment `config`, the VAE's tokens are checked against ``image.token_dim`` and
  ``image.patch_size``."""
  if not path:
    raise config_lib.UserError("vae.checkpoint is empty: set it to a train_vae work directory or an exported VAE "
                     "directory")
  if storage.is_remote(path):  # copied into this host's cache once, then read as a local directory
    path = storage.local_input(path, "vae.checkpoint")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"vae.checkpoint={path!r} is not a directory (relative paths are read from the "
                            "current directory)")
  if os.path.isfile(os.path.join(path, VAE_CONFIG_FILE)):
    cfg = _vae_workdir_config(path)
    ckpt_dir = os.path.join(path, CHECKPOINTS)
    if os.path.isdir(ckpt_dir) and any(p.isdigit() for p in os.listdir(ckpt_dir)):
      graphdef, abstract = nnx.split(vae_lib.abstract_vae(cfg), nnx.Param)
      src = ckpt_dir if step is None else os.path.join(ckpt_dir, str(step))
      _, params = ckpt_lib.restore_params_step(src, nnx.to_pure_dict(abstract), key="params",
                                               what="VAE checkpoint")
      vae = nnx.merge(graphdef, params)
    elif step is None and os.path.isdir(os.path.join(path, VAE_EXPORT_DIR)):
      vae = load_vae_dir(os.path.join(path, VAE_EXPORT_DIR))
    else:
      raise FileNotFoundError(f"{path}: no checkpoint{'' if step is None else f' for step {step}'} "
                              f"and no {VAE_EXPORT_DIR}/ directory")
  elif step is None and os.path.isfile(os.path.join(path, CONFIG_FILE)):
    vae = load_vae_dir(path)
  else:
    raise FileNotFoundError(f"{path} is not a train_vae workdir (no {VAE_CONFIG_FILE}) nor an exported VAE "
                            f"directory (no {CONFIG_FILE})")
  if config is not None:
    want = int(config.image.token_dim)
    if vae.config.token_dim != want or vae.config.patch_size != int(config.image.patch_size):
      raise config_lib.UserError(f"vae.checkpoint {path}: the VAE makes {vae.config.token_dim}-d tokens with patch "
                       f"{vae.config.patch_size}, the config expects image.token_dim={want} with patch "
                       f"{config.image.patch_size}")
  return vae


def vae_encoder(config) -> tuple[Callable, Any] | None:
  """(encode(vae_params, images) -> tokens, vae_params) of ``vae.checkpoint`` for the pixel path (the
  frozen VAE encodes inside the train step); None for precomputed latents."""
  if config.data.payload != "images":
    return None
  if not config.vae.checkpoint:
    raise config_lib.UserError("data.payload='images' needs vae.checkpoint: the workdir of a trained VAE "
                     "(python -m nextstep_jax.train_vae) to encode pixels inside the step")
  vae = load_vae(config.vae.checkpoint, config=config)
  graphdef, vae_params = nnx.split(vae)
  encode = lambda p, images: vae_tokens.encode_tokens(nnx.merge(graphdef, p), images)
  return encode, vae_params


# ------------------------------------------------------------------------------------------------
# Parameters and the whole run
# ------------------------------------------------------------------------------------------------

def params_key(config, use_ema: bool = True) -> str:
  """The state entry to read: "ema" when asked for and the run kept one (``ema_decay`` > 0)."""
  return "ema" if use_ema and float(config.ema_decay) > 0 else "params"


def load_params(path: str, config, *, use_ema: bool = True, target: Any = None,
                what: str = "checkpoint") -> tuple[int, dict]:
  """(step, the model's params) of a checkpoint directory (newest good step) or one step's directory.

  The EMA weights when `use_ema` and the run kept them; a LoRA run's adapters merged into its frozen
  base. `target`: abstract params with shardings (default: the first local device)."""
  lora = lora_config(config)
  key = params_key(config, use_ema)
  _, abstract, axes = abstract_model(config)
  if target is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
  if lora is None:
    return ckpt_lib.restore_params_step(path, target, key=key, what=what)
  step, base = ckpt_lib.restore_params_step(path, target, key="base", what=what)
  if not _is_step_dir(path):  # the adapters of the same step as the base
    path = os.path.join(str(path), str(step))
  # The adapters in fp32 whatever the target's dtype: merged in fp32 and rounded once, to the base's dtype.
  f32 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=s.sharding), target)
  _, adapters = ckpt_lib.restore_params_step(path, lora_lib.abstract_lora(f32, axes, lora), key=key, what=what)
  return step, lora_lib.merge_lora(base, adapters, lora)


def _is_step_dir(path: str) -> bool:
  return os.path.basename(os.path.normpath(str(path))).isdigit()


@dataclasses.dataclass
class Run:
  """A trained run, loaded: the model (its params on the first device), the config it trained with,
  its tokenizer and VAE, and the step read."""
  model: ns.NextStep
  config: ml_collections.ConfigDict
  tokenizer: Any
  vae: AutoencoderKL | None
  step: int
  workdir: str


def param_target(config, mesh) -> Any:
  """The model's abstract params with the shardings the logical rules (``config.mesh.rules``) give them
  on `mesh`: what a sharded restore reads into (each device gets its shard; no host holds the whole)."""
  _, abstract, axes = abstract_model(config)
  shardings = parallel.shardings_for(abstract, mesh, config.mesh.rules, axes=axes)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)


def load_run(workdir: str, config=None, step: int | None = None, use_ema: bool = True, *,
             tokenizer: Any = None, need_vae: bool = True, mesh=None) -> Run:
  """The run in `workdir`: checkpoint `step` (default: the newest good one), the EMA weights when the
  run kept them (`use_ema`), the saved config unless `config` is given, the tokenizer (`tokenizer`: a path
  or a tokenizer already loaded; else ``tokenizer.path`` or ``<workdir>/tokenizer``) and the VAE
  (``vae.checkpoint``; None when not `need_vae` and none is configured). A `workdir` URL is read from its
  local mirror (``local_run``). With `mesh`, the params are restored straight into their shardings
  on it (``param_target``), as training places them."""
  workdir = local_run(workdir)  # a URL: its local mirror, the newest complete step pulled
  config = config if config is not None else saved_config(workdir)
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} does not exist: no trained transformer in {workdir}")
  src = directory if step is None else os.path.join(directory, str(int(step)))
  if step is not None and not os.path.isdir(src):
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory}")
  graphdef = abstract_model(config)[0]
  target = None if mesh is None else param_target(config, mesh)
  step, params = load_params(src, config, use_ema=use_ema, target=target, what=f"run {workdir}")
  model = nnx.merge(graphdef, params)
  vae = None
  if need_vae or config.vae.checkpoint:
    vae = load_vae(config.vae.checkpoint, config=config)
  if not isinstance(tokenizer, (str, type(None))):  # already loaded by the caller
    return Run(model, config, tokenizer, vae, int(step), workdir)
  return Run(model, config, load_tokenizer(config, workdir, path=tokenizer), vae, int(step), workdir)
