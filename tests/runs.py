"""Stand-ins for finished runs, shared by the end-to-end tests (SFT, DPO, evaluation)."""

import os

import jax
import jax.numpy as jnp
from flax import nnx


def shrink(c):
  """A tiny model (1 layer, 32 wide) for end-to-end tests on the demo's data path."""
  c.model.hidden_size, c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 32, 2, 1, 16
  c.model.intermediate_size, c.model.num_layers, c.model.vocab_size = 64, 1, 128
  c.tokenizer.vocab_size = 128
  c.head.dim, c.head.num_layers = 32, 1


def jit_build(make):
  """A module built under jit (one compilation instead of one per eager op)."""
  graphdef = nnx.graphdef(nnx.eval_shape(make))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


def demo_assets(root: str) -> dict[str, str]:
  """A random demo VAE (a train_vae work directory's layout) in root/vae and the demo tokenizer at
  vocabulary 128 in root/tokenizer: what `shrink`-ed demo trainings point at."""
  from nextstep_jax.data import digits
  from nextstep_jax.data import tokenizer as tok_lib
  from nextstep_jax.interop.vae import export_vae
  from nextstep_jax.models import vae as vae_lib
  from nextstep_jax.training import vae_trainer
  vae = jit_build(lambda: vae_lib.build_vae("demo", seed=0))
  export_vae(vae, os.path.join(root, "vae", vae_trainer.EXPORT_DIR))
  with open(os.path.join(root, "vae", vae_trainer.VAE_CONFIG_FILE), "w") as f:
    f.write(vae.config.to_json())
  tok_lib.train_sentencepiece(digits.demo_texts(), 128).save(os.path.join(root, "tokenizer"))
  return {"vae": os.path.join(root, "vae"), "tokenizer": os.path.join(root, "tokenizer")}


def make_base_run(root: str, config, *, step: int = 7, seed: int = 3, transform=None) -> tuple[str, dict]:
  """A stand-in for a demo run's work directory: a random demo VAE in root/vae, the demo tokenizer
  recipe on the digit texts in root/tokenizer, and a randomly initialised model (`config`, `seed`)
  saved as `step` in root/checkpoints (its params through `transform(params) -> params` first, when
  given). Returns (root, the saved params)."""
  from nextstep_jax.training import checkpoint as ckpt_lib
  from nextstep_jax.training import vae_trainer
  from nextstep_jax.data import digits
  from nextstep_jax.data import tokenizer as tok_lib
  from nextstep_jax.interop.vae import export_vae
  from nextstep_jax.models import nextstep as ns
  from nextstep_jax.models import vae as vae_lib

  vae = jit_build(lambda: vae_lib.build_vae("demo", seed=0))
  export_vae(vae, os.path.join(root, "vae", vae_trainer.EXPORT_DIR))
  with open(os.path.join(root, "vae", vae_trainer.VAE_CONFIG_FILE), "w") as f:
    f.write(vae.config.to_json())
  tok_lib.train_sentencepiece(digits.demo_texts(), 128).save(os.path.join(root, "tokenizer"))
  model = jit_build(lambda: ns.build_model(config, seed=seed))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if transform is not None:
    params = transform(params)
  with ckpt_lib.Checkpointer(os.path.join(root, "checkpoints"), every=1, keep=1, async_save=False,
                             config=config) as ckpt:
    ckpt.save(step, {"step": jnp.int32(step), "params": params}, force=True)
  return root, params


def make_tiny_run(workdir: str, *, step: int, seed: int = 0, transform=None) -> tuple:
  """A finished tiny run in `workdir` (the demo config, `shrink`-ed, its workdir and VAE pointed there;
  `make_base_run` at `step` with `seed`), as tests/test_run.py and tests/test_cli_errors.py read it.
  Returns (the config, the saved params)."""
  from configs import demo
  config = demo.get_config()
  with config.unlocked():
    shrink(config)
    config.workdir = workdir
    config.vae.checkpoint = os.path.join(workdir, "vae")
  _, params = make_base_run(workdir, config, step=step, seed=seed, transform=transform)
  return config, params


def point_at(c, base: str) -> None:
  """Points a config at a base run: its checkpoints (init_from), VAE and tokenizer."""
  c.checkpoint.init_from = os.path.join(base, "checkpoints")
  c.vae.checkpoint = os.path.join(base, "vae")
  c.tokenizer.path = os.path.join(base, "tokenizer")
