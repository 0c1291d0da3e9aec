"""Model configuration shared by every decoder-only LM in jaxrl_dense.

One frozen dataclass covers the Llama family (SmolLM2, Llama 3) and the Qwen2 family
(Qwen2.5, Qwen2.5-Math). It is hashable, so it can be a static argument of `jax.jit`.
`from_hf_dict` reads a Hugging Face `config.json` written by transformers 4 or 5;
`to_hf_dict` writes one that transformers loads back.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyperparameters of a Llama/Qwen2-style decoder.

  Attributes:
    model_type: "llama" or "qwen2".
    vocab_size: rows of the embedding / LM head.
    hidden_size: model width d.
    intermediate_size: SwiGLU hidden width.
    num_layers: decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when < num_heads).
    head_dim: per-head width (defaults to hidden_size // num_heads).
    rope_theta: RoPE base frequency.
    rope_scaling: HF `rope_scaling` dict (e.g. Llama 3.1 "llama3"), or None; stored as a
      sorted tuple of items so the config stays hashable.
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: LM head shares the embedding matrix.
    attention_bias: q/k/v projections carry a bias (Qwen2: True).
    max_position_embeddings: longest supported sequence.
    bos_token_id / eos_token_ids / pad_token_id: special ids from the checkpoint.
    param_dtype: storage dtype of parameters ("float32" or "bfloat16").
    dtype: compute dtype of activations and matmuls ("float32" or "bfloat16").
    remat: rematerialise each decoder layer in the backward pass (`jax.checkpoint`); not
      part of the HF config.
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
  max_position_embeddings: int = 8192
  bos_token_id: Optional[int] = None
  eos_token_ids: tuple = ()
  pad_token_id: Optional[int] = None
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
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

  @property
  def rope_scaling_dict(self) -> Optional[dict]:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
    """Builds a config from a transformers `config.json` dict (transformers 4 or 5 layout)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      archs = hf.get("architectures")
      raise ValueError(
          f"{source}: unsupported architecture model_type={model_type!r} (architectures={archs}); "
          f"jaxrl_dense supports {SUPPORTED_MODEL_TYPES}.")
    # Features that change the math without adding tensors: refuse rather than compute wrong logits.
    if hf.get("use_sliding_window"):
      raise ValueError(f"{source}: use_sliding_window=true (sliding-window attention) is not supported.")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{source}: hidden_act={hf.get('hidden_act')!r} is not supported (only 'silu').")
    try:
      hidden = int(hf["hidden_size"])
      num_heads = int(hf["num_attention_heads"])
      # transformers 5 moves rope theta into rope_parameters and leaves rope_theta null.
      rope_params = hf.get("rope_parameters") or {}
      rope_theta = hf.get("rope_theta") or rope_params.get("rope_theta") or 10000.0
      rope_scaling = hf.get("rope_scaling")
      if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
      if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
        rope_scaling = None
      eos = hf.get("eos_token_id")
      eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
      kwargs = dict(
          model_type=model_type,
          vocab_size=int(hf["vocab_size"]),
          hidden_size=hidden,
          intermediate_size=int(hf["intermediate_size"]),
          num_layers=int(hf["num_hidden_layers"]),
          num_heads=num_heads,
          num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
          head_dim=int(hf.get("head_dim") or hidden // num_heads),
          rope_theta=float(rope_theta),
          rope_scaling=None if rope_scaling is None else tuple(sorted(
              (k, tuple(v) if isinstance(v, list) else v) for k, v in rope_scaling.items())),
          rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
          tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
          attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
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
    """A transformers-loadable config.json dict."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
    out = {
        "architectures": [arch],
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
        "hidden_act": "silu",
        "torch_dtype": self.param_dtype,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) != 1
                         else self.eos_token_ids[0]) if self.eos_token_ids else None,
        "pad_token_id": self.pad_token_id,
    }
    if self.model_type == "llama":
      out["attention_bias"] = self.attention_bias
      out["mlp_bias"] = False
    return out

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)
