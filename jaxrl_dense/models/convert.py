"""Params pytree <-> Hugging Face state dict (tensor names and PyTorch layout).

Our params (the inner dict of `Transformer.init(...)["params"]`) stack the decoder layers on
a leading axis `L` (the model scans over layers):

  embed_tokens/embedding                    [V, D]
  layers/input_layernorm/scale              [L, D]
  layers/self_attn/{q,k,v}_proj/kernel      [L, D, H*hd] / [L, D, Hkv*hd]   (in, out)
  layers/self_attn/{q,k,v}_proj/bias        [L, H*hd] / [L, Hkv*hd]          (attention_bias)
  layers/self_attn/o_proj/kernel            [L, H*hd, D]
  layers/self_attn/o_proj/bias              [L, D]                           (attention_out_bias)
  layers/self_attn/{q,k}_norm/scale         [L, hd]                          (qk_norm: Qwen3, Gemma 3)
  layers/post_attention_layernorm/scale     [L, D]
  layers/{pre,post}_feedforward_layernorm/scale [L, D]                       (post_norms: Gemma 3)
  layers/mlp/{gate,up}_proj/kernel          [L, D, I]
  layers/mlp/{gate,up,down}_proj/bias       [L, I] / [L, D]                  (mlp_bias)
  layers/mlp/down_proj/kernel               [L, I, D]
  norm/scale                                [D]
  lm_head/kernel                            [D, V]      (only when not tie_word_embeddings)

HF names are `model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight` (out, in),
`model.layers.{i}.self_attn.q_proj.bias`, `model.layers.{i}.mlp.gate_proj.weight`,
`model.layers.{i}.input_layernorm.weight`, `model.layers.{i}.self_attn.q_norm.weight`,
`model.norm.weight`, `lm_head.weight`. Gemma's norm weights are stored as in HF (the `w` of
`(1 + w)`), so checkpoints round-trip bit for bit.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxrl_dense.models.config import ModelConfig

Params = dict[str, Any]

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# (our module path, HF suffix) of every per-layer linear layer.
_LAYER_LINEARS = (
    (("self_attn", "q_proj"), "self_attn.q_proj"),
    (("self_attn", "k_proj"), "self_attn.k_proj"),
    (("self_attn", "v_proj"), "self_attn.v_proj"),
    (("self_attn", "o_proj"), "self_attn.o_proj"),
    (("mlp", "gate_proj"), "mlp.gate_proj"),
    (("mlp", "up_proj"), "mlp.up_proj"),
    (("mlp", "down_proj"), "mlp.down_proj"),
)
# Buffers some checkpoints carry that are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _has_bias(config: ModelConfig, name: str) -> bool:
  if name in ("q_proj", "k_proj", "v_proj"):
    return config.attention_bias
  if name == "o_proj":
    return config.attention_out_bias
  return config.mlp_bias


def _layer_norms(config: ModelConfig) -> tuple:
  """(our module path, HF suffix) of every per-layer RMSNorm the config uses."""
  norms = [(("input_layernorm",), "input_layernorm"),
           (("post_attention_layernorm",), "post_attention_layernorm")]
  if config.post_norms:
    norms += [(("pre_feedforward_layernorm",), "pre_feedforward_layernorm"),
              (("post_feedforward_layernorm",), "post_feedforward_layernorm")]
  if config.qk_norm:
    norms += [(("self_attn", "q_norm"), "self_attn.q_norm"), (("self_attn", "k_norm"), "self_attn.k_norm")]
  return tuple(norms)


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> (out, in) shape for every tensor the architecture needs."""
  c = config
  d, hd, inter = c.hidden_size, c.head_dim, c.intermediate_size
  q, kv = c.num_heads * hd, c.num_kv_heads * hd
  shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
  linear_shapes = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                   "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
  per_layer = {}
  for (_, name), hf in _LAYER_LINEARS:
    per_layer[f"{hf}.weight"] = linear_shapes[name]
    if _has_bias(c, name):
      per_layer[f"{hf}.bias"] = (linear_shapes[name][0],)
  for path, hf in _layer_norms(c):
    per_layer[f"{hf}.weight"] = (hd,) if path[-1] in ("q_norm", "k_norm") else (d,)
  for i in range(c.num_layers):
    for k, s in per_layer.items():
      shapes[f"model.layers.{i}.{k}"] = s
  if not c.tie_word_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, d)
  return shapes


def _set(tree: Params, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Params, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _to_numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor slipped in
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()
    x = x.numpy()
  return np.asarray(x)


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: ModelConfig) -> Params:
  """Converts an HF-named state dict (PyTorch (out, in) layout) into our params pytree.

  Args:
    state_dict: tensor name -> array (numpy, or anything `np.asarray` accepts).
    config: the architecture; `config.param_dtype` sets the dtype of the returned arrays.

  Returns:
    The nested params dict (jax arrays of `config.param_dtype`), layers stacked on axis 0.

  Raises:
    ValueError: a missing tensor, an unexpected tensor or a tensor of the wrong shape
      (the message names it).
  """
  shapes = expected_hf_shapes(config)
  names = set(state_dict)
  missing = sorted(set(shapes) - names)
  if missing:
    raise ValueError(
        f"state dict lacks {len(missing)} tensor(s) required by the {config.model_type} config, "
        f"e.g. {missing[:5]}")
  allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
  unexpected = sorted(n for n in names - set(shapes) - allowed_extra
                      if not n.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise ValueError(
        f"state dict has {len(unexpected)} tensor(s) the {config.model_type} config does not use "
        f"(attention_bias={config.attention_bias}, attention_out_bias={config.attention_out_bias}, "
        f"mlp_bias={config.mlp_bias}, qk_norm={config.qk_norm}, post_norms={config.post_norms}, "
        f"tie_word_embeddings={config.tie_word_embeddings}), e.g. {unexpected[:5]}")
  dtype = _NP_DTYPES[config.param_dtype]

  def get(name: str) -> np.ndarray:
    x = _to_numpy(state_dict[name])
    if tuple(x.shape) != shapes[name]:
      raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)}; the config expects {shapes[name]}.")
    return x

  def stack(suffix: str, transpose: bool) -> jnp.ndarray:
    xs = [get(f"model.layers.{i}.{suffix}") for i in range(config.num_layers)]
    if transpose:
      xs = [x.T for x in xs]
    return jnp.asarray(np.stack(xs).astype(dtype))

  layers: Params = {}
  for (group, name), hf in _LAYER_LINEARS:
    entry = {"kernel": stack(f"{hf}.weight", transpose=True)}
    if _has_bias(config, name):
      entry["bias"] = stack(f"{hf}.bias", transpose=False)
    layers.setdefault(group, {})[name] = entry
  for path, hf in _layer_norms(config):
    _set(layers, path, {"scale": stack(f"{hf}.weight", transpose=False)})

  params: Params = {
      "embed_tokens": {"embedding": jnp.asarray(get("model.embed_tokens.weight").astype(dtype))},
      "layers": layers,
      "norm": {"scale": jnp.asarray(get("model.norm.weight").astype(dtype))},
  }
  if not config.tie_word_embeddings:
    params["lm_head"] = {"kernel": jnp.asarray(get("lm_head.weight").T.astype(dtype))}
  return params


def hf_state_dict_from_params(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
  """Converts our params pytree into an HF-named state dict in PyTorch (out, in) layout.

  Arrays keep the params' dtype (numpy float32, float16 or `ml_dtypes.bfloat16`) and are
  C-contiguous. Tied checkpoints carry no `lm_head.weight`.

  Raises:
    ValueError: the params do not match the config (names the offending leaf).
  """
  c = config
  try:
    layers = params["layers"]
    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"]),
        "model.norm.weight": np.asarray(params["norm"]["scale"]),
    }
    stacked: dict[str, np.ndarray] = {}
    for (group, name), hf in _LAYER_LINEARS:
      stacked[f"{hf}.weight"] = np.swapaxes(np.asarray(layers[group][name]["kernel"]), 1, 2)
      if _has_bias(c, name):
        stacked[f"{hf}.bias"] = np.asarray(layers[group][name]["bias"])
    for path, hf in _layer_norms(c):
      stacked[f"{hf}.weight"] = np.asarray(_get(layers, path)["scale"])
    if not c.tie_word_embeddings:
      out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
  except KeyError as e:
    raise ValueError(f"params lack the entry {e.args[0]!r} required by the {c.model_type} config "
                     f"(attention_bias={c.attention_bias}, attention_out_bias={c.attention_out_bias}, "
                     f"mlp_bias={c.mlp_bias}, qk_norm={c.qk_norm}, post_norms={c.post_norms}, "
                     f"tie={c.tie_word_embeddings}).") from None
  if "lora" in params:
    raise ValueError("params carry attached LoRA adapters ('lora'); merge them first "
                     "(jaxrl_dense.models.lora.merge) to write an HF checkpoint.")
  for suffix, arr in stacked.items():
    if arr.shape[0] != c.num_layers:
      raise ValueError(f"params for {suffix!r} stack {arr.shape[0]} layers; config has {c.num_layers}.")
    for i in range(c.num_layers):
      out[f"model.layers.{i}.{suffix}"] = arr[i]
  shapes = expected_hf_shapes(c)
  for name, arr in out.items():
    if tuple(arr.shape) != shapes[name]:
      raise ValueError(f"params give {name!r} shape {tuple(arr.shape)}; the config expects {shapes[name]}.")
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
