"""VAE weights across the border: FLUX / NextStep state dicts, diffusers AutoencoderKL, and back.

Formats read:
  * FLUX / LDM / NextStep names (NextStep's ``checkpoint.pt``, FLUX's ``ae.safetensors``):
    ``encoder.down.{i}.block.{j}.conv1.weight``, ``encoder.mid.attn_1.q.weight`` (a 1x1 conv),
    ``decoder.up.{i}.upsample.conv.weight`` (``up.{i}`` is resolution level i, as in FLUX).
    A leading ``first_stage_model.``, ``vae.`` or ``ae.`` is stripped (documented conversion).
  * diffusers ``AutoencoderKL`` (``encoder.down_blocks.{i}.resnets.{j}``, ``mid_block.attentions.0.to_q``
    as a Linear, ``decoder.up_blocks.{k}`` deepest first). Only the FLUX layout: no quant convs.
Files: ``.safetensors`` (preferred) or a PyTorch pickle (``.pt``/``.pth``/``.bin``/``.ckpt``) read
with ``torch.load(weights_only=True)``, which refuses to run code; without torch such files are
refused. Nothing else is unpickled.

Written: ``export_vae(vae, out_dir)`` -> ``checkpoint.safetensors`` (FLUX names, PyTorch layouts,
float32) + ``config.json`` (NextStep's fields ``psz``, ``encoder_norm``, ``scaling_factor``,
``shift_factor``, ``deterministic`` plus the FLUX architecture fields ``ch``, ``ch_mult``,
``num_res_blocks``, ``z_channels``, ``in_channels``, ``out_ch`` and ours ``norm_groups``,
``mid_attention``, ``norm_eps``, ``latent_patch_size``). ``convert_checkpoint(src, out_dir)`` turns
the release's ``checkpoint.pt`` into ``checkpoint.safetensors`` once, so later loads need no torch.

``psz`` and the token patch: in NextStep's VAE config ``psz`` is only the region of the encoder
norm (the mean is patchified by ``psz`` before the layer norm; ``null``: no patching, each latent
pixel normalised over its channels). The 2x2 patch that makes a 64-d token is the NextStep model
config's ``latent_patch_size``. So ``psz`` maps to ``VAEConfig.norm_patch_size`` (null -> 1) and
``patch_size`` comes from a ``latent_patch_size`` in the VAE config.json when present (our export
writes it), else from the caller (``load_vae_dir(d, patch_size=2)``), else the default 2. An older
export of this project (it carries ``norm_groups``, which the release's config lacks, but no
``latent_patch_size``) used ``psz`` for both and is read that way.

Layouts: conv weight [out, in, kh, kw] <-> our kernel [kh, kw, in, out]; attention q/k/v/proj_out
are 1x1 convs in FLUX ([C, C, 1, 1]) and Linears in diffusers ([C, C]); GroupNorm weight <-> scale.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nextstep_jax.interop.safetensors_io import CheckpointError, check_finite, save_safetensors
from nextstep_jax.models import vae as vae_lib
from nextstep_jax.models.vae import AutoencoderKL, VAEConfig

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
TORCH_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
STRIP_PREFIXES = ("first_stage_model.", "vae.", "ae.")
CHECKPOINT_FILE = "checkpoint.safetensors"
CONFIG_FILE = "config.json"
# The token patch when a VAE config.json does not name one (the release's does not): VAEConfig's.
_DEFAULT_PATCH = next(fl.default for fl in dataclasses.fields(VAEConfig) if fl.name == "patch_size")


class StateDictError(ValueError):
  """A state dict that does not fit the VAE (missing, unexpected or misshapen keys)."""


# ----------------------------------------------------------------------------------------------
# Reading files.


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into {name: float32 numpy array} without running any pickled code.
  Each tensor is checked for NaN/Inf as it is read (CheckpointError naming the file and the tensor)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"VAE checkpoint {path} does not exist")
  if path.endswith(".safetensors"):
    from safetensors import safe_open
    out = {}
    try:
      with safe_open(path, framework="numpy") as f:
        for k in f.keys():
          out[k] = check_finite(path, k, np.asarray(f.get_tensor(k)))
    except CheckpointError:
      raise
    except TypeError:  # bfloat16 has no numpy dtype: read through torch when it is there
      out = _load_safetensors_via_torch(path)
    except Exception as e:  # safetensors' own error type: a header or data that does not parse
      raise ValueError(f"{path}: not a valid safetensors file ({e})") from e
    return _to_float32(out, path)
  if path.endswith(PICKLE_SUFFIXES):
    return _to_float32({k: v.detach().float().cpu().numpy() for k, v in _torch_tensors(path).items()},
                       path)
  raise ValueError(f"{path}: unsupported checkpoint type; use .safetensors "
                   f"(or a PyTorch state dict {PICKLE_SUFFIXES}, read with weights_only=True)")


def _torch_tensors(path: str) -> dict[str, Any]:
  """{name: torch tensor} of a PyTorch state-dict pickle, read only by
  ``torch.load(path, map_location="cpu", weights_only=True)`` (which refuses to build arbitrary
  objects); one ``state_dict`` / ``model`` / ``module`` wrapper is unwrapped. Every floating tensor
  is checked for NaN/Inf (CheckpointError naming the file and the tensor). Without torch:
  CheckpointError saying what to install; nothing is unpickled any other way."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(f"{path} is a PyTorch pickle; reading it safely needs torch "
                          f"(torch.load(weights_only=True)), which is not installed: run "
                          f"`{TORCH_INSTALL}` (nothing is unpickled without it), or convert the "
                          f"file to safetensors on a machine with torch (interop.vae."
                          f"convert_checkpoint)") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # weights_only refuses arbitrary objects
    raise ValueError(f"{path}: refused by torch.load(weights_only=True) (it holds more than "
                     f"tensors, or is corrupt): {e}") from e
  if isinstance(obj, Mapping) and len(obj) == 1:
    (key, inner), = obj.items()
    if key in ("state_dict", "model", "module") and isinstance(inner, Mapping):
      obj = inner  # a trainer's wrapper around the state dict
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    if v.is_floating_point():
      check_finite(path, str(k), v.detach().float().cpu().numpy())
    out[str(k)] = v
  return out


def _load_safetensors_via_torch(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.torch import load_file
  except ImportError as e:
    raise ValueError(f"{path} holds bfloat16 tensors; reading them needs torch") from e
  return {k: check_finite(path, k, v.float().numpy()) for k, v in load_file(path).items()}


def _to_float32(sd: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
  out = {}
  for k, v in sd.items():
    if not jnp.issubdtype(v.dtype, jnp.floating):  # numpy floats and ml_dtypes' bfloat16
      raise ValueError(f"{path}: tensor {k!r} has dtype {v.dtype}, expected floating point")
    out[k] = v.astype(np.float32)
  return out


# ----------------------------------------------------------------------------------------------
# Name conventions.


def strip_prefixes(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes one leading ``first_stage_model.`` / ``vae.`` / ``ae.`` when every key has it."""
  for prefix in STRIP_PREFIXES:
    if sd and all(k.startswith(prefix) for k in sd):
      return {k[len(prefix):]: v for k, v in sd.items()}
  return dict(sd)


def is_diffusers(sd: Mapping[str, Any]) -> bool:
  return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd)


_DIFF_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
              "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def diffusers_to_flux(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a diffusers AutoencoderKL state dict (FLUX layout) to FLUX names and layouts."""
  quant = sorted(k for k in sd if k.startswith(("quant_conv.", "post_quant_conv.")))
  if quant:
    raise StateDictError(f"state dict has quant convs {quant}: the FLUX/NextStep layout has none "
                         f"(use_quant_conv=False, use_post_quant_conv=False)")
  up_ids = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
  n_up = max(up_ids) + 1 if up_ids else 0
  out = {}
  for k, v in sd.items():
    name = k
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k)
    if m:
      part = _DIFF_ATTN.get(m.group(2))
      if part is None:
        raise StateDictError(f"unknown diffusers attention parameter {k!r}")
      name = f"{m.group(1)}.mid.attn_1.{part}.{m.group(3)}"
      if m.group(3) == "weight" and part != "norm" and v.ndim == 2:
        v = v[:, :, None, None]  # Linear -> 1x1 conv
      out[name] = v
      continue
    name = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1.", name)
    name = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2.", name)
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", name)
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.",
                  name)
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(.*)$", name)
    if m:
      level = n_up - 1 - int(m.group(1))
      rest = re.sub(r"^resnets\.(\d+)\.", r"block.\1.", m.group(2))
      rest = re.sub(r"^upsamplers\.0\.", "upsample.", rest)
      name = f"decoder.up.{level}.{rest}"
    name = name.replace(".conv_shortcut.", ".nin_shortcut.")
    name = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", name)
    out[name] = v
  return out


def to_flux_names(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Any supported naming (FLUX/LDM/NextStep, diffusers, prefixed) -> FLUX names."""
  sd = strip_prefixes(sd)
  return diffusers_to_flux(sd) if is_diffusers(sd) else dict(sd)


# ----------------------------------------------------------------------------------------------
# Our parameter tree <-> FLUX names.


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _flux_name(path: tuple) -> str:
  leaf = path[-1]
  return ".".join(str(p) for p in path[:-1]) + "." + ("bias" if leaf == "bias" else "weight")


def _to_torch_layout(path: tuple, x: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return np.transpose(x, (3, 2, 0, 1))  # HWIO -> OIHW
  return x


def _from_torch_layout(path: tuple, x: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return np.transpose(x, (2, 3, 1, 0))  # OIHW -> HWIO
  return x


def vae_to_flux_state_dict(vae: AutoencoderKL) -> dict[str, np.ndarray]:
  """FLUX-named float32 numpy state dict of a model (PyTorch layouts)."""
  pure = nnx.to_pure_dict(nnx.state(vae, nnx.Param))
  return {_flux_name(p): np.ascontiguousarray(_to_torch_layout(p, np.asarray(v, np.float32)))
          for p, v in _flatten(pure).items()}


def load_flux_state_dict(vae: AutoencoderKL, sd: Mapping[str, np.ndarray],
                         source: str = "state dict") -> AutoencoderKL:
  """Copies a FLUX-named state dict into ``vae`` in place (and returns it).

  Raises StateDictError listing every missing, unexpected and misshapen key.
  """
  state = nnx.state(vae, nnx.Param)
  pure = nnx.to_pure_dict(state)
  flat = _flatten(pure)
  by_name = {_flux_name(p): p for p in flat}
  missing = sorted(set(by_name) - set(sd))
  unexpected = sorted(set(sd) - set(by_name))
  misshapen = []
  new_flat = {}
  for name, path in by_name.items():
    if name not in sd:
      continue
    want = tuple(np.shape(flat[path]))
    got = _from_torch_layout(path, np.asarray(sd[name], np.float32))
    if tuple(got.shape) != want:
      misshapen.append(f"{name}: expected {tuple(_to_torch_layout(path, np.zeros(want)).shape)}, "
                       f"got {tuple(np.shape(sd[name]))}")
    new_flat[path] = got
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}"
                    f"{' ...' if len(unexpected) > 10 else ''}")
  if misshapen:
    problems.append(f"misshapen keys ({len(misshapen)}): {misshapen[:10]}"
                    f"{' ...' if len(misshapen) > 10 else ''}")
  if problems:
    raise StateDictError(f"{source} does not fit the VAE config "
                         f"{vae.config.to_dict()}: " + "; ".join(problems))
  new_pure: dict = {}
  for path, v in new_flat.items():
    node = new_pure
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  nnx.replace_by_pure_dict(state, new_pure)
  nnx.update(vae, state)
  return vae


# ----------------------------------------------------------------------------------------------
# Configs.


def config_from_state_dict(sd: Mapping[str, np.ndarray], **fields) -> VAEConfig:
  """Reads the architecture from FLUX-named weight shapes; ``fields`` set what weights cannot
  tell (norm_groups, patch_size, token_norm, scaling/shift factors, ...)."""
  def need(name):
    if name not in sd:
      raise StateDictError(f"state dict is missing {name!r}, needed to infer the VAE architecture")
    return sd[name].shape
  base, in_ch = need("encoder.conv_in.weight")[:2]
  levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
  if not levels or levels != list(range(len(levels))):
    raise StateDictError(f"encoder.down.* levels are {levels}, expected 0..N-1")
  mults = []
  for i in levels:
    out_ch = need(f"encoder.down.{i}.block.0.conv2.weight")[0]
    if out_ch % base:
      raise StateDictError(f"encoder.down.{i} has {out_ch} channels, not a multiple of {base}")
    mults.append(out_ch // base)
  n_blocks = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
  dec_blocks = len({int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.0\.block\.(\d+)\.", k))})
  if dec_blocks != n_blocks + 1:
    raise StateDictError(f"decoder has {dec_blocks} ResNet blocks per level, encoder {n_blocks}: "
                         f"the FLUX layout has one more in the decoder")
  latent = need("decoder.conv_in.weight")[1]
  if need("encoder.conv_out.weight")[0] != 2 * latent:
    raise StateDictError(f"encoder.conv_out has {need('encoder.conv_out.weight')[0]} outputs, "
                         f"expected 2 x {latent} latent channels (mean, logvar)")
  arch = dict(in_channels=int(in_ch), out_channels=int(need("decoder.conv_out.weight")[0]),
              base_channels=int(base), channel_mults=tuple(mults), num_res_blocks=n_blocks,
              latent_channels=int(latent), mid_attention="encoder.mid.attn_1.q.weight" in sd)
  arch.update(fields)
  return VAEConfig(**arch)


def config_fields_from_json(d: Mapping[str, Any]) -> dict[str, Any]:
  """VAEConfig fields from a NextStep/FLUX ``config.json`` or a diffusers one (known keys only).

  ``psz`` is the encoder norm's patch (``norm_patch_size``; null -> 1, per latent pixel);
  ``patch_size`` (the token patch) is ``latent_patch_size`` when the file has it, ``psz`` for an
  older export of this project (``norm_groups`` but no ``latent_patch_size``), else the default
  (2): the release's VAE config does not know the token patch (see the module docstring)."""
  if not isinstance(d, Mapping):
    raise ValueError(f"expected a JSON object, got {type(d).__name__}")
  f: dict[str, Any] = {}
  if "block_out_channels" in d:  # diffusers
    boc = list(d["block_out_channels"])
    f["base_channels"] = boc[0]
    if any(c % boc[0] for c in boc):
      raise ValueError(f"block_out_channels {boc} are not multiples of the first")
    f["channel_mults"] = tuple(c // boc[0] for c in boc)
    if "layers_per_block" in d:
      f["num_res_blocks"] = d["layers_per_block"]
    if "norm_num_groups" in d:
      f["norm_groups"] = d["norm_num_groups"]
    if "mid_block_add_attention" in d:
      f["mid_attention"] = bool(d["mid_block_add_attention"])
    if d.get("use_quant_conv") or d.get("use_post_quant_conv"):
      raise ValueError("diffusers config has quant convs; the FLUX/NextStep layout has none")
    f["token_norm"] = False  # plain diffusers VAEs have no token norm
  for src, dst in (("ch", "base_channels"), ("ch_mult", "channel_mults"),
                   ("num_res_blocks", "num_res_blocks"), ("z_channels", "latent_channels"),
                   ("latent_channels", "latent_channels"), ("in_channels", "in_channels"),
                   ("out_ch", "out_channels"), ("out_channels", "out_channels"),
                   ("encoder_norm", "token_norm"),
                   ("scaling_factor", "scaling_factor"), ("shift_factor", "shift_factor"),
                   ("deterministic", "deterministic"), ("norm_groups", "norm_groups"),
                   ("norm_eps", "norm_eps"), ("mid_attention", "mid_attention")):
    if d.get(src) is not None:
      f[dst] = tuple(d[src]) if dst == "channel_mults" else d[src]
  if "psz" in d:
    psz = d["psz"]
    if psz is None:  # the release: no patching before the norm -> per-pixel norm over channels
      psz = 1
    if not isinstance(psz, int) or isinstance(psz, bool) or psz < 1:
      raise ValueError(f"psz must be null or a positive integer, got {d['psz']!r}")
    f["norm_patch_size"] = psz
  if d.get("latent_patch_size") is not None:
    lps = d["latent_patch_size"]
    if not isinstance(lps, int) or isinstance(lps, bool) or lps < 1:
      raise ValueError(f"latent_patch_size must be a positive integer, got {lps!r}")
    f["patch_size"] = lps
  elif "norm_groups" in d and isinstance(d.get("psz"), int):  # an older export of ours
    f["patch_size"] = d["psz"]
  else:
    f["patch_size"] = _DEFAULT_PATCH
  return f



def canonical_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
  """``fields`` with ``norm_patch_size`` set to 0 when it equals the token patch (``patch_size``,
  or its default): the same norm, spelled as the default so that configs compare equal."""
  out = dict(fields)
  if out.get("norm_patch_size") and out["norm_patch_size"] == out.get("patch_size", _DEFAULT_PATCH):
    out["norm_patch_size"] = 0
  return out


def config_to_json(cfg: VAEConfig) -> dict[str, Any]:
  """NextStep-style config.json for an exported VAE: ``psz`` is the encoder norm's patch (the
  release's code patchifies the mean by ``psz`` before the norm, so it computes our norm), and
  ``latent_patch_size`` the token patch (read back by ``config_fields_from_json``)."""
  return {
      "ch": cfg.base_channels, "ch_mult": list(cfg.channel_mults),
      "num_res_blocks": cfg.num_res_blocks, "z_channels": cfg.latent_channels,
      "in_channels": cfg.in_channels, "out_ch": cfg.out_channels, "psz": cfg.norm_patch,
      "latent_patch_size": cfg.patch_size, "encoder_norm": cfg.token_norm,
      "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor,
      "deterministic": cfg.deterministic,
      "norm_groups": cfg.norm_groups, "norm_eps": cfg.norm_eps, "mid_attention": cfg.mid_attention,
  }


# ----------------------------------------------------------------------------------------------
# Entry points.


def vae_from_state_dict(sd: Mapping[str, np.ndarray], cfg: VAEConfig | None = None,
                        source: str = "state dict", **fields) -> AutoencoderKL:
  """A model holding ``sd`` (any supported naming). Without ``cfg`` the architecture is read from
  the weights, with ``fields`` for what they cannot tell."""
  flux = to_flux_names(sd)
  if cfg is None:
    cfg = config_from_state_dict(flux, **fields)
  # Zero-filled (not randomly initialised) placeholders, overwritten by the state dict.
  graphdef, state = nnx.split(vae_lib.abstract_vae(cfg))
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
  return load_flux_state_dict(nnx.merge(graphdef, state), flux, source)


def load_vae_file(path: str, config_json: str | None = None, **fields) -> AutoencoderKL:
  """A model from one weights file (FLUX/NextStep or diffusers names); the architecture comes from
  the weights, the latent conventions from ``config_json`` (a NextStep/diffusers config.json) and
  ``fields``. FLUX's 32 GroupNorm groups are assumed unless a config says otherwise."""
  cfg_fields: dict[str, Any] = {}
  if config_json:
    try:
      with open(config_json, encoding="utf-8") as f:
        cfg_fields = config_fields_from_json(json.load(f))
    except (ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
      raise ValueError(f"{config_json}: not a valid VAE config.json ({e})") from e
  cfg_fields.update(fields)
  cfg_fields = canonical_fields(cfg_fields)
  sd = load_state_dict(path)
  arch_keys = ("base_channels", "channel_mults", "num_res_blocks", "latent_channels",
               "in_channels", "out_channels", "mid_attention")
  extra = {k: v for k, v in cfg_fields.items() if k not in arch_keys}
  vae = vae_from_state_dict(sd, source=path, **extra)
  for k in arch_keys:  # the config, when given, must agree with the weights
    if k in cfg_fields and getattr(vae.config, k) != cfg_fields[k]:
      raise StateDictError(f"{config_json}: {k}={cfg_fields[k]!r} but the weights in {path} have "
                           f"{getattr(vae.config, k)!r}")
  return vae


def load_vae_dir(directory: str, **fields) -> AutoencoderKL:
  """A model from a directory: ``config.json`` plus ``checkpoint.safetensors`` (our export or
  ``convert_checkpoint``'s), ``diffusion_pytorch_model.safetensors`` (diffusers) or
  ``checkpoint.pt`` (NextStep release, read with torch). ``fields`` override the config.json, e.g.
  ``patch_size=2`` for the release's VAE (its config.json does not name the token patch)."""
  config_json = os.path.join(directory, CONFIG_FILE)
  for name in (CHECKPOINT_FILE, "diffusion_pytorch_model.safetensors", "ae.safetensors",
               "checkpoint.pt"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return load_vae_file(path, config_json if os.path.isfile(config_json) else None, **fields)
  raise FileNotFoundError(f"{directory}: no VAE weights (looked for {CHECKPOINT_FILE}, "
                          f"diffusion_pytorch_model.safetensors, ae.safetensors, checkpoint.pt)")


def export_vae(vae: AutoencoderKL, out_dir: str) -> str:
  """Writes ``checkpoint.safetensors`` (FLUX names) and ``config.json`` into ``out_dir``."""
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, CHECKPOINT_FILE)
  save_file(vae_to_flux_state_dict(vae), path, metadata={"format": "pt", "names": "flux"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config_to_json(vae.config), f, indent=2)
  return path


def _torch_to_numpy(path: str, name: str, v) -> np.ndarray:
  """The bytes of a torch tensor as a numpy array of the same dtype (bfloat16 / float8 through
  ml_dtypes), bit for bit."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  v = v.detach().cpu().contiguous()
  views = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16)}
  for tname, mname in (("float8_e4m3fn", "float8_e4m3fn"), ("float8_e5m2", "float8_e5m2")):
    if hasattr(torch, tname):
      views[getattr(torch, tname)] = (torch.uint8, getattr(ml_dtypes, mname))
  if v.dtype in views:
    as_int, np_dtype = views[v.dtype]
    return v.view(as_int).numpy().view(np_dtype)
  try:
    return v.numpy()
  except TypeError as e:
    raise CheckpointError(f"{path}: tensor {name} has dtype {v.dtype}, which safetensors "
                          f"(numpy) cannot hold") from e


def convert_checkpoint(src: str, out_dir: str) -> str:
  """The release's VAE pickle (``vae/checkpoint.pt``) -> ``out_dir/checkpoint.safetensors``.

  The pickle is read only by ``torch.load(src, map_location="cpu", weights_only=True)``; without
  torch a CheckpointError says what to install, and nothing is unpickled. One ``state_dict`` /
  ``model`` / ``module`` wrapper is unwrapped (as ``load_state_dict`` does), every floating tensor
  is checked for NaN/Inf, and the tensors are written with their names, shapes and dtypes unchanged
  (bit for bit), through a temporary file renamed into place. A ``config.json`` beside ``src`` is
  copied to ``out_dir`` (checked to be JSON first). Returns the path of the safetensors file.
  ``load_vae_dir(out_dir, ...)`` then reads it without torch."""
  if not os.path.isfile(src):
    raise FileNotFoundError(f"VAE checkpoint {src} does not exist")
  if not src.endswith(PICKLE_SUFFIXES):
    raise ValueError(f"{src}: expected a PyTorch pickle ({', '.join(PICKLE_SUFFIXES)})")
  tensors = {k: _torch_to_numpy(src, k, v) for k, v in _torch_tensors(src).items()}
  config_src = os.path.join(os.path.dirname(os.path.abspath(src)), CONFIG_FILE)
  config_bytes = None
  if os.path.isfile(config_src):
    with open(config_src, "rb") as f:
      config_bytes = f.read()
    try:
      json.loads(config_bytes.decode("utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
      raise ValueError(f"{config_src}: not a valid VAE config.json ({e})") from e
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, CHECKPOINT_FILE)
  try:
    save_safetensors(path, tensors)  # writes path + ".partial", then renames
  except BaseException:
    if os.path.exists(path + ".partial"):
      os.remove(path + ".partial")
    raise
  config_dst = os.path.join(out_dir, CONFIG_FILE)
  if config_bytes is not None and os.path.abspath(config_dst) != config_src:
    tmp = config_dst + ".partial"
    with open(tmp, "wb") as f:
      f.write(config_bytes)
    os.replace(tmp, config_dst)
  return path
