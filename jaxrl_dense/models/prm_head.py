"""Discriminative (step-scoring) process reward models: a decoder trunk plus a token-classification head.

A discriminative PRM reads a whole (question, solution) sequence once and classifies the hidden
state at each step's separator token. Qwen2.5-Math-PRM (Zhang et al., "The Lessons of Developing
Process Reward Models in Mathematical Reasoning", arXiv 2501.07301; HF `Qwen/Qwen2.5-Math-PRM-7B`,
remote-code class `Qwen2ForProcessRewardModel` in its `modeling_qwen2_rm.py`) is a Qwen2 trunk
with a 2-class head whose logits at the `<extra_0>` step separators give the step reward
``p(class 1) − p(class 0)`` (`prm_logits_to_step_reward`, PURE's reward).

With ``h = hidden_states(trunk, tokens, mask)`` (final-normed, ``[B, T, D]``) the head is one of

  linear (transformers `Qwen2ForTokenClassification`, `LlamaForTokenClassification`,
          `Qwen3ForTokenClassification`; dropout is the identity at inference):
      logits = h W + b                                     W [D, C]  (HF `score.weight` [C, D])
  mlp    (`Qwen2ForProcessRewardModel`: score = Sequential(Linear(D, D), ReLU, Linear(D, C))):
      logits = relu(h W0 + b0) W2 + b2                     HF `score.0.*`, `score.2.*`

A missing bias (HF `token_classification_bias=False`) is loaded as zeros. The head runs in
float32 on the hidden states cast to float32 (transformers runs it in the model dtype; equal in
float32, slightly more accurate in bfloat16).

Public API (pure; the arrays are traced arguments of one jitted function, the config and head
kind are static, so params placed with `placement.shard_params(prm.params, prm.config, mesh)` run
sharded exactly like the policy's):

  load_discriminative_prm(path, dtype) -> DiscriminativePRM(config, params, head, head_kind,
                                                           num_labels, tokenizer)
  prm_token_logits(prm, tokens, mask)                            -> float32 [B, T, C]
  prm_step_logits(prm, tokens, mask, step_positions, step_mask)  -> float32 [B, S, C]
  prm_step_rewards(prm, tokens, mask, step_positions, step_mask) -> float32 [B, S]
  prm_logits_to_step_reward(logits [..., 2])                     -> float32 [...]
  step_positions_from_separator(tokens, mask, separator_id, max_steps) -> (positions, step_mask)
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxrl_dense.models import convert, hf_io
from jaxrl_dense.models import tokenizer as tokenizer_lib
from jaxrl_dense.models.config import ModelConfig
from jaxrl_dense.models.loading import _dtype_name
from jaxrl_dense.models.transformer import hidden_states

PathLike = Union[str, os.PathLike]
Array = jax.Array

HEAD_KINDS = ("linear", "mlp")
# HF architecture -> (model_type of its trunk, head kind).
PRM_ARCHITECTURES = {
    "Qwen2ForTokenClassification": ("qwen2", "linear"),
    "Qwen3ForTokenClassification": ("qwen3", "linear"),
    "LlamaForTokenClassification": ("llama", "linear"),
    "Qwen2ForProcessRewardModel": ("qwen2", "mlp"),
}
_HEAD_PREFIX = "score."
_LINEAR_KEYS = ("score.weight", "score.bias")
_MLP_KEYS = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class DiscriminativePRM(NamedTuple):
  """A loaded step-scoring PRM.

  Attributes:
    config: the trunk's `ModelConfig` (static; the checkpoint has no LM head, so use it with
      `hidden_states`, not `forward`).
    params: trunk params pytree (as `convert.params_from_hf_state_dict`, without `lm_head`).
    head: linear: {"kernel" [D, C], "bias" [C]}; mlp: {"hidden": {"kernel" [D, D], "bias" [D]},
      "logits": {"kernel" [D, C], "bias" [C]}} (in the params' dtype).
    head_kind: "linear" or "mlp".
    num_labels: C, the head's classes (2 for Qwen2.5-Math-PRM).
    tokenizer: a transformers tokenizer from the directory, or None.
  """
  config: ModelConfig
  params: Any
  head: Any
  head_kind: str
  num_labels: int
  tokenizer: Any


def _weights_source(directory: pathlib.Path) -> str:
  index = directory / hf_io.SAFE_WEIGHTS_INDEX_NAME
  return str(index if index.is_file() else directory / hf_io.SAFE_WEIGHTS_NAME)


def _architecture(hf_config: dict, state_dict: dict, source: str, weights: str) -> str:
  archs = hf_config.get("architectures") or []
  known = [a for a in archs if a in PRM_ARCHITECTURES]
  if known:
    return known[0]
  has_head = any(k.startswith(_HEAD_PREFIX) for k in state_dict)
  if not has_head:
    raise ValueError(
        f"{weights}: no `score.*` head tensors (architectures={archs} in {source}); this looks "
        f"like a causal LM, not a discriminative PRM. load_discriminative_prm needs a token-"
        f"classification head: one of {sorted(PRM_ARCHITECTURES)} (`score.weight`, or "
        f"`score.0.*`/`score.2.*` for Qwen2ForProcessRewardModel). Load causal LMs with "
        f"load_pretrained.")
  raise ValueError(
      f"{source}: unsupported PRM architecture architectures={archs}; load_discriminative_prm "
      f"supports {sorted(PRM_ARCHITECTURES)}.")


def _head_from_state_dict(state_dict: dict, kind: str, hidden: int, arch: str, weights: str,
                          dtype) -> tuple[dict, int]:
  """HF `score.*` tensors ((out, in) layout) -> (head params [in, out], num_labels)."""
  head_sd = {k: np.asarray(v) for k, v in state_dict.items() if k.startswith(_HEAD_PREFIX)}
  allowed = _LINEAR_KEYS if kind == "linear" else _MLP_KEYS
  required = allowed[0::2] if kind == "linear" else (allowed[0], allowed[2])
  missing = [k for k in required if k not in head_sd]
  extra = sorted(set(head_sd) - set(allowed))
  if missing or extra:
    raise ValueError(
        f"{weights}: the {arch} head ({kind}: {list(allowed)}) does not match the checkpoint's "
        f"score tensors {sorted(head_sd)} (missing {missing}, unexpected {extra}).")

  def linear(prefix: str, n_in: int, n_out: Optional[int]) -> dict:
    w = head_sd[f"{prefix}.weight"]
    if w.ndim != 2 or w.shape[1] != n_in or (n_out is not None and w.shape[0] != n_out):
      want = f"({n_out if n_out is not None else 'num_labels'}, {n_in})"
      raise ValueError(f"{weights}: tensor {prefix + '.weight'!r} has shape {tuple(w.shape)}; "
                       f"hidden_size={hidden} needs {want}.")
    b = head_sd.get(f"{prefix}.bias")
    if b is None:
      b = np.zeros((w.shape[0],), np.float32)
    elif tuple(b.shape) != (w.shape[0],):
      raise ValueError(f"{weights}: tensor {prefix + '.bias'!r} has shape {tuple(b.shape)}; "
                       f"{prefix}.weight needs ({w.shape[0]},).")
    return {"kernel": jnp.asarray(w.T.astype(dtype)), "bias": jnp.asarray(b.astype(dtype))}

  if kind == "linear":
    head = linear("score", hidden, None)
  else:
    head = {"hidden": linear("score.0", hidden, hidden),
            "logits": linear("score.2", hidden, None)}
  num_labels = int((head if kind == "linear" else head["logits"])["kernel"].shape[1])
  if num_labels < 1:
    raise ValueError(f"{weights}: the score head has {num_labels} outputs.")
  return head, num_labels


def load_discriminative_prm(path: PathLike, dtype: Any = jnp.float32, compute_dtype: Any = None, *,
                            require_tokenizer: bool = True) -> DiscriminativePRM:
  """Loads a step-scoring PRM from a Hugging Face directory (config.json + safetensors).

  Architectures: `Qwen2ForProcessRewardModel` (Qwen2.5-Math-PRM-7B/72B: MLP head `score.0`,
  `score.2`), `Qwen2ForTokenClassification`, `Qwen3ForTokenClassification`,
  `LlamaForTokenClassification` (linear head `score.weight` [+ `score.bias`]); the trunk is
  `model.*` exactly as for the causal LMs (`convert.params_from_hf_state_dict`). An
  `lm_head.weight` in the checkpoint is ignored.

  Args:
    path: the model directory.
    dtype: parameter storage dtype (float32, bfloat16, float16 or their names).
    compute_dtype: trunk activation dtype; defaults to `dtype`. The head always runs in float32.
    require_tokenizer: refuse a directory without tokenizer files (scoring text needs the PRM's
      own tokenizer); False returns tokenizer=None.

  Raises:
    FileNotFoundError: no such directory, or it has no config.json / safetensors.
    ValueError: a causal-LM directory (no `score.*` head), an unsupported architecture, a trunk
      model_type that does not match the architecture, head or trunk tensors that do not match
      hidden_size / the config, a `num_labels`/`id2label` that disagrees with the head, or a
      missing tokenizer with `require_tokenizer` (each names the file).
  """
  param_name = _dtype_name(dtype, "dtype")
  compute_name = param_name if compute_dtype is None else _dtype_name(compute_dtype, "compute_dtype")
  directory = pathlib.Path(path).expanduser()
  if directory.is_file():
    raise ValueError(f"load_discriminative_prm: {str(directory)!r} is a file; pass a Hugging Face "
                     "model directory (config.json + safetensors). GGUF PRMs are not supported.")
  hf_config, state_dict = hf_io.read_hf_dir(directory)
  source = str(directory / hf_io.CONFIG_NAME)
  weights = _weights_source(directory)
  arch = _architecture(hf_config, state_dict, source, weights)
  want_type, kind = PRM_ARCHITECTURES[arch]
  if hf_config.get("model_type") != want_type:
    raise ValueError(f"{source}: architectures={hf_config.get('architectures')} needs "
                     f"model_type={want_type!r}, got {hf_config.get('model_type')!r}.")
  # A token-classification checkpoint has no LM head and need not be tied: convert the trunk alone.
  config = ModelConfig.from_hf_dict(hf_config, source=source, param_dtype=param_name,
                                    dtype=compute_name)
  trunk_sd = {k: v for k, v in state_dict.items()
              if not k.startswith(_HEAD_PREFIX) and k != "lm_head.weight"}
  try:
    params = convert.params_from_hf_state_dict(trunk_sd, config.replace(tie_word_embeddings=True))
  except ValueError as e:
    raise ValueError(f"{weights}: {e}") from None
  head, num_labels = _head_from_state_dict(state_dict, kind, config.hidden_size, arch, weights,
                                           _DTYPES[param_name])
  declared = hf_config.get("num_labels")
  if declared is None and isinstance(hf_config.get("id2label"), dict):
    declared = len(hf_config["id2label"])
  if declared is not None and int(declared) != num_labels:
    raise ValueError(f"{source}: declares {int(declared)} labels (num_labels/id2label) but the "
                     f"score head in {weights} has {num_labels} outputs.")
  tok = None
  if tokenizer_lib.has_tokenizer_files(directory):
    tok = tokenizer_lib.tokenizer_from_hf_dir(directory)
    tokenizer_lib.check_vocab_fits(tok, config.vocab_size, source=str(directory))
  elif require_tokenizer:
    raise ValueError(f"{str(directory)!r} has no tokenizer files (looked for "
                     f"{tokenizer_lib.TOKENIZER_FILES}); a PRM scores text in its own tokenizer. "
                     "Add them, or pass require_tokenizer=False to load the weights alone.")
  return DiscriminativePRM(config, params, head, kind, num_labels, tok)


# ---------------------------------------------------------------------------------------------
# Forward


def apply_head(head: Any, head_kind: str, hidden: Array) -> Array:
  """Head logits ``[..., C]`` float32 from hidden states ``[..., D]`` (see the module docstring)."""
  x = jnp.asarray(hidden).astype(jnp.float32)  # [..., D]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  if head_kind == "linear":
    return x @ f32(head["kernel"]) + f32(head["bias"])  # [..., C]
  if head_kind == "mlp":
    h = jax.nn.relu(x @ f32(head["hidden"]["kernel"]) + f32(head["hidden"]["bias"]))  # [..., D]
    return h @ f32(head["logits"]["kernel"]) + f32(head["logits"]["bias"])  # [..., C]
  raise ValueError(f"head_kind={head_kind!r}; expected one of {HEAD_KINDS}.")


def _valid_steps(attention_mask: Array, step_positions: Array, step_mask: Optional[Array]) -> Array:
  """[B, S] bool: mask on, 0 <= position < T, and the position is a real (unmasked) token."""
  t = attention_mask.shape[1]
  pos = jnp.asarray(step_positions)
  valid = (pos >= 0) & (pos < t)  # [B, S]
  if step_mask is not None:
    valid = valid & (jnp.asarray(step_mask) > 0)
  on_token = jnp.take_along_axis(jnp.asarray(attention_mask) > 0, jnp.clip(pos, 0, t - 1), axis=1)
  return valid & on_token  # [B, S]


def step_positions_from_separator(tokens: chex.Array, attention_mask: chex.Array, separator_id: int,
                                  max_steps: int) -> tuple[Array, Array]:
  """Positions of a step-separator token (Qwen2.5-Math-PRM: `<extra_0>` after every step).

  ``positions[b, k]`` = index of the k-th real token of row b equal to ``separator_id``, −1 past
  the last one; separators beyond ``max_steps`` are dropped. Pure and jit-able
  (``max_steps`` static).

  Returns:
    (positions int32 ``[B, S]``, step_mask int32 ``[B, S]``) with S = max_steps.
  """
  chex.assert_rank([tokens, attention_mask], 2)
  chex.assert_equal_shape([tokens, attention_mask])
  b, t = tokens.shape
  is_sep = (jnp.asarray(tokens) == separator_id) & (jnp.asarray(attention_mask) > 0)  # [B, T]
  rank = jnp.cumsum(is_sep.astype(jnp.int32), axis=1) - 1  # [B, T]
  slot = jnp.where(is_sep & (rank < max_steps), rank, max_steps)  # [B, T]; max_steps = dropped
  out = jnp.full((b, max_steps + 1), -1, jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  cols = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  out = out.at[rows, slot].max(cols)[:, :max_steps]  # [B, S]
  return out, (out >= 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "head_kind"))
def _token_logits(params, head, config: ModelConfig, head_kind: str, tokens, attention_mask):
  hidden = hidden_states(params, config, tokens, attention_mask)  # [B, T, D]
  return apply_head(head, head_kind, hidden)  # [B, T, C]


@functools.partial(jax.jit, static_argnames=("config", "head_kind"))
def _step_logits(params, head, config: ModelConfig, head_kind: str, tokens, attention_mask,
                 step_positions, step_mask):
  hidden = hidden_states(params, config, tokens, attention_mask)  # [B, T, D]
  t = tokens.shape[1]
  idx = jnp.clip(step_positions, 0, t - 1).astype(jnp.int32)  # [B, S]
  picked = jnp.take_along_axis(hidden, idx[:, :, None], axis=1)  # [B, S, D]
  logits = apply_head(head, head_kind, picked)  # [B, S, C]
  valid = _valid_steps(attention_mask, step_positions, step_mask)  # [B, S]
  return jnp.where(valid[:, :, None], logits, 0.0), valid


def _check(prm: DiscriminativePRM, tokens, attention_mask, step_positions=None, step_mask=None):
  if not isinstance(prm, DiscriminativePRM):
    raise TypeError(f"expected a DiscriminativePRM (load_discriminative_prm), got {type(prm).__name__}.")
  chex.assert_rank([tokens, attention_mask], 2)
  chex.assert_equal_shape([tokens, attention_mask])
  if step_positions is not None:
    chex.assert_rank(step_positions, 2)
    chex.assert_equal_shape_prefix([tokens, step_positions], 1)
    if not jnp.issubdtype(jnp.asarray(step_positions).dtype, jnp.integer):
      raise TypeError(f"step_positions must be integer token indices, got "
                      f"{jnp.asarray(step_positions).dtype}.")
    if step_mask is not None:
      chex.assert_equal_shape([step_positions, step_mask])


def prm_token_logits(prm: DiscriminativePRM, tokens: chex.Array, attention_mask: chex.Array) -> Array:
  """The head's logits at every token: float32 ``[B, T, C]`` (one jitted pass).

  Args:
    prm: a `DiscriminativePRM` (its params may be sharded; see the module docstring).
    tokens: int ``[B, T]`` in the PRM's tokenizer, left- or right-padded.
    attention_mask: ``[B, T]``, 1 on real tokens (positions are ``cumsum(mask) − 1``).

  Returns:
    ``head(hidden_states(tokens))``; rows at masked positions are finite but meaningless.
  """
  _check(prm, tokens, attention_mask)
  return _token_logits(prm.params, prm.head, prm.config, prm.head_kind, tokens, attention_mask)


def prm_step_logits(prm: DiscriminativePRM, tokens: chex.Array, attention_mask: chex.Array,
                    step_positions: chex.Array, step_mask: Optional[chex.Array] = None) -> Array:
  """The head's logits at each step's end token: float32 ``[B, S, C]`` (one jitted pass).

  ``out[b, s] = head(h[b, step_positions[b, s]])`` for valid steps, 0 elsewhere. A step is valid
  when ``step_mask[b, s] > 0`` (None: all), ``0 <= step_positions[b, s] < T`` (−1 = no step) and
  the position is a real token (``attention_mask`` 1 there). For Qwen2.5-Math-PRM the positions
  are those of the `<extra_0>` separator after each step. The head runs on the S gathered hidden
  states only.

  Args:
    prm, tokens, attention_mask: as `prm_token_logits`.
    step_positions: int ``[B, S]`` token index of each step's end (separator) token.
    step_mask: ``[B, S]``, 1 on real steps, or None.
  """
  _check(prm, tokens, attention_mask, step_positions, step_mask)
  logits, _ = _step_logits(prm.params, prm.head, prm.config, prm.head_kind, tokens,
                           attention_mask, step_positions, step_mask)
  return logits


def prm_logits_to_step_reward(logits: chex.Array) -> Array:
  """A 2-class PRM head's step reward ``p(correct) − p(incorrect)`` in [−1, 1] (PURE), ``[..., 2] -> [...]``."""
  chex.assert_axis_dimension(logits, -1, 2)
  p = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return p[..., 1] - p[..., 0]


def prm_step_rewards(prm: DiscriminativePRM, tokens: chex.Array, attention_mask: chex.Array,
                     step_positions: chex.Array, step_mask: Optional[chex.Array] = None) -> Array:
  """Step rewards ``r[b, s] = p(class 1) − p(class 0)`` of a 2-class PRM, float32 ``[B, S]``.

  ``p = softmax(prm_step_logits(...))`` (`prm_logits_to_step_reward`, PURE's reward, as in
  Qwen2.5-Math-PRM's model card, which reads ``p(1)``: ``r = 2 p(1) − 1``); invalid steps
  (see `prm_step_logits`) are 0. Raises ValueError for a head with num_labels != 2.
  """
  if isinstance(prm, DiscriminativePRM) and prm.num_labels != 2:
    raise ValueError(f"prm_step_rewards needs a 2-class head (p(1) − p(0)); this PRM has "
                     f"num_labels={prm.num_labels}. Use prm_step_logits.")
  _check(prm, tokens, attention_mask, step_positions, step_mask)
  return _step_rewards(prm.params, prm.head, prm.config, prm.head_kind, tokens, attention_mask,
                       step_positions, step_mask)


@functools.partial(jax.jit, static_argnames=("config", "head_kind"))
def _step_rewards(params, head, config, head_kind, tokens, attention_mask, step_positions, step_mask):
  logits, valid = _step_logits(params, head, config, head_kind, tokens, attention_mask,
                               step_positions, step_mask)  # [B, S, 2], [B, S]
  return jnp.where(valid, prm_logits_to_step_reward(logits), 0.0)  # [B, S]
