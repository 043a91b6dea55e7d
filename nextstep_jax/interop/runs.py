"""A training run exported as a NextStep-1 Hugging Face directory; such a directory (ours, or the official
NextStep-1 / NextStep-1.1 release as published) imported as a run that ``sample``, ``export`` and
``checkpoint.init_from`` read; a Qwen2.5 directory imported as a params-only checkpoint
(``python -m nextstep_jax.export`` is the command line)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from typing import Any, Callable

from absl import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from nextstep_jax import config as config_lib
from nextstep_jax import parallel
from nextstep_jax import run as run_lib
from nextstep_jax.config import UserError
from nextstep_jax.data import tokenizer as tok_lib
from nextstep_jax.interop import hf, safetensors_io, streamed
from nextstep_jax.interop import stored as stored_lib
from nextstep_jax.interop import vae as vae_interop
from nextstep_jax.models import nextstep as ns
from nextstep_jax.training import checkpoint as ckpt_lib
from nextstep_jax.training import lora as lora_lib
from nextstep_jax.training import trainer as trainer_lib


def parse_size(text: str) -> int:
  """'5GB', '500MB', '64KiB', '1024' -> bytes (decimal units for KB/MB/GB, binary for KiB/MiB/GiB)."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
  if not m:
    raise UserError(f"cannot read size {text!r}; use e.g. 5GB, 500MB or a byte count")
  unit = (m.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
  return int(float(m.group(1)) * scale)


IMPORT_FILE = "hf_import.json"  # in an imported run: the source config.json and the tensors it carried


def imported_meta(workdir: str, meta: hf.ImageMeta, *, ids_from_source: bool = False) -> hf.ImageMeta:
  """`meta` completed with what an imported run recorded of its source directory (``hf_import.json``:
  the config.json fields export writes back, the gen_pos_embed grid, and with `ids_from_source` the special
  token ids, for a run imported without a tokenizer); unchanged for a trained run."""
  path = os.path.join(workdir, IMPORT_FILE)
  if not os.path.isfile(path):
    return meta
  rec = safetensors_io._read_json(path)  # pylint: disable=protected-access
  if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
    raise UserError(f"{path}: not a record written by the import (no 'config' object)")
  src = rec["config"]
  meta = dataclasses.replace(meta, source=src, gen_pos_grid=rec.get("gen_pos_grid"),
                             base_image_grid_size=src.get("base_image_grid_size"))
  if ids_from_source:
    ids = hf.config_from_hf(src, path)[1]
    meta = dataclasses.replace(meta, **{k: getattr(ids, k) for k in (
        "boi", "eoi", "image_placeholder_id", "image_area_id", "eos_token_id", "pad_token_id")})
  return meta


def export_workdir(workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
                   max_shard_bytes: int = safetensors_io.DEFAULT_SHARD_BYTES, tokenizer: str | None = None,
                   vae: str | None = None, use_ema: bool = True, max_cache_bytes: int | None = None) -> dict:
  """Writes the run's params (newest good checkpoint, or `step`) as a NextStep-1 directory. Returns the index.

  The params stream from the checkpoint's files: process 0 reads each tensor (one layer of a stacked leaf, a
  piece of rows of a vocabulary-sized one) as it writes it (``interop.stored``), so no process holds more than
  the tensor being written; the other processes read nothing. A LoRA run's base streams the same way, each
  adapted kernel's piece merged with its layers' adapters (held whole: they are rank-r small).

  use_ema: export the EMA weights when the run kept them (config.ema_decay > 0). A LoRA run
  (config.lora.rank > 0) is exported with its adapters merged into the frozen base. The tokenizer:
  `tokenizer`, else the config's ``tokenizer.path``, else the demo tokenizer in ``<workdir>/tokenizer``.
  A run imported from the official layout is written back in it: its config.json's other fields and its
  gen_pos_embed as they were (so official -> import -> export is bitwise with the source's dtype).
  A `workdir` URL (gs://...) is read from its local mirror (``run.local_run``). `max_cache_bytes`: the most a
  training-chunked checkpoint's chunk cache takes (``stored.StoredParams``; default half the host's available
  memory).
  """
  workdir = run_lib.local_run(workdir)
  config = run_lib.saved_config(workdir)
  cfg = ns.NextStepConfig.from_config(config)
  src = run_lib.checkpoint_dir(workdir)
  if step is not None:
    src = os.path.join(src, str(step))
  # Streamed: process 0 reads each tensor (one layer of a stacked leaf, a piece of rows of a vocabulary-sized
  # one) from the checkpoint's files as it writes it, read in the dtype written (orbax's cast, the same single
  # rounding as casting at the write). A LoRA run's base is read so, and each targeted piece merged with its
  # layers' adapters (``lora.merge_piece``, merge_lora's sum).
  _, abstract, axes = trainer_lib.abstract_model(config)
  lora = trainer_lib.lora_config(config)
  key = "base" if lora is not None else run_lib.params_key(config, use_ema)
  found, stored = stored_lib.open_params(src, abstract, key, dtype, what=f"run {workdir}",
                                         max_cache_bytes=max_cache_bytes)
  params, fetch = stored.tree, stored.fetch
  if lora is not None:
    fetch = _lora_fetch(stored, os.path.join(run_lib.checkpoint_dir(workdir), str(found)), config, lora,
                        abstract, axes, use_ema)
  imported = os.path.isfile(os.path.join(workdir, IMPORT_FILE))
  try:
    tok = run_lib.load_tokenizer(config, workdir, path=tokenizer)
  except FileNotFoundError:
    if not imported or tokenizer:
      raise
    tok = None  # imported without one: the special ids come from the source's config.json
    logging.warning("%s has no tokenizer; the export ships none", workdir)
  meta = imported_meta(workdir, hf.ImageMeta.from_config(config, tok), ids_from_source=tok is None)
  tok_dir = tokenizer or config.tokenizer.path or os.path.join(workdir, run_lib.TOKENIZER_DIR)
  shipped = tok_dir if os.path.isdir(tok_dir) else tok  # a directory ships whole (tokenizer_config.json too)
  if vae is None:
    configured = config.vae.checkpoint
    vae = configured if configured and os.path.exists(configured) else None
  if vae is not None and os.path.isdir(os.path.join(vae, run_lib.VAE_EXPORT_DIR)):
    vae = os.path.join(vae, run_lib.VAE_EXPORT_DIR)  # a train_vae work directory: ship its exported weights
  index = hf.export_nextstep(params, cfg, out, meta, dtype=dtype, max_shard_bytes=max_shard_bytes,
                             tokenizer=shipped, vae=vae, fetch=fetch)
  _barrier("nextstep_export_written")  # every process returns once the directory is whole
  return index


def _lora_fetch(stored: stored_lib.StoredParams, step_dir: str, config, lora, abstract: dict, axes: dict,
                use_ema: bool):
  """The export's `fetch` for a LoRA run: the base's pieces from the checkpoint's files (`stored`), each
  targeted kernel's piece merged with its adapters (restored whole on the host: they are rank-r small)."""
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), abstract)
  _, adapters = ckpt_lib.restore_params_step(step_dir, lora_lib.abstract_lora(target, axes, lora),
                                             key=run_lib.params_key(config, use_ema), what=f"run {step_dir}")
  adapters = jax.tree.map(np.asarray, adapters)
  dims = lora_lib.layer_dims(abstract, axes, lora)
  by_name = {"/".join(path): (path, n) for path, n in dims.items()}

  def fetch(leaf: Any, start: int | None = None, stop: int | None = None, axis: int = 0) -> np.ndarray:
    piece = stored.fetch(leaf, start, stop, axis)
    hit = by_name.get(getattr(leaf, "name", "").split(".", 1)[-1].replace(".", "/"))
    if hit is None:
      return piece
    path, n_batch = hit
    ab = adapters
    for p in path:
      ab = ab[p]
    return lora_lib.merge_piece(piece, ab[lora_lib.A_KEY], ab[lora_lib.B_KEY], leaf.shape, n_batch, lora.scale,
                                start, stop, axis)
  return fetch


# A tokenizer's files at the top of a model directory (the rest there is the model's).
TOKENIZER_FILES = (tok_lib.HF_FILE, tok_lib.HF_CONFIG_FILE, tok_lib.HF_SPECIAL_MAP_FILE, tok_lib.META_FILE,
                   tok_lib.SP_FILE, "vocab.json", "merges.txt", "added_tokens.json")


def _copy_files(src: str, dst: str, only: tuple[str, ...] | None = None) -> None:
  os.makedirs(dst, exist_ok=True)
  for name in sorted(os.listdir(src)):
    if os.path.isfile(os.path.join(src, name)) and (only is None or name in only):
      shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def _source_tokenizer(import_dir: str, meta: hf.ImageMeta):
  """(path, tokenizer) of the directory's tokenizer (``tokenizer/`` or its top level), checked against
  config.json's special ids; (None, None) with a warning when the directory has none."""
  try:
    found = tok_lib.find_tokenizer(import_dir)
  except FileNotFoundError as e:
    logging.warning("%s; the imported run has no tokenizer (put one in <out>/tokenizer to sample)", e)
    return None, None
  try:
    tok = tok_lib.load_tokenizer(found)
  except ValueError as e:
    raise UserError(f"{found}: {e}") from e
  for field, ours in (("boi", tok.boi_id), ("eoi", tok.eoi_id), ("image_placeholder_id", tok.placeholder_id)):
    want = getattr(meta, field)
    if want is not None and want != ours:
      raise UserError(f"{import_dir}: config.json {field}={want} but the tokenizer in {found} gives id {ours}")
  return found, tok


def _source_vae(import_dir: str, meta: hf.ImageMeta) -> str | None:
  """The directory's VAE directory (``vae/``, or config.json's relative ``vae_name_or_path``), or None."""
  names_ = [hf.VAE_DIR]
  named = (meta.source or {}).get("vae_name_or_path")
  if isinstance(named, str) and named and not os.path.isabs(named):
    names_.append(named)
  src = next((os.path.join(import_dir, n) for n in names_ if os.path.isdir(os.path.join(import_dir, n))), None)
  if src is None:
    logging.warning("%s has no vae/ directory; the imported run has no VAE (set vae.checkpoint to sample)",
                    import_dir)
  return src


def _vae_factor(src: str | None) -> int:
  """The VAE's down-sampling factor from its config.json (2 ** (levels - 1)); 8 (f8) without one."""
  path = None if src is None else os.path.join(src, vae_interop.CONFIG_FILE)
  if path is None or not os.path.isfile(path):
    return 8
  try:
    fields = vae_interop.config_fields_from_json(safetensors_io._read_json(path))  # pylint: disable=protected-access
  except (TypeError, ValueError) as e:
    raise UserError(f"{path}: not a valid VAE config.json ({e})") from e
  return 2 ** (len(fields.get("channel_mults", (1, 2, 4, 4))) - 1)


def _write_vae(src: str, dst: str, meta: hf.ImageMeta, token_dim: int) -> None:
  """`src` as ``dst`` in safetensors (the official ``checkpoint.pt`` converted with torch's weights-only
  reader), checked to make the model's tokens."""
  pickle = os.path.join(src, "checkpoint.pt")
  if any(os.path.isfile(os.path.join(src, n)) for n in (vae_interop.CHECKPOINT_FILE,
                                                        "diffusion_pytorch_model.safetensors")):
    _copy_files(src, dst)
  elif os.path.isfile(pickle):
    vae_interop.convert_checkpoint(pickle, dst)
  else:
    raise UserError(f"{src}: no VAE weights (checkpoint.pt, {vae_interop.CHECKPOINT_FILE} or "
                    "diffusion_pytorch_model.safetensors)")
  vae = vae_interop.load_vae_dir(dst, patch_size=meta.latent_patch_size)
  if vae.config.token_dim != token_dim:
    raise UserError(f"{src}: the VAE makes {vae.config.token_dim}-d tokens, config.json's model {token_dim}-d")


def run_config(cfg: ns.NextStepConfig, meta: hf.ImageMeta, workdir: str, *, vae_dir: str | None,
               vae_factor: int, tokenizer_kind: str = "hf"):
  """The experiment config (the schema's defaults, sized and named by a NextStep directory) of a run
  imported into `workdir`: what ``sample``, ``export`` and ``checkpoint.init_from`` read."""
  c = config_lib.base_config()
  b, h = cfg.backbone, cfg.head
  c.workdir = workdir
  c.model.update(dict(vocab_size=b.vocab_size, hidden_size=b.hidden_size, num_layers=b.num_layers,
                      num_heads=b.num_heads, num_kv_heads=b.num_kv_heads, head_dim=b.head_dim,
                      intermediate_size=b.intermediate_size, rope_theta=b.rope_theta, rms_norm_eps=b.rms_norm_eps,
                      preset="imported", free_head_dim=b.num_heads * b.head_dim != b.hidden_size))
  c.head.update(dict(dim=h.dim, num_layers=h.num_layers, batch_mul=h.batch_mul, preset="imported"))
  c.image.latent_channels = meta.latent_channels
  c.image.patch_size = meta.latent_patch_size
  c.image.vae_factor = vae_factor
  c.image.token_norm = cfg.token_norm
  c.loss.ce_weight, c.loss.fm_weight = cfg.ce_weight, cfg.fm_weight
  if meta.latent_size:
    c.data.image_size = meta.latent_size * vae_factor
  positions = (meta.source or {}).get("max_position_embeddings")
  if isinstance(positions, int) and positions > 0:
    c.data.seq_len = positions
  c.tokenizer.kind = tokenizer_kind
  c.tokenizer.vocab_size = b.vocab_size
  c.vae.checkpoint = os.path.abspath(vae_dir) if vae_dir else ""
  return c


def import_run(import_dir: str, out: str, *, mesh: Any = None, log: Callable[[str], None] | None = None) -> dict:
  """A NextStep directory (ours, or the official NextStep-1 / NextStep-1.1 release as published:
  ``config.json``, safetensors, ``tokenizer/``, ``vae/`` with ``checkpoint.pt``) imported as a run in `out`:
  ``checkpoints/0`` (params), ``checkpoints/config.json``, ``tokenizer/``, ``vae/`` (safetensors) and
  ``hf_import.json``. ``sample --workdir=out``, ``export --workdir=out`` and ``checkpoint.init_from=out``
  read it. Returns the params' abstract tree (ShapeDtypeStruct leaves with the shardings of `mesh`).

  The params stream from the safetensors files into the checkpoint a piece at a time
  (``interop.streamed``): one layer of a stacked leaf, or a band of rows of a vocabulary-sized one, read
  and written before the next, so no process holds more than a piece, whatever the model's size; several
  processes share the pieces. They are stored in the dtype the directory stores (a bf16 release stays bf16
  on disk; the readers cast to their config's dtype). Every tensor's name and shape is checked before
  anything is written; a tensor with NaN/Inf stops the import as it is read, and what the import wrote
  is removed. `mesh` (default: FSDP over every device of every process) gives the shardings recorded
  with the checkpoint. Process 0 writes the tokenizer, the VAE and the records. `log`: called on process 0
  with a line per param written (``import: k/N params written (name, seconds)``; the command line prints them to
  stderr)."""
  cfg, meta = hf.read_nextstep_config(import_dir)
  ckpt_dir = run_lib.checkpoint_dir(out)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    left = sorted(os.listdir(ckpt_dir))
    if all(ckpt_lib.ORBAX_TMP_MARK in name for name in left):  # a failed import cleans up; a killed one cannot
      raise UserError(f"--out={out} holds an unfinished import ({os.path.join(ckpt_dir, left[0])}: the import "
                      "was killed?); remove the directory and import again")
    raise UserError(f"--out={out} already holds checkpoints; import into a new directory")
  tok_src, tok = _source_tokenizer(import_dir, meta)
  vae_src = _source_vae(import_dir, meta)
  vae_dir = None if vae_src is None else os.path.join(out, hf.VAE_DIR)
  config = run_config(cfg, meta, out, vae_dir=vae_dir, vae_factor=_vae_factor(vae_src),
                      tokenizer_kind=tok.kind if tok is not None else "hf")
  config_lib.validate(config, paths=False)
  if mesh is None:
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  stored = _stored_dtype(import_dir)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, stored, sharding=s.sharding),
                        run_lib.param_target(config, mesh))
  leaves = hf.nextstep_streamed_leaves(import_dir, cfg, meta, target)  # names and shapes checked; nothing read
  existed = os.path.isdir(out)
  written: list[str] = []
  try:
    if jax.process_index() == 0:
      os.makedirs(out, exist_ok=True)
      if tok_src is not None:
        written.append(os.path.join(out, run_lib.TOKENIZER_DIR))
        _copy_files(tok_src, written[-1],
                    only=None if os.path.normpath(tok_src) != os.path.normpath(import_dir) else TOKENIZER_FILES)
      if vae_src is not None:
        written.append(vae_dir)
        _write_vae(vae_src, vae_dir, meta, cfg.token_dim)
      written.append(os.path.join(out, IMPORT_FILE))
      with open(written[-1], "w", encoding="utf-8") as f:
        json.dump({"source": os.path.abspath(import_dir), "config": meta.source, "gen_pos_grid": meta.gen_pos_grid},
                  f, indent=2)
    _barrier("nextstep_import_side_files")
    written.append(ckpt_dir)
    _save_step0(ckpt_dir, leaves, config, log=log)
  except BaseException:
    _remove(out if not existed else written)  # a failed import leaves nothing behind (never a half-written run)
    raise
  return target


def _remove(paths: str | list[str]) -> None:
  """What a failed import wrote (process 0): a directory or file, or each of a list, newest first."""
  if jax.process_index() != 0:
    return
  for path in reversed([paths] if isinstance(paths, str) else paths):
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
      os.remove(path)


def _progress_lines(log: Callable[[str], None]) -> Callable[[str, int, int], None]:
  """``streamed.StreamedLeafHandler``'s callback writing a line a param through `log`."""
  start = time.perf_counter()

  def progress(name: str, done: int, total: int) -> None:
    log(f"import: {done}/{total} params written ({name}, {time.perf_counter() - start:.0f} s)")
  return progress


def _save_step0(directory: str, params: dict, config, log: Callable[[str], None] | None = None) -> None:
  """`params` (``streamed.StreamedLeaf`` leaves) as the params-only step 0 of a checkpoint directory (with
  `config`), written a piece at a time (``interop.streamed``; `log` as ``import_run``'s). Each layer of a stacked
  leaf is saved in zarr chunks of its own, none above ``names.CHUNK_BYTES``, the vocabulary-sized leaves split
  along the vocabulary (``stored.chunked_save_args``: a piece-wise reader or writer uses a chunk alone; every
  reader reads any chunking)."""
  cfg = ns.NextStepConfig.from_config(config)
  save_args = {"params": stored_lib.chunked_save_args(params, cfg)}
  handler = streamed.save_handler(_progress_lines(log) if log is not None and jax.process_index() == 0 else None)
  ckpt = ckpt_lib.Checkpointer(directory, every=1, keep=1, async_save=False, config=config, state_handler=handler)
  try:
    ckpt.save(0, {"params": params}, force=True, save_args=save_args)
  finally:
    ckpt.close()


def _stored_dtype(import_dir: str):
  """bfloat16 when every floating tensor of the directory is bf16, else float32."""
  tensors = safetensors_io.TensorDir(import_dir)
  kinds = {tensors.dtype(n) for n in tensors.names()}
  return jnp.bfloat16 if kinds == {np.dtype(ml_dtypes.bfloat16)} else jnp.float32


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def import_to_checkpoint(import_dir: str, out: str, *, qwen2: bool = False, config: Any = None,
                         mesh: Any = None, log: Callable[[str], None] | None = None) -> dict:
  """Reads a Hugging Face directory into `out`. A NextStep directory becomes a run (``import_run``); a
  Qwen2.5 one (`qwen2`, with the experiment `config` sizing the head and projectors) a params-only
  checkpoint, step 0 in `out` (state ``{"params": ...}``, what ``checkpoint.init_from`` reads). Returns the
  params' abstract tree (ShapeDtypeStruct leaves): both stream, holding none.

  The Qwen2.5 import streams the backbone from the files a piece at a time (``hf.qwen2_streamed_leaves``),
  stored in float32; the FM head and the projectors are the config's initialisation (``config.seed``),
  computed without the backbone's. `mesh` and `log` as ``import_run``'s."""
  if not qwen2:
    return import_run(import_dir, out, mesh=mesh, log=log)
  if config is None:
    raise UserError("--qwen2 needs --config (the experiment config sizing the head and projectors)")
  ckpt = ckpt_lib.absolute(out)
  if ckpt.is_dir() and any(ckpt.iterdir()):
    raise UserError(f"--out={out} is not empty; import into a new directory")
  if mesh is None:
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=s.sharding),
                        run_lib.param_target(config, mesh))
  params = {"backbone": hf.qwen2_streamed_leaves(import_dir, config, target["backbone"])}  # checked; nothing read
  params.update(_initial_params_but_backbone(config, target))
  existed = os.path.isdir(out)
  try:
    _save_step0(out, params, config, log=log)
  except BaseException:  # nothing left behind (a directory given empty is left empty)
    _remove([os.path.join(out, n) for n in os.listdir(out)] if existed else out)
    raise
  return target


def _initial_params_but_backbone(config, target: dict) -> dict:
  """Every params entry but the backbone (FM head, projectors, ...) as the model initialises them from
  ``config.seed``, in float32, as ``streamed.StreamedLeaf`` leaves over host copies. One compiled
  program computes them replicated (XLA drops the backbone's initialisation, whose results are unused), so each
  process holds them whole: they are small next to the backbone (0.18B parameters of the 14B model)."""
  cfg = ns.NextStepConfig.from_config(config)
  mesh = jax.tree.leaves(target)[0].sharding.mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def init():
    model = ns.NextStep(cfg, rngs=nnx.Rngs(params=int(config.seed)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params.pop("backbone")
    return jax.tree.map(lambda x: x.astype(jnp.float32), params)

  readers = {}
  for path, value in list(hf.flatten_paths(jax.jit(init, out_shardings=replicated)())):
    host = np.array(value.addressable_data(0))  # one device-to-host copy a leaf, the device's freed at once
    value.delete()
    readers[path] = lambda index, h=host: h[index]
  return hf.streamed_tree("the model's initialisation", {k: v for k, v in target.items() if k != "backbone"},
                          readers)
