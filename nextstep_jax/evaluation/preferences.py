"""Digit preference pairs for DPO on the embedded data: chosen a real digit of the prompted class (or an
SFT sample the judge reads as that class), rejected an SFT sample the judge reads as another class (or a
real digit of another class). Written in the format of ``data/preferences.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from nextstep_jax import run as run_lib
from nextstep_jax.data import digits as digits_lib
from nextstep_jax.data.preferences import write_preferences
from nextstep_jax.evaluation import classifier as clf_lib
from nextstep_jax.evaluation.digits import CLASSIFIER_DIR, sample_texts


@dataclasses.dataclass
class DigitPairPlan:
  """The prompts of a digit preference set: digit and caption template of each pair."""
  digits: np.ndarray     # int (N,)
  templates: np.ndarray  # int (N,)

  @property
  def prompts(self) -> list[str]:
    return [digits_lib.caption(int(t), int(d)) for d, t in zip(self.digits, self.templates)]


def plan_digit_pairs(num_pairs: int, templates: str | Sequence[int] = "all", seed: int = 0) -> DigitPairPlan:
  """Balanced prompts: digit i % 10 for pair i, caption templates cycled ("all"), only the evaluation
  template ("eval": "a handwritten digit {d}") or the given indices; the order is shuffled."""
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
  run = run_lib.load_run(workdir)
  model, config, tokenizer, vae = run.model, run.config, run.tokenizer, run.vae
  judge, _ = clf_lib.load_or_train_classifier(classifier_dir or os.path.join(workdir, CLASSIFIER_DIR))

  def generator(prompts: list[str], key: jax.Array) -> np.ndarray:
    return sample_texts(model, config, tokenizer, vae, prompts, key, cfg=cfg, steps=steps,
                        batch_size=batch_size)

  def classify(images: np.ndarray) -> np.ndarray:
    return np.argmax(clf_lib.predict(judge, images), axis=-1)

  return generator, classify


# ------------------------------------------------------------------------------------------------
