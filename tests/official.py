"""The official NextStep-1 release's directory layouts, written from its documented fields for the tests
(tests/test_official_import.py, tests/test_official_vae_tokenizer.py): ``vae/`` (``config.json`` with the
release's ``AutoEncoderParams`` fields and ``checkpoint.pt`` written with ``torch.save``) and ``tokenizer/``
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``)."""

from __future__ import annotations

import json
import os

import numpy as np

from nextstep_jax.data import tokenizer as T
from nextstep_jax.interop import vae as interop

EOS = "<|im_end|>"  # not one of T.FALLBACK_EOS: only tokenizer_config.json can name it


def official_vae_config(cfg, psz=None, resolution: int = 256) -> dict:
  """The release's AutoEncoderParams fields for the architecture `cfg` (a VAEConfig), nothing of ours."""
  return {"resolution": resolution, "in_channels": 3, "ch": cfg.base_channels, "out_ch": 3,
          "ch_mult": list(cfg.channel_mults), "num_res_blocks": cfg.num_res_blocks,
          "z_channels": cfg.latent_channels, "scaling_factor": 1.0, "shift_factor": 0.0,
          "deterministic": True, "encoder_norm": True, "psz": psz}


def write_official_vae(directory, vae, resolution: int = 256) -> dict:
  """``directory/checkpoint.pt`` (torch.save of the FLUX-named tensors) + ``config.json`` (``"psz": null``).
  Returns the state dict (numpy)."""
  import torch  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  sd = interop.vae_to_flux_state_dict(vae)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, os.path.join(directory, "checkpoint.pt"))
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(official_vae_config(vae.config, resolution=resolution), f)
  return sd


def hf_tokenizer():
  """A tiny byte-level BPE with <|endoftext|> and <|im_end|>, then the SPEC §1 tokens added as
  special tokens at the end (as the release adds them to Qwen2.5's vocabulary)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>", EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([f"a handwritten digit {d}, then {e}*{e}" for d in range(10) for e in range(10)],
                          trainer)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in T.SPECIAL_TOKENS])
  return tok


def added(content: str, special: bool = True) -> dict:
  return {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
          "single_word": False, "special": special}


def write_release_tokenizer(model_dir, pad="[PAD]", eos=EOS) -> tuple[str, object]:
  """``model_dir/tokenizer/`` in the release's layout; returns (its path, the tokenizers.Tokenizer)."""
  tok = hf_tokenizer()
  from pathlib import Path  # pylint: disable=import-outside-toplevel
  d = Path(model_dir) / "tokenizer"
  d.mkdir(parents=True)
  tok.save(str(d / "tokenizer.json"))
  names = ["<unk>", "<|endoftext|>", EOS] + list(T.SPECIAL_TOKENS)
  (d / "tokenizer_config.json").write_text(json.dumps({
      "added_tokens_decoder": {str(tok.token_to_id(n)): added(n) for n in names},
      "bos_token": None, "eos_token": added(eos), "pad_token": added(pad),
      "model_max_length": 4096, "tokenizer_class": "Qwen2Tokenizer"}))
  (d / "special_tokens_map.json").write_text(json.dumps({
      "eos_token": added(eos), "pad_token": added(pad),
      "additional_special_tokens": list(T.SPECIAL_TOKENS)}))
  return str(d), tok
