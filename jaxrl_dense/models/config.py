"""Model configuration shared by every decoder-only LM in jaxrl_dense.

One frozen dataclass covers the Llama family (SmolLM2, Llama 3.x, with or without attention/MLP
biases), Qwen2 (Qwen2.5, Qwen2.5-Math), Qwen3 dense (per-head q/k RMSNorm) and Gemma 3 text
(`Gemma3ForCausalLM`: sliding-window and global layers with their own RoPE bases, q/k norm,
embedding scaling, GeGLU, pre- and post-norms with Gemma's `(1 + w)` RMSNorm). It is hashable,
so it can be a static argument of `jax.jit`. `from_hf_dict` reads a Hugging Face `config.json`
written by transformers 4 or 5; `to_hf_dict` writes one that transformers loads back.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Optional

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
REMAT_POLICIES = ("full", "none", "save_dots", "save_dots_except_mlp", "save_dots_except_mlp_in",
                  "save_qkv_proj")


def _rope_tuple(scaling: Optional[Mapping[str, Any]]) -> Optional[tuple]:
  """HF rope_scaling dict -> sorted hashable tuple (None for absent/"default")."""
  if not scaling:
    return None
  if scaling.get("rope_type", scaling.get("type", "default")) == "default":
    return None
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items()
                      if k != "rope_theta"))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyperparameters of a Llama/Qwen2/Qwen3/Gemma3-style decoder.

  Attributes:
    model_type: "llama", "qwen2", "qwen3" or "gemma3_text".
    vocab_size: rows of the embedding / LM head.
    hidden_size: model width d.
    intermediate_size: gated-MLP hidden width.
    num_layers: decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when < num_heads).
    head_dim: per-head width (Qwen3 and Gemma 3: independent of hidden_size // num_heads).
    rope_theta: RoPE base frequency (of the global layers when layers differ).
    rope_scaling: HF `rope_scaling` dict (e.g. Llama 3.1 "llama3"; Gemma 3 "linear" on its
      global layers), or None; stored as a sorted tuple of items so the config stays hashable.
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: LM head shares the embedding matrix.
    attention_bias: q/k/v projections carry a bias (Qwen2: True; Llama/Qwen3/Gemma 3:
      `attention_bias` in config.json).
    attention_out_bias: o_proj carries a bias (HF Llama/Qwen3/Gemma 3 `attention_bias`; never
      Qwen2).
    mlp_bias: gate/up/down projections carry a bias (HF Llama `mlp_bias`).
    qk_norm: per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    hidden_act: MLP gate activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, Gemma).
    rms_norm_unit_offset: Gemma's RMSNorm `y = x / rms(x) * (1 + w)` in float32 (else
      `w * (x / rms(x))`).
    scale_embeddings: multiply the embeddings by sqrt(hidden_size) (Gemma).
    post_norms: Gemma's sandwich norms: the attention and MLP outputs are RMS-normed before the
      residual add (post_attention_layernorm / post_feedforward_layernorm) and the MLP input by
      pre_feedforward_layernorm (Llama's post_attention_layernorm is the pre-MLP norm).
    query_pre_attn_scalar: attention scores scale by this ** -0.5 (Gemma); None: head_dim ** -0.5.
    sliding_window: keys more than `sliding_window - 1` positions behind the query are masked
      in sliding layers (HF `kv_idx > q_idx - sliding_window`); None when no layer slides.
    layer_types: per-layer "full_attention" / "sliding_attention" (None: all full).
    rope_local_theta: RoPE base of the sliding layers (Gemma 3 `rope_local_base_freq`; no
      rope_scaling there); None: sliding layers use the global RoPE.
    max_position_embeddings: longest supported sequence.
    bos_token_id / eos_token_ids / pad_token_id: special ids from the checkpoint.
    param_dtype: storage dtype of parameters ("float32" or "bfloat16").
    dtype: compute dtype of activations and matmuls ("float32" or "bfloat16").
    remat: rematerialise each decoder layer in the backward pass (`jax.checkpoint`); not
      part of the HF config.
    remat_policy: what a rematerialised layer saves for the backward pass (used when `remat`):
      "full" (nothing: recompute the layer), "none" (no remat), "save_dots" (every projection
      output), "save_dots_except_mlp" (q/k/v/o), "save_dots_except_mlp_in" (q/k/v/o and
      down_proj), "save_qkv_proj"; see `transformer.remat_policy` (MaxText `get_remat_policy`).
  """

  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  rope_theta: float = 10000.0
  rope_scaling: Optional[tuple] = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  attention_bias: bool = False
  attention_out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  hidden_act: str = "silu"
  rms_norm_unit_offset: bool = False
  scale_embeddings: bool = False
  post_norms: bool = False
  query_pre_attn_scalar: Optional[float] = None
  sliding_window: Optional[int] = None
  layer_types: Optional[tuple] = None
  rope_local_theta: Optional[float] = None
  max_position_embeddings: int = 8192
  bos_token_id: Optional[int] = None
  eos_token_ids: tuple = ()
  pad_token_id: Optional[int] = None
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "full"

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}.")
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"Unsupported architecture model_type={self.model_type!r}; "
          f"jaxrl_dense supports {SUPPORTED_MODEL_TYPES}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{name}={getattr(self, name)!r}; expected float32, bfloat16 or float16.")
    if self.hidden_act not in SUPPORTED_ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of "
                       f"{SUPPORTED_ACTIVATIONS}.")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs).")
    if self.layer_types is not None:
      if not isinstance(self.layer_types, tuple):
        raise ValueError(f"layer_types must be a tuple (hashable), got {type(self.layer_types)}.")
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f"layer_types has {len(self.layer_types)} entries; num_layers="
                         f"{self.num_layers}.")
      bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
      if bad:
        raise ValueError(f"layer_types has unknown entries {bad}; expected {LAYER_TYPES}.")
    if self.has_sliding_layers and (self.sliding_window is None or int(self.sliding_window) < 1):
      raise ValueError(f"layer_types has sliding_attention layers but sliding_window="
                       f"{self.sliding_window!r}; it must be a positive integer.")
    for name in ("query_pre_attn_scalar", "rope_local_theta"):
      v = getattr(self, name)
      if v is not None and not v > 0:
        raise ValueError(f"{name}={v!r} must be > 0 or None.")

  @property
  def rope_scaling_dict(self) -> Optional[dict]:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def has_sliding_layers(self) -> bool:
    """True when at least one layer uses sliding-window attention."""
    return self.layer_types is not None and "sliding_attention" in self.layer_types

  @property
  def sliding_layers(self) -> tuple:
    """Per-layer bool: True for sliding-window layers (all False without layer_types)."""
    if self.layer_types is None:
      return (False,) * self.num_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def attention_scale(self) -> float:
    """Multiplier of q.k in the attention scores: query_pre_attn_scalar ** -0.5 or head_dim ** -0.5."""
    base = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
    return float(base) ** -0.5

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
    """Builds a config from a transformers `config.json` dict (transformers 4 or 5 layout).

    Raises:
      ValueError: an unsupported architecture, a missing field, or a feature that would change
        the math without adding tensors (the message names `source` and the field).
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      archs = hf.get("architectures")
      raise ValueError(
          f"{source}: unsupported architecture model_type={model_type!r} (architectures={archs}); "
          f"jaxrl_dense supports {SUPPORTED_MODEL_TYPES}.")
    gemma = model_type == "gemma3_text"
    # Features that change the math without adding tensors: refuse rather than compute wrong logits.
    if hf.get("use_sliding_window") and not gemma:
      raise ValueError(f"{source}: use_sliding_window=true (Qwen sliding-window attention) is not "
                       "supported.")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if act not in SUPPORTED_ACTIVATIONS:
      raise ValueError(f"{source}: hidden_act={act!r} is not supported (only {SUPPORTED_ACTIVATIONS}).")
    # Softcapping (Gemma 2) changes every logits consumer (log-probs, losses); Gemma 3 sets both null.
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
      if hf.get(field) is not None:
        raise ValueError(f"{source}: {field}={hf[field]!r} (tanh softcapping) is not "
                         "supported; Gemma 3 checkpoints set it to null.")
    if hf.get("use_bidirectional_attention"):
      raise ValueError(f"{source}: use_bidirectional_attention=true is not supported (causal LMs only).")
    try:
      hidden = int(hf["hidden_size"])
      num_heads = int(hf["num_attention_heads"])
      num_layers = int(hf["num_hidden_layers"])
      # transformers 5 moves rope theta into rope_parameters and leaves rope_theta null; Gemma 3
      # keeps one rope_parameters entry per layer type.
      rope_params = dict(hf.get("rope_parameters") or {})
      local_theta = None
      if gemma:
        full = dict(rope_params.get("full_attention") or {})
        local = dict(rope_params.get("sliding_attention") or {})
        if _rope_tuple(local) is not None:
          raise ValueError(f"{source}: rope scaling on the sliding layers ({local}) is not supported.")
        rope_theta = full.get("rope_theta") or hf.get("rope_theta") or 1_000_000.0
        local_theta = float(local.get("rope_theta") or hf.get("rope_local_base_freq") or 10_000.0)
        rope_scaling = hf.get("rope_scaling") if hf.get("rope_scaling") is not None else full
      else:
        rope_theta = hf.get("rope_theta") or rope_params.get("rope_theta") or 10000.0
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is None:
          rope_scaling = rope_params
      layer_types = None
      sliding_window = None
      if gemma:
        layer_types = hf.get("layer_types")
        if layer_types is None:
          pattern = int(hf.get("sliding_window_pattern", 6))
          layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                         for i in range(num_layers)]
        layer_types = tuple(layer_types)
        sliding_window = hf.get("sliding_window", 4096)
        sliding_window = None if sliding_window is None else int(sliding_window)
        if sliding_window is None:
          layer_types = None
      elif hf.get("layer_types") and "sliding_attention" in hf["layer_types"]:
        raise ValueError(f"{source}: layer_types has sliding_attention layers, which are only "
                         f"supported for gemma3_text (not {model_type}).")
      eos = hf.get("eos_token_id")
      eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
      default_bias = model_type == "qwen2"
      attn_bias = bool(hf.get("attention_bias", default_bias))
      qpas = hf.get("query_pre_attn_scalar", 256 if gemma else None)
      kwargs = dict(
          model_type=model_type,
          vocab_size=int(hf["vocab_size"]),
          hidden_size=hidden,
          intermediate_size=int(hf["intermediate_size"]),
          num_layers=num_layers,
          num_heads=num_heads,
          num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
          head_dim=int(hf.get("head_dim") or hidden // num_heads),
          rope_theta=float(rope_theta),
          rope_scaling=_rope_tuple(rope_scaling),
          rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
          tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
          attention_bias=attn_bias,
          attention_out_bias=attn_bias and model_type != "qwen2",
          mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
          qk_norm=model_type in ("qwen3", "gemma3_text"),
          hidden_act=act,
          rms_norm_unit_offset=gemma,
          scale_embeddings=gemma,
          post_norms=gemma,
          query_pre_attn_scalar=None if qpas is None else float(qpas),
          sliding_window=sliding_window,
          layer_types=layer_types,
          rope_local_theta=local_theta,
          max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
          bos_token_id=hf.get("bos_token_id"),
          eos_token_ids=eos_ids,
          pad_token_id=hf.get("pad_token_id"),
      )
    except KeyError as e:
      raise ValueError(f"{source}: missing required field {e.args[0]!r}.") from None
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_dict(self) -> dict:
    """A transformers-loadable config.json dict (transformers 4 and 5 keys)."""
    out = {
        "architectures": [HF_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rope_theta": self.rope_theta,
        "rope_scaling": self.rope_scaling_dict,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": self.hidden_act,
        "torch_dtype": self.param_dtype,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) != 1
                         else self.eos_token_ids[0]) if self.eos_token_ids else None,
        "pad_token_id": self.pad_token_id,
    }
    if self.model_type != "qwen2":
      if self.attention_bias != self.attention_out_bias:
        raise ValueError(f"{self.model_type} has one attention_bias flag for q/k/v/o; this config "
                         f"has attention_bias={self.attention_bias}, attention_out_bias="
                         f"{self.attention_out_bias}, which transformers cannot express.")
      out["attention_bias"] = self.attention_bias
    elif not self.attention_bias or self.attention_out_bias:
      raise ValueError("qwen2 always has q/k/v biases and no o_proj bias; this config differs "
                       f"(attention_bias={self.attention_bias}, attention_out_bias="
                       f"{self.attention_out_bias}).")
    if self.model_type == "llama":
      out["mlp_bias"] = self.mlp_bias
    elif self.mlp_bias:
      raise ValueError(f"{self.model_type} has no mlp_bias in transformers.")
    if self.model_type in ("qwen2", "qwen3"):
      out["use_sliding_window"] = False
    if self.model_type == "gemma3_text":
      full = {"rope_type": "default", "rope_theta": self.rope_theta}
      full.update(self.rope_scaling_dict or {})
      local_theta = self.rope_local_theta if self.rope_local_theta is not None else self.rope_theta
      out.update({
          "hidden_activation": self.hidden_act,
          "query_pre_attn_scalar": _int_if_whole(self.query_pre_attn_scalar or self.head_dim),
          "final_logit_softcapping": None,
          "attn_logit_softcapping": None,
          "sliding_window": self.sliding_window,
          "layer_types": list(self.layer_types or ("full_attention",) * self.num_layers),
          "rope_local_base_freq": local_theta,
          "rope_parameters": {"full_attention": full,
                              "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
      })
    return out

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _int_if_whole(x):
  """transformers' strict configs want ints where the field is an int (e.g. 256, not 256.0)."""
  return int(x) if float(x).is_integer() else x


def embedding_scale(config: ModelConfig) -> Optional[float]:
  """sqrt(hidden_size) when the embeddings are scaled (Gemma), else None."""
  return math.sqrt(config.hidden_size) if config.scale_embeddings else None
