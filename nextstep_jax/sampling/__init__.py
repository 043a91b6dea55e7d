"""Sampling (SPEC §6): a compiled image sampler, unified text/image generation, and a naive reference.

Modules: ``prompts`` (token rows, buckets, editing prompts), ``flow`` (the head's per-token
integration), ``sampler`` (the compiled sampler), ``reference`` (the naive loop), ``generate``
(unified generation), ``runner`` (a trained run sampled to PNGs: ``python -m nextstep_jax.sample``).
The names below are the package's API.

Image sampling. A prompt ends with the image prefix ``<|image_area|>{h}*{w}<|begin_of_image|>``
(``image_prompt_ids`` builds it). The prompt is prefilled into a fixed-size KV cache; then a
``jax.lax.fori_loop`` runs exactly h*w steps: the condition ``c = image_out(h_last)``, the
flow-matching head integrates one token from noise (t=0) to data (t=1) with Euler (ODE) or
Euler–Maruyama (SDE), the token is optionally layer-normed (``use_norm``), and ``image_in(token)``
is fed back into every row with one KV-cached decode step.

Guidance acts on the head only. Rows come in groups of B (one group per prompt kind), all in one
batch; the head sees the same x and t in every group and the velocities are combined:
  1 group   [cond]                         v = v_c
  2 groups  [cond, negative]               v = v_u + cfg (v_c - v_u)
  3 groups  [image+text, image+negative,   v = v_nn + cfg_img (v_in - v_nn) + cfg (v_it - v_in)
             negative only] (editing)
The sampled token is fed back into every group's rows.

Time grid: t_k = linspace(0, 1, N + 1), shifted by s: t' = t / (s - (s - 1) t).
SDE (after SiT's sampler, "sigma" diffusion w(t) = 1 - t, Mean last step): with the rectified-flow
score s(x, t) = (t v - x) / (1 - t), the drift is v + w s = (1 + t) v - x and the noise sqrt(2 w dt);
the grid is linspace(0, 1 - 0.04, N) shifted, N - 1 Euler–Maruyama steps, then one deterministic
step of the drift to t = 1 (size 0.04 unshifted). Both use N head evaluations per token.

Randomness: token i draws ``normal(fold_in(key, i), (N, B, d))`` (``flow.token_noise``; one slice for the
ODE): slice 0 is the start noise, slice j the noise of SDE step j. With one key per image (B,), image
j draws from its own key as a one-image call would (``flow.row_noise``), so a batch samples what each
prompt sampled alone samples. The compiled sampler and ``sample_images_naive`` draw the same numbers.

Prompts are left-padded: a ``Prompt`` holds tokens (B, P) and a mask (B, P) (1 on real tokens);
RoPE positions restart at 0 at each row's first real token; padding gets segment id 0, so it is
never attended to. Prompts that carry source images (editing) hold the image tokens (B, M, d) and
an index (B, P) into them, as in the training batch contract (``nextstep_jax/batch.py``).

Weights: the sampler reads the backbone's layers one array per layer and the head's blocks one dict per
block, its adaLN projections fused (``layout``). ``sampler_weights(model)`` lays them out once
(``SamplerWeights``, taken wherever a model is); given the model itself, each call lays them out anew and
holds them twice while it runs. ``sampler_weights(model, consume=True)`` frees the model's copy as it goes,
so a device holds the weights once (``sample`` and ``evaluate`` do that).

Compilation: one executable per (rows, prompt length, h, w, steps, sde, use_norm, model graph).
cfg, cfg_img, time_shift, the key and the prompt contents are traced values, so prompts padded
to the same bucket never recompile (``trace_count`` counts traces, for tests).
"""

from nextstep_jax.sampling.flow import SDE_LAST_STEP, guide, ode_grid, sample_token, sde_grid, shift_time
from nextstep_jax.sampling.generate import generate, parse_area, sample_logits
from nextstep_jax.sampling.layout import SamplerWeights, sampler_weights
from nextstep_jax.sampling.prompts import (Prompt, PromptLike, TokenizerLike, as_prompt, bucket_length, edit_prompts,
                                           image_prefix_ids, image_prompt_ids, image_prompts, pad_prompts)
from nextstep_jax.sampling.reference import sample_images_naive
from nextstep_jax.sampling.sampler import edit_images, reporting, sample_guided, sample_images, trace_count

__all__ = ["SDE_LAST_STEP", "Prompt", "PromptLike", "SamplerWeights", "TokenizerLike", "as_prompt", "bucket_length",
           "edit_images", "edit_prompts", "generate", "guide", "image_prefix_ids", "image_prompt_ids", "image_prompts",
           "ode_grid", "pad_prompts", "parse_area", "reporting", "sample_guided", "sample_images",
           "sample_images_naive", "sample_logits", "sample_token", "sampler_weights", "sde_grid", "shift_time",
           "trace_count"]
