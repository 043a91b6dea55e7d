"""DPO for NextStep-1 (SPEC §7's last stage): Diffusion-DPO applied per image token.

  python -m nextstep_jax.dpo --config=configs/dpo.py [--config.dpo.data=DIR --config.x.y=...]

The paper gives DPO's schedule (300 steps, constant lr 2e-6 after 200 warm-up steps) but not its
loss for a continuous-token model. This module uses the Diffusion-DPO objective on the per-token
flow-matching errors:

  loss = -log sigmoid(-beta * [(l_w - l_w^ref) - (l_l - l_l^ref)])

where l_w, l_l are the flow-matching errors of the chosen (w) and rejected (l) image under the
policy, and l^ref the same under a frozen reference model (the SFT checkpoint). Every error is
computed with the *same* noise x0 and times t for policy and reference and for the two images of a
pair (the draw of image-token slot s of pair i is the same everywhere), so at step 0 (policy =
reference) the bracket is exactly 0 and the loss is log 2, and the bracket's noise partly cancels.

Per image, l is the *mean* over its image tokens (FM-masked slots) of each token's error, itself
the mean over the d token dims and the ``head.batch_mul`` (t, x0) draws, as in the training loss
(``dpo.reduction='mean'``, the default). Why averaged: each token's error is a one-draw estimate of
that token's flow-matching ELBO term, so the sum over an image's tokens (the exact form of the
autoregressive image's log-likelihood bound) grows with the image's token count (256..1024 in the
recipe), and so does the noise of the estimate; with the mean, beta * bracket keeps one scale at
every resolution, one beta serves all buckets, and the numbers read like the FM loss (the
Diffusion-DPO reference implementation averages its MSE over latent elements the same way, with a
correspondingly large beta). ``dpo.reduction='sum'`` gives the sum; for images of one size the two
differ only by beta's scale (beta_sum = beta_mean / tokens).

Pieces:
  fm_token_errors(model, batch, image_tokens, key, row_ids) -> (err (B, M), weight (B, M))
  image_errors(err, weight, reduction) -> (B,)
  dpo_loss(err_policy (P, 2), err_reference (P, 2), beta, ...) -> (loss, metrics)
  Preference data: a directory with ``train.jsonl`` (and optionally ``heldout.jsonl``), one JSON
    object per line {"prompt": str, "chosen": png path, "rejected": png path, "meta": {...}},
    image paths relative to the directory; ``write_preferences``, ``PreferenceRecords``,
    ``PreferenceIterator`` (pair batches for the step: one global stream grouped by image size,
    each process decoding its slice; exact resume), ``build_digit_preferences`` (the embedded
    digits: chosen a real digit of the prompted class, or optionally an SFT sample the classifier
    reads as that class; rejected an SFT sample the classifier reads as another class, or a real
    digit of another class).
  DPOTrainer(config, mesh, vae): train.Trainer's state, shardings, optimizer and update (non-finite
    skip, EMA) with the DPO gradients; the reference is a second params tree with the policy's
    shardings, an argument of the jitted step (not donated, no gradients). With LoRA the frozen
    base is the reference (the adapters start at zero), so no second copy is held.
  train_dpo(config, workdir) -> last metrics: the loop (resume, checkpoints, held-out DPO metrics).

A batch of P pairs holds 2P rows, interleaved: row 2i is pair i's chosen sequence, row 2i + 1 its
rejected one, each ``prompt + image block + <eos>`` (data/sequences.py, one sample per row), so the
per-process batches concatenate into a global batch with the same layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nextstep_jax import checkpoint as ckpt_lib
from nextstep_jax import config as config_lib
from nextstep_jax import mesh_hybrid
from nextstep_jax import metrics as metrics_lib
from nextstep_jax import parallel
from nextstep_jax import train as train_lib
from nextstep_jax.data.packing import Row, RowSpec, assemble_batch
from nextstep_jax.data.sequences import Image, SequenceBuilder
from nextstep_jax.models import nextstep as ns

REDUCTIONS = ("mean", "sum")
SPLITS = ("train", "heldout")
RECORD_FIELDS = ("prompt", "chosen", "rejected")
STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------

def fm_token_errors(model: ns.NextStep, batch: dict, image_tokens_bmd: jax.Array, key: jax.Array,
                    row_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per image-token flow-matching errors of one batch (the batch contract of data/batch.py).

  Returns (err (B, M), weight (B, M)), fp32: err[r, s] is the squared velocity error of buffer slot
  s of row r, averaged over the d token dims and the ``batch_mul`` (x0, t) draws; weight[r, s] is the
  slot's FM weight (fm_mask at its position; 0 for unused slots). The draws of row r come from
  ``fold_in(key, row_ids[r])`` (default r) exactly as in ``NextStep.loss``, so rows that share an id
  and a buffer size share their noise, and the weighted mean of err equals the model's FM loss.
  """
  h, img_tokens = model.hidden_states(batch, image_tokens_bmd)
  err, weight = model.fm_errors(h, img_tokens, batch, key, row_ids)
  return err.mean(axis=-1), weight


def image_errors(err_bm: jax.Array, weight_bm: jax.Array, reduction: str = "mean") -> jax.Array:
  """One flow-matching error per row (B,): the FM-weighted mean (or sum) over its image tokens."""
  total = jnp.sum(err_bm * weight_bm, axis=1)
  if reduction == "sum":
    return total
  if reduction != "mean":
    raise ValueError(f"dpo.reduction={reduction!r} is not one of {list(REDUCTIONS)}")
  return total / jnp.maximum(jnp.sum(weight_bm, axis=1), 1.0)


def dpo_loss(err_policy_p2: jax.Array, err_ref_p2: jax.Array, beta: float,
             valid_p: jax.Array | None = None, sft_weight: float = 0.0) -> tuple[jax.Array, dict]:
  """Diffusion-DPO on image flow-matching errors (P, 2) (column 0 chosen, 1 rejected).

  loss = mean_p -log sigmoid(-beta * [(l_w - l_w^ref) - (l_l - l_l^ref)]) (+ sft_weight * mean l_w,
  an optional pull towards the chosen images; 0 by default). The reference errors get no gradient.
  valid_p (P,) masks pairs out of the mean (e.g. padding). Metrics: reward_accuracy (pairs whose
  implicit reward -beta (l - l^ref) ranks the chosen image first), margin, the rewards and errors.
  """
  err_ref_p2 = jax.lax.stop_gradient(err_ref_p2)
  delta_p2 = err_policy_p2 - err_ref_p2
  bracket = delta_p2[:, 0] - delta_p2[:, 1]  # (P,)
  losses = -jax.nn.log_sigmoid(-beta * bracket)
  if valid_p is None:
    valid_p = jnp.ones_like(bracket)
  valid_p = valid_p.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(valid_p), 1.0)
  mean = lambda x: jnp.sum(x * valid_p) / n  # noqa: E731
  dpo = mean(losses)
  loss = dpo + sft_weight * mean(err_policy_p2[:, 0]) if sft_weight else dpo
  rewards = -beta * delta_p2
  metrics = {
      "loss": loss, "dpo_loss": dpo, "reward_accuracy": mean((bracket < 0).astype(jnp.float32)),
      "margin": mean(rewards[:, 0] - rewards[:, 1]),
      "reward_chosen": mean(rewards[:, 0]), "reward_rejected": mean(rewards[:, 1]),
      "fm_chosen": mean(err_policy_p2[:, 0]), "fm_rejected": mean(err_policy_p2[:, 1]),
      "ref_fm_chosen": mean(err_ref_p2[:, 0]), "ref_fm_rejected": mean(err_ref_p2[:, 1]),
      "pairs": jnp.sum(valid_p),
  }
  return loss, metrics


def pair_loss(policy: ns.NextStep, reference: ns.NextStep, batch: dict, image_tokens_bmd: jax.Array,
              key: jax.Array, beta: float, reduction: str = "mean", sft_weight: float = 0.0
              ) -> tuple[jax.Array, dict]:
  """DPO loss of an interleaved pair batch (rows 2i chosen, 2i + 1 rejected of pair i): policy and
  reference see the same noise, and so do the two images of a pair (row id = pair index)."""
  b = batch["tokens"].shape[0]
  if b % 2:
    raise ValueError(f"a DPO batch holds pairs of rows, got {b} rows")
  pair_ids = jnp.arange(b) // 2
  err_p, weight = fm_token_errors(policy, batch, image_tokens_bmd, key, pair_ids)
  err_r, _ = fm_token_errors(reference, batch, image_tokens_bmd, key, pair_ids)
  ell_p = image_errors(err_p, weight, reduction).reshape(b // 2, 2)
  ell_r = image_errors(err_r, weight, reduction).reshape(b // 2, 2)
  valid = jnp.all(jnp.sum(weight, axis=1).reshape(b // 2, 2) > 0, axis=1)
  return dpo_loss(ell_p, ell_r, beta, valid, sft_weight)


# ------------------------------------------------------------------------------------------------
# Preference records
# ------------------------------------------------------------------------------------------------

def _split_file(directory: str, split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"preference split must be one of {SPLITS}, got {split!r}")
  return os.path.join(directory, f"{split}.jsonl")


def _to_rgb_u8(image: np.ndarray, what: str) -> np.ndarray:
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise ValueError(f"{what}: images must be uint8, got {a.dtype}")
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=-1)
  if a.ndim != 3 or a.shape[-1] not in (1, 3):
    raise ValueError(f"{what}: images must be (H, W), (H, W, 1) or (H, W, 3), got {a.shape}")
  return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def write_preferences(directory: str, split: str, prompts: Sequence[str], chosen: Sequence[np.ndarray],
                      rejected: Sequence[np.ndarray], meta: Sequence[dict] | None = None) -> str:
  """Writes one split of a preference set: PNGs under ``images/<split>/`` and ``<split>.jsonl``.

  chosen / rejected: uint8 images (H, W[, 3]), one pair per prompt (the two of a pair of one size).
  Returns the jsonl path; the file appears atomically (written aside, then renamed)."""
  n = len(prompts)
  if len(chosen) != n or len(rejected) != n or (meta is not None and len(meta) != n):
    raise ValueError(f"{n} prompts but {len(chosen)} chosen, {len(rejected)} rejected images"
                     + ("" if meta is None else f", {len(meta)} meta entries"))
  from PIL import Image as PILImage  # pylint: disable=import-outside-toplevel
  image_dir = os.path.join(directory, "images", split)
  os.makedirs(image_dir, exist_ok=True)
  path = _split_file(directory, split)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for i in range(n):
      if not isinstance(prompts[i], str):
        raise ValueError(f"pair {i}: the prompt must be a string, got {type(prompts[i]).__name__}")
      c = _to_rgb_u8(chosen[i], f"pair {i} chosen")
      r = _to_rgb_u8(rejected[i], f"pair {i} rejected")
      if c.shape != r.shape:
        raise ValueError(f"pair {i}: chosen {c.shape} and rejected {r.shape} differ in size")
      rec = {"prompt": prompts[i], "chosen": f"images/{split}/{i:06d}_chosen.png",
             "rejected": f"images/{split}/{i:06d}_rejected.png"}
      PILImage.fromarray(c).save(os.path.join(directory, rec["chosen"]))
      PILImage.fromarray(r).save(os.path.join(directory, rec["rejected"]))
      if meta is not None:
        rec["meta"] = meta[i]
      f.write(json.dumps(rec) + "\n")
  os.replace(tmp, path)
  return path


class PreferenceRecords:
  """Random access to one split of a preference directory (format in the module docstring).

  The jsonl is read and checked when opened (every line a JSON object with string fields prompt,
  chosen, rejected; errors name file and line); images are read on access as uint8 RGB
  (H, W, 3), with errors naming the image file. ``record[i]`` -> {"prompt", "chosen", "rejected",
  "meta", "index"}."""

  def __init__(self, directory: str, split: str = "train"):
    self.directory = directory
    self.path = _split_file(directory, split)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"preference file {self.path} does not exist (dpo.data={directory!r}: a "
                              "directory with train.jsonl, see nextstep_jax/dpo.py)")
    self.entries: list[dict] = []
    self._sizes: dict[int, tuple[int, int]] = {}
    with open(self.path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{self.path}:{lineno}"
        try:
          obj = json.loads(line)
        except ValueError as e:
          raise ValueError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(obj, dict):
          raise ValueError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
        for field in RECORD_FIELDS:
          if not isinstance(obj.get(field), str) or (field != "prompt" and not obj[field]):
            kind = "a string" if field == "prompt" else "a non-empty string (an image path)"
            raise ValueError(f"{where}: field {field!r} must be {kind}, got {obj.get(field)!r}")
        self.entries.append(obj)
    if not self.entries:
      raise ValueError(f"{self.path} holds no preference pairs")

  def __len__(self) -> int:
    return len(self.entries)

  def _image(self, rel: str, where: str) -> np.ndarray:
    from PIL import Image as PILImage  # pylint: disable=import-outside-toplevel
    path = rel if os.path.isabs(rel) else os.path.join(self.directory, rel)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{where}: image file {path} does not exist")
    try:
      with PILImage.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, ValueError) as e:
      raise ValueError(f"{where}: cannot read image {path} ({e})") from e

  def image_size(self, i: int) -> tuple[int, int]:
    """(H, W) of record i's chosen image, read from the file header only (no decoding)."""
    from PIL import Image as PILImage  # pylint: disable=import-outside-toplevel
    if i not in self._sizes:
      rel = self.entries[int(i)]["chosen"]
      path = rel if os.path.isabs(rel) else os.path.join(self.directory, rel)
      where = f"{self.path} record {int(i)}"
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image file {path} does not exist")
      try:
        with PILImage.open(path) as im:
          self._sizes[i] = (int(im.size[1]), int(im.size[0]))
      except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read image {path} ({e})") from e
    return self._sizes[i]

  def __getitem__(self, i: int) -> dict:
    e = self.entries[int(i)]
    where = f"{self.path} record {int(i)}"
    chosen, rejected = self._image(e["chosen"], where), self._image(e["rejected"], where)
    if chosen.shape != rejected.shape:
      raise ValueError(f"{where}: chosen {chosen.shape} and rejected {rejected.shape} images differ in size")
    return {"prompt": e["prompt"], "chosen": chosen, "rejected": rejected, "meta": e.get("meta", {}),
            "index": int(i)}


# ------------------------------------------------------------------------------------------------
# Pair batches
# ------------------------------------------------------------------------------------------------

def pair_row_spec(config, pad_id: int) -> RowSpec:
  """One sequence per row, one image per sequence (the pixel path: images encoded in the step)."""
  d = config.data
  return RowSpec(seq_len=int(d.seq_len), payload="images", max_images=1,
                 max_image_tokens=int(d.max_image_tokens), token_dim=int(config.image.token_dim),
                 image_shape=(int(d.image_size), int(d.image_size)), pad_id=pad_id)


class PairBuilder:
  """Preference record -> (chosen Sample, rejected Sample): ``prompt + image block + <eos>`` each, CE
  only on the response (the loss ignores CE; the rows follow the batch contract)."""

  def __init__(self, tokenizer, spec: RowSpec, unit: int):
    self.seq = SequenceBuilder(tokenizer, 0.0, loss_on_prompt=False)
    self.spec, self.unit = spec, int(unit)

  def reject_reason(self, prompt: str, size: tuple[int, int]) -> str | None:
    """Why a pair of this prompt and image size (H, W) cannot be a row (None when it can)."""
    if size[0] % self.unit or size[1] % self.unit:
      return "bad_image_size"
    grid = (size[0] // self.unit, size[1] // self.unit)
    if grid[0] * grid[1] > self.spec.max_image_tokens:
      return "too_many_image_tokens"
    length = len(self.seq.tok.encode(prompt)) + len(self.seq.image_block(grid)[0]) + 1
    return "too_long" if length > self.spec.seq_len else None

  def samples(self, record: dict) -> tuple:
    """The two Samples of a (usable) record."""
    img = record["chosen"]
    reason = self.reject_reason(record["prompt"], img.shape[:2])
    if reason is not None:
      raise ValueError(f"preference record {record.get('index')} cannot be used: {reason}")
    grid = (img.shape[0] // self.unit, img.shape[1] // self.unit)
    return tuple(self.seq.text_to_image(record["prompt"], Image(record[k], grid), key=[record["index"], j])
                 for j, k in enumerate(("chosen", "rejected")))


def pair_batch(pairs: Sequence[tuple], spec: RowSpec) -> dict[str, np.ndarray]:
  """The numpy batch of `pairs` (chosen, rejected) Samples: 2P rows, row 2i chosen, 2i + 1 rejected."""
  rows = []
  for pair in pairs:
    for sample in pair:
      row = Row()
      row.add(sample)
      rows.append(row)
  return assemble_batch(rows, spec, len(rows))


class PreferenceIterator:
  """Endless batches of preference pairs, one process's share of each global batch, exactly resumable.

  Every process walks the same global stream: epoch e visits the records in a permutation seeded by
  (seed, e); records are grouped by image size (a pixel batch holds one size; sizes come from the
  file headers), and a group that reaches ``pairs`` (global) records is the next global batch.
  Process p of P decodes and returns only its slice of it (pairs / P pairs, rows interleaved as in
  the module docstring), so the processes' batches always agree in shape. A record that cannot be a
  row (too long for data.seq_len, image size not a multiple of the token size, too many tokens) is
  skipped and counted. ``get_state()`` (JSON) holds the epoch, the position and the records waiting
  in each size group."""

  def __init__(self, records: PreferenceRecords, builder: PairBuilder, pairs: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    if pairs < 1 or pairs % process_count:
      raise ValueError(f"pairs per batch ({pairs}) must be a positive multiple of the {process_count} processes")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    self.records, self.builder, self.pairs, self.seed = records, builder, int(pairs), int(seed)
    self.local = self.pairs // int(process_count)
    self.first = int(process_index) * self.local   # this process's first pair of a global batch
    self.epoch, self.pos = 0, 0
    self.pending: dict[str, list[int]] = {}   # size group -> record indices waiting for a batch
    self.counters: dict[str, int] = {}
    self._order = self._epoch_order(0)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch, 0x44504F]).permutation(len(self.records))

  def _count(self, name: str) -> None:
    self.counters[name] = self.counters.get(name, 0) + 1

  def __iter__(self) -> "PreferenceIterator":
    return self

  def next_indices(self) -> list[int]:
    """The record indices of the next global batch (advances the stream)."""
    barren = 0
    while True:
      if self.pos >= len(self._order):
        self.epoch, self.pos = self.epoch + 1, 0
        self._order = self._epoch_order(self.epoch)
      index = int(self._order[self.pos])
      self.pos += 1
      size = self.records.image_size(index)
      reason = self.builder.reject_reason(self.records.entries[index]["prompt"], size)
      if reason is not None:
        self._count(f"skipped/{reason}")
        barren += 1
        if barren > 2 * len(self.records) + 1:
          raise RuntimeError(f"no usable preference pair in {self.records.path} (skipped: {self.counters}); "
                             "check data.seq_len and the image sizes")
        continue
      barren = 0
      name = f"{size[0]}x{size[1]}"
      group = self.pending.setdefault(name, [])
      group.append(index)
      if len(group) == self.pairs:
        del self.pending[name]
        self._count("batches")
        return group

  def __next__(self) -> dict[str, np.ndarray]:
    mine = self.next_indices()[self.first:self.first + self.local]
    return pair_batch([self.builder.samples(self.records[i]) for i in mine], self.builder.spec)

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "epoch": self.epoch, "pos": self.pos,
            "pending": {k: list(v) for k, v in self.pending.items()}, "counters": dict(self.counters),
            "seed": self.seed, "records": len(self.records)}

  def set_state(self, state: dict) -> None:
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"preference iterator state has version {state.get('version')}, this code reads "
                       f"{STATE_VERSION}")
    if state.get("records") != len(self.records):
      raise ValueError(f"the checkpointed preference iterator saw {state.get('records')} records, "
                       f"{self.records.path} now holds {len(self.records)}: the data changed")
    self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
    self.pending = {k: [int(i) for i in v] for k, v in state["pending"].items()}
    self.counters = dict(state.get("counters", {}))
    self._order = self._epoch_order(self.epoch)


def heldout_batches(records: PreferenceRecords, builder: PairBuilder, pairs: int, num_batches: int,
                    process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Fixed evaluation batches (this process's share): the first `num_batches` global batches of a
  seeded order (fewer when the split holds fewer pairs)."""
  it = PreferenceIterator(records, builder, pairs, seed=12345, process_index=process_index,
                          process_count=process_count)
  return [next(it) for _ in range(min(num_batches, max(len(records) // pairs, 1)))]


# ------------------------------------------------------------------------------------------------
# Preference pairs for the embedded digits
# ------------------------------------------------------------------------------------------------

def sample_texts(model, config, tokenizer, vae, texts: Sequence[str], key: jax.Array, *, cfg: float = 3.0,
                 steps: int = 28, batch_size: int = 100) -> np.ndarray:
  """uint8 (N, S, S, 3) text-to-image samples of `texts` (S = config.data.image_size), drawn by the
  compiled sampler `batch_size` prompts at a time (batch b uses fold_in(key, b))."""
  from nextstep_jax import evaluate, latents, sampling  # pylint: disable=import-outside-toplevel
  size = int(config.data.image_size)
  h, w = latents.token_grid(vae.config, size, size)
  decode, vae_params = latents.token_decoder(vae)
  decode_fn = jax.jit(lambda p, t: decode(p, t, h, w))
  use_norm = bool(config.image.get("token_norm", True))
  bs = min(batch_size, len(texts))
  out = []
  for b, start in enumerate(range(0, len(texts), bs)):
    chunk = list(texts[start:start + bs])
    real = len(chunk)
    chunk += [chunk[-1]] * (bs - real)
    cond, neg = sampling.image_prompts(tokenizer, chunk, h, w, negative="" if cfg != 1.0 else None)
    tokens = sampling.sample_images(model, cond, neg, h, w, jax.random.fold_in(key, b), cfg=float(cfg),
                                    steps=int(steps), use_norm=use_norm, pad_id=int(tokenizer.pad_id))
    out.append(evaluate.to_uint8(decode_fn(vae_params, tokens))[:real])
  return np.concatenate(out)


@dataclasses.dataclass
class DigitPairPlan:
  """The prompts of a digit preference set: digit and caption template of each pair."""
  digits: np.ndarray     # int (N,)
  templates: np.ndarray  # int (N,)

  @property
  def prompts(self) -> list[str]:
    from nextstep_jax.data import digits as digits_lib  # pylint: disable=import-outside-toplevel
    return [digits_lib.caption(int(t), int(d)) for d, t in zip(self.digits, self.templates)]


def plan_digit_pairs(num_pairs: int, templates: str | Sequence[int] = "all", seed: int = 0) -> DigitPairPlan:
  """Balanced prompts: digit i % 10 for pair i, caption templates cycled ("all"), only the evaluation
  template ("eval": "a handwritten digit {d}") or the given indices; the order is shuffled."""
  from nextstep_jax.data import digits as digits_lib  # pylint: disable=import-outside-toplevel
  if num_pairs < 1:
    raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
  if templates == "all":
    tlist = list(range(len(digits_lib.CAPTION_TEMPLATES)))
  elif templates == "eval":
    tlist = [0]
  else:
    tlist = [int(t) for t in templates]  # type: ignore[union-attr]
    if not tlist or any(not 0 <= t < len(digits_lib.CAPTION_TEMPLATES) for t in tlist):
      raise ValueError(f"templates must be 'all', 'eval' or indices into CAPTION_TEMPLATES, got {templates}")
  i = np.arange(num_pairs)
  d = i % digits_lib.NUM_CLASSES
  t = np.asarray(tlist)[(i // digits_lib.NUM_CLASSES) % len(tlist)]
  perm = np.random.default_rng([seed, 0x706C616E]).permutation(num_pairs)
  return DigitPairPlan(d[perm], t[perm])


def build_digit_preferences(directory: str, split: str, num_pairs: int, *, seed: int = 0,
                            rejected: str = "samples", chosen: str = "real",
                            generator: Callable[[list[str], jax.Array], np.ndarray] | None = None,
                            classify: Callable[[np.ndarray], np.ndarray] | None = None,
                            rounds: int = 3, templates: str | Sequence[int] = "all",
                            image_size: int = 32) -> dict[str, Any]:
  """Writes a digit preference split (``<directory>/<split>.jsonl`` + PNGs) and returns its summary.

  Prompts: ``plan_digit_pairs``. chosen="real": a real digit of the prompted class from the split;
  chosen="samples": a generated image the classifier reads as the prompted class when one appears,
  else a real one. rejected="samples": a generated image the classifier reads as *another* class;
  pairs still without one after `rounds` rounds of sampling (each round draws one image for every
  pair still lacking one, key fold_in(key(seed), round)) get a real digit of another class;
  rejected="real": always a real digit of another class (no model needed).
  generator(prompts, key) -> uint8 (N, S, S, 3) and classify(images) -> predicted classes (N,):
  the SFT model's sampler and the judge (see ``sft_generator``); needed unless both are "real".
  Every record's meta says where each image came from (``chosen_source``, ``rejected_source``:
  "real" | "sample"), the classifier's reading of the rejected image, and the digit and template.
  """
  from nextstep_jax.data import digits as digits_lib  # pylint: disable=import-outside-toplevel
  if rejected not in ("samples", "real") or chosen not in ("samples", "real"):
    raise ValueError(f"rejected={rejected!r} and chosen={chosen!r} must each be 'samples' or 'real'")
  needs_model = rejected == "samples" or chosen == "samples"
  if needs_model and (generator is None or classify is None):
    raise ValueError("sampled chosen/rejected images need a generator and a classifier")
  images, labels = digits_lib.load_split(split)
  padded = digits_lib.pad_digits_u8(images, image_size)
  by_class = [np.flatnonzero(labels == c) for c in range(digits_lib.NUM_CLASSES)]
  plan = plan_digit_pairs(num_pairs, templates, seed)
  prompts = plan.prompts
  rng = np.random.default_rng([seed, 0x64706F])
  n = num_pairs
  chosen_img: list[np.ndarray | None] = [None] * n
  rejected_img: list[np.ndarray | None] = [None] * n
  meta = [{"digit": int(plan.digits[i]), "template": int(plan.templates[i])} for i in range(n)]
  t0 = time.perf_counter()
  sampled = 0
  if needs_model:
    key = jax.random.key(seed)
    for r in range(max(int(rounds), 0)):
      todo = [i for i in range(n) if (rejected == "samples" and rejected_img[i] is None)
              or (chosen == "samples" and chosen_img[i] is None)]
      if not todo:
        break
      gen = np.asarray(generator([prompts[i] for i in todo], jax.random.fold_in(key, r)))
      pred = np.asarray(classify(gen))
      sampled += len(todo)
      for j, i in enumerate(todo):
        want = int(plan.digits[i])
        if int(pred[j]) == want:
          if chosen == "samples" and chosen_img[i] is None:
            chosen_img[i] = gen[j]
            meta[i].update(chosen_source="sample", chosen_round=r)
        elif rejected == "samples" and rejected_img[i] is None:
          rejected_img[i] = gen[j]
          meta[i].update(rejected_source="sample", rejected_class=int(pred[j]), rejected_round=r)
  for i in range(n):
    d = int(plan.digits[i])
    if chosen_img[i] is None:
      idx = int(rng.choice(by_class[d]))
      chosen_img[i] = padded[idx]
      meta[i].update(chosen_source="real", chosen_index=idx)
    if rejected_img[i] is None:
      other = int(rng.choice([c for c in range(digits_lib.NUM_CLASSES) if c != d]))
      idx = int(rng.choice(by_class[other]))
      rejected_img[i] = padded[idx]
      meta[i].update(rejected_source="real", rejected_class=other, rejected_index=idx)
  path = write_preferences(directory, split, prompts, chosen_img, rejected_img, meta)
  summary = {
      "split": split, "pairs": n, "file": os.path.basename(path), "seed": seed, "rejected": rejected,
      "chosen": chosen, "rounds": rounds, "templates": templates if isinstance(templates, str) else list(templates),
      "generated_images": sampled, "seconds": time.perf_counter() - t0,
      "rejected_from_samples": sum(m.get("rejected_source") == "sample" for m in meta),
      "chosen_from_samples": sum(m.get("chosen_source") == "sample" for m in meta),
  }
  info_path = os.path.join(directory, "info.json")
  info = {}
  if os.path.isfile(info_path):
    with open(info_path, encoding="utf-8") as f:
      info = json.load(f)
  info[split] = summary
  with open(info_path, "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  return summary


def sft_generator(workdir: str, *, cfg: float = 3.0, steps: int = 28, classifier_dir: str | None = None,
                  batch_size: int = 100):
  """(generator, classify) for ``build_digit_preferences`` from a trained run (the SFT model of
  ``workdir``, its VAE and tokenizer) and the evaluation's digit classifier (kept in
  `classifier_dir`, default ``<workdir>/classifier``; trained there on first use)."""
  from nextstep_jax import classifier as clf_lib  # pylint: disable=import-outside-toplevel
  from nextstep_jax import evaluate  # pylint: disable=import-outside-toplevel
  model, config, tokenizer, vae = evaluate.load_trained(workdir)
  judge, _ = clf_lib.load_or_train_classifier(classifier_dir or os.path.join(workdir, evaluate.CLASSIFIER_DIR))

  def generator(prompts: list[str], key: jax.Array) -> np.ndarray:
    return sample_texts(model, config, tokenizer, vae, prompts, key, cfg=cfg, steps=steps,
                        batch_size=batch_size)

  def classify(images: np.ndarray) -> np.ndarray:
    return np.argmax(clf_lib.predict(judge, images), axis=-1)

  return generator, classify


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------

def dpo_settings(config, for_training: bool = True) -> dict[str, Any]:
  """The ``config.dpo`` section, checked (errors name the field); `for_training` adds the checks of
  the run's input (a preference directory, the pixel payload)."""
  if "dpo" not in config:
    raise config_lib.ConfigError("config has no 'dpo' section (see configs/dpo.py)")
  d = config.dpo
  errors = []
  beta = d.get("beta", None)
  if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
    errors.append(f"dpo.beta={beta!r} must be a positive number")
  if d.get("reduction", "mean") not in REDUCTIONS:
    errors.append(f"dpo.reduction={d.get('reduction')!r} is not one of {list(REDUCTIONS)}")
  sw = d.get("sft_weight", 0.0)
  if not isinstance(sw, (int, float)) or sw < 0:
    errors.append(f"dpo.sft_weight={sw!r} must be >= 0")
  if for_training and not d.get("data", ""):
    errors.append("dpo.data is empty: a preference directory with train.jsonl (see nextstep_jax/dpo.py)")
  if for_training and config.data.payload != "images":
    errors.append(f"data.payload={config.data.payload!r}: DPO reads preference images as pixels and encodes "
                  "them with the frozen VAE inside the step; set data.payload='images' and vae.checkpoint")
  if int(config.optim.get("grad_accum", 1)) != 1:
    errors.append(f"optim.grad_accum={config.optim.grad_accum}: the DPO step does not accumulate; use 1")
  if errors:
    raise config_lib.ConfigError("invalid DPO config:\n  " + "\n  ".join(errors))
  return {"beta": float(beta), "reduction": str(d.get("reduction", "mean")), "sft_weight": float(sw),
          "data": str(d.get("data", "")), "reference": str(d.get("reference", "") or ""),
          "heldout_batches": int(d.get("heldout_batches", 2))}


class DPOTrainer(train_lib.Trainer):
  """train.Trainer with DPO gradients: same state (params, optimizer, step, EMA, LoRA base), same
  shardings, same update with its non-finite skip; the jitted step takes the reference params as a
  second argument, sharded like the policy, never donated and never differentiated."""

  def __init__(self, config, mesh, vae=None):
    super().__init__(config, mesh, vae)
    self.dpo = dpo_settings(config, for_training=False)
    # With LoRA the frozen base (state["base"]) is the reference; no separate tree is passed.
    self.ref_shardings = self.param_shardings if self.lora is None else None

  def dpo_terms(self, params: dict, ref: dict | None, batch: dict, key: jax.Array,
                base: dict | None = None) -> tuple[jax.Array, dict]:
    """(loss, metrics) of a pair batch for policy `params` against the reference."""
    policy = nnx.merge(self.graphdef, self.model_params(params, base, self.compute_dtype))
    ref_params = ref if self.lora is None else base
    if ref_params is None:
      raise ValueError("DPO needs reference params (or, with LoRA, the frozen base)")
    reference = nnx.merge(self.graphdef, jax.lax.stop_gradient(ref_params))
    s = self.dpo
    return pair_loss(policy, reference, batch, self.image_tokens(batch), key, s["beta"], s["reduction"],
                     s["sft_weight"])

  def grads(self, params: dict, batch: dict, key: jax.Array, base: dict | None = None) -> tuple[dict, dict]:
    """Trainer.train_step's hook: `batch` here is {"pairs": pair batch, "ref": reference params}."""
    grad_fn = jax.value_and_grad(self.dpo_terms, has_aux=True)
    (_, metrics), grads = grad_fn(params, batch["ref"], batch["pairs"], key, base)
    return grads, metrics

  def dpo_step(self, state: dict, ref: dict | None, batch: dict) -> tuple[dict, dict]:
    """One DPO update (Trainer.train_step with the DPO gradients)."""
    return self.train_step(state, {"pairs": batch, "ref": ref})

  @functools.cached_property
  def dpo_step_fn(self) -> Callable:
    return self.jit(self.dpo_step, (self.state_shardings, self.ref_shardings, self.batch_sharding),
                    updates_state=True)

  def dpo_eval(self, params: dict, ref: dict | None, batch: dict, base: dict | None = None) -> dict:
    """DPO metrics of a held-out pair batch with a fixed noise key (comparable across steps)."""
    _, metrics = self.dpo_terms(params, ref, batch, jax.random.key(self.config.seed + 1), base)
    return metrics

  @functools.cached_property
  def dpo_eval_fn(self) -> Callable:
    base = None if self.lora is None else self.base_shardings
    return self.jit(self.dpo_eval, (self.param_shardings, self.ref_shardings, self.batch_sharding, base),
                    updates_state=False)

  def load_reference(self, path: str) -> dict | None:
    """The reference params from a checkpoint (directory or step), restored into the policy's
    shardings; None with LoRA (the base is the reference)."""
    if self.lora is not None:
      return None
    target = parallel.with_shardings(self.abstract_params, self.param_shardings)
    return ckpt_lib.restore_params_from(path, target)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def train_dpo(config, workdir: str | None = None) -> dict[str, float]:
  """Runs (or resumes) DPO to ``config.steps``. Returns the last logged metrics.

  The policy starts from ``checkpoint.init_from`` (the SFT checkpoint); the reference is
  ``dpo.reference`` (default: the same checkpoint), loaded again on resume (it is not part of the
  saved state). Checkpoints hold the Trainer's state and the preference iterator's state."""
  parallel.maybe_initialize_distributed()
  workdir = workdir or config.workdir
  config_lib.validate(config, num_devices=jax.device_count(), num_granules=mesh_hybrid.num_granules())
  settings = dpo_settings(config)
  mesh = mesh_hybrid.make_hybrid_mesh(config.mesh)
  pidx, pcount = jax.process_index(), jax.process_count()
  os.makedirs(workdir, exist_ok=True)
  if config.data.batch_size % pcount:
    raise config_lib.ConfigError(f"data.batch_size={config.data.batch_size} pairs is not divisible by the "
                                 f"{pcount} processes")
  _log(f"devices {jax.device_count()} ({jax.default_backend()}), processes {pcount}, mesh {dict(mesh.shape)}")

  tokenizer = train_lib.load_tokenizer(config, workdir)
  spec = pair_row_spec(config, tokenizer.pad_id)
  unit = int(config.image.vae_factor) * int(config.image.patch_size)
  builder = PairBuilder(tokenizer, spec, unit)
  records = PreferenceRecords(settings["data"], "train")
  data_iter = PreferenceIterator(records, builder, config.data.batch_size, seed=int(config.data.seed),
                                 process_index=pidx, process_count=pcount)
  heldout = None
  if os.path.isfile(_split_file(settings["data"], "heldout")) and settings["heldout_batches"] > 0:
    heldout = heldout_batches(PreferenceRecords(settings["data"], "heldout"), builder, config.data.batch_size,
                              settings["heldout_batches"], pidx, pcount)
  _log(f"preference pairs: {len(records)} (train), {0 if heldout is None else len(heldout)} held-out batches")

  trainer = DPOTrainer(config, mesh, vae=train_lib.load_frozen_vae(config))
  _log(f"parameters: {train_lib.count_params(trainer.abstract_params):,}, beta {settings['beta']}, "
       f"reduction {settings['reduction']}")
  ckpt = ckpt_lib.Checkpointer.from_config(config, os.path.join(workdir, "checkpoints"))
  init_from = config.checkpoint.init_from
  ref_path = settings["reference"] or init_from
  if not ref_path and trainer.lora is None:
    raise config_lib.ConfigError("DPO needs a reference: set checkpoint.init_from (the SFT checkpoint) or "
                                 "dpo.reference")
  # As in train: the newest step that passes its integrity check; bad newer steps are moved aside.
  restored = ckpt.restore_latest_good(parallel.with_shardings(trainer.abstract_state, trainer.state_shardings))
  if restored is not None:
    start, state, data_state = restored
    if data_state is not None:
      data_iter.set_state(data_state)
    _log(f"resumed from step {start}")
  elif init_from:
    if trainer.lora is None:
      target = parallel.with_shardings(trainer.abstract_params, trainer.param_shardings)
    else:  # the checkpoint's params become the frozen base; fresh adapters train
      target = parallel.with_shardings(trainer.base_abstract, trainer.base_shardings)
    state = trainer.state_from_params(ckpt.restore_params_from(init_from, target))
    _log(f"policy initialised from {init_from}")
  else:
    raise config_lib.ConfigError("DPO starts from a trained model: set checkpoint.init_from (the SFT "
                                 "checkpoint)")
  ref = trainer.load_reference(ref_path) if trainer.lora is None else None
  if ref is not None:
    _log(f"reference from {ref_path}")
  step = int(state["step"])

  writer = metrics_lib.MetricsWriter(workdir, pidx, console_every=config.log_every)
  timer = metrics_lib.StepTimer()
  control = train_lib.LoopControl(config, ckpt)
  last: dict[str, float] = {}
  try:
    while step < config.steps:
      batch = parallel.global_batch(next(data_iter), mesh)
      state, metrics = trainer.dpo_step_fn(state, ref, batch)
      step += 1
      streak = control.check_streak(step, state)
      if step % config.log_every == 0 or step == config.steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last.update(timer.lap(config.log_every, config.log_every * 2 * config.data.batch_size * config.data.seq_len))
        last["skipped_steps"] = float(state["skipped"])
        for k, v in data_iter.counters.items():
          last[f"data/{k}"] = float(v)
        writer.write_scalars(step, last)
      if heldout and config.eval_every and (step % config.eval_every == 0 or step == config.steps):
        writer.write_scalars(step, evaluate_heldout(trainer, state, ref, heldout, mesh))
      if control.save_or_stop(step, state, streak, data_iter.get_state):
        break
  finally:
    control.close()
    writer.close()
  return last


def evaluate_heldout(trainer: DPOTrainer, state: dict, ref: dict | None, batches: list[dict], mesh
                     ) -> dict[str, float]:
  """DPO metrics averaged over the fixed held-out pair batches ("eval/<metric>")."""
  sums: dict[str, float] = {}
  for b in batches:
    m = jax.device_get(trainer.dpo_eval_fn(state["params"], ref, parallel.global_batch(b, mesh),
                                           state.get("base")))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
  return {f"eval/{k}": v for k, v in sums.items()}


def main(argv) -> None:
  del argv
  from absl import flags, logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)
  train_dpo(flags.FLAGS.config, flags.FLAGS.workdir or None)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/dpo.py)", lock_config=True)
  flags.DEFINE_string("workdir", "", "output directory (default: config.workdir)")
  flags.mark_flags_as_required(["config"])
  app.run(main)
