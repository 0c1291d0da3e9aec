"""Read GGUF checkpoints (llama.cpp) as an HF config dict + HF-named float32 state dict.

A GGUF file holds key/value metadata (architecture hyperparameters under `{arch}.*`, the
tokenizer under `tokenizer.*`) and tensors under llama.cpp names (`token_embd.weight`,
`blk.{i}.attn_q.weight`, ..., `output_norm.weight`, `output.weight`), possibly quantized
(Q4_1, Q8_0, ...). We read it with the `gguf` package, dequantize every tensor with
`gguf.quants.dequantize` to float32 in PyTorch (out, in) layout, rename it to the HF name and
undo llama.cpp's rotary permutation of the q and k projections, exactly as transformers' GGUF
loader does, so `convert.params_from_hf_state_dict` consumes the result like any HF checkpoint.

llama.cpp's `convert_hf_to_gguf.py` (LlamaModel.permute) reorders the rows of q/k from HF's
"rotate half" layout to interleaved pairs:

  W_gguf = W_hf.reshape(n, 2, r/(2n), ...).swapaxes(1, 2).reshape(W_hf.shape)   (r rows, n heads)

and `unpermute_qk` inverts it: `W_hf = W_gguf.reshape(n, r/(2n), 2, ...).swapaxes(1, 2)`,
with n = num_heads for q and n = num_kv_heads for k. Qwen2 and Qwen3 files are not permuted.

Qwen3 files add the per-head q/k norms `blk.{i}.attn_q_norm.weight` / `attn_k_norm.weight`
([head_dim], `qwen3.attention.key_length` gives head_dim, which may differ from
hidden / heads). Gemma 3 GGUF files are not read: llama.cpp stores its norms as `1 + w` and
hard-codes the sliding pattern, local RoPE base and (for 27B) the attention scale, which the
file does not record; load the Hugging Face checkpoint instead.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Any, NamedTuple, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_HF_ARCHITECTURE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM"}
_PERMUTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class GGUFCheckpoint(NamedTuple):
  """What `read_gguf` returns.

  Attributes:
    hf_config: a transformers-style `config.json` dict (feeds `ModelConfig.from_hf_dict`).
    state_dict: HF tensor name -> float32 numpy array in (out, in) layout, q/k un-permuted.
    metadata: every GGUF key/value (strings, numbers, lists), including `tokenizer.*`.
  """
  hf_config: dict
  state_dict: dict
  metadata: dict


def _require_gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Reading GGUF files needs the `gguf` package: pip install gguf") from e
  return gguf


def _open(path: PathLike):
  gguf = _require_gguf()
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist.")
  try:
    return gguf.GGUFReader(str(path), "r")
  except Exception as e:  # the reader raises ValueError/struct.error/... on bad files
    raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}).") from e


def _field_value(field) -> Any:
  gguf = _require_gguf()
  main = field.types[0] if field.types else None
  if main == gguf.GGUFValueType.ARRAY:
    return list(field.contents())
  value = field.contents()
  return value.item() if isinstance(value, np.generic) else value


def read_gguf_metadata(path_or_reader) -> dict:
  """All key/value metadata of a GGUF file as plain Python values (arrays become lists)."""
  reader = path_or_reader if hasattr(path_or_reader, "fields") else _open(path_or_reader)
  return {key: _field_value(field) for key, field in reader.fields.items()
          if not key.startswith("GGUF.")}


def vocab_size(path: PathLike) -> int:
  """Rows of the token embedding (`token_embd.weight`) of a GGUF file, read from its header only."""
  reader = _open(path)
  for t in reader.tensors:
    if t.name == "token_embd.weight":
      return int(t.shape[-1])  # GGUF lists dimensions fastest-first: [hidden, vocab]
  raise ValueError(f"{path}: no token_embd.weight tensor")


def gguf_to_hf_name(name: str) -> Optional[str]:
  """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  m = _BLOCK_RE.match(name)
  if m and m.group(2) in _BLOCK_NAMES:
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
  return None


def hf_to_gguf_name(name: str) -> Optional[str]:
  """Inverse of `gguf_to_hf_name`."""
  for g, h in _GLOBAL_NAMES.items():
    if name == h:
      return g
  m = _HF_BLOCK_RE.match(name)
  if m:
    for g, h in _BLOCK_NAMES.items():
      if m.group(2) == h:
        return f"blk.{m.group(1)}.{g}.{m.group(3)}"
  return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's rotary row permutation of a q or k weight `[r, in]` or bias `[r]`.

  `W_hf = W.reshape(n_head, r / n_head / 2, 2, ...).swapaxes(1, 2).reshape(r, ...)`.
  """
  rows = w.shape[0]
  if rows % (2 * n_head):
    raise ValueError(f"cannot un-permute a q/k tensor of {rows} rows over {n_head} heads "
                     f"(rows must be a multiple of 2 * heads).")
  return np.ascontiguousarray(
      w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation (`convert_hf_to_gguf.py` LlamaModel.permute); inverse of `unpermute_qk`."""
  rows = w.shape[0]
  if rows % (2 * n_head):
    raise ValueError(f"cannot permute a q/k tensor of {rows} rows over {n_head} heads.")
  return np.ascontiguousarray(
      w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def hf_config_from_gguf_metadata(metadata: dict, tensor_shapes: dict[str, tuple],
                                 *, source: str = "GGUF file") -> dict:
  """Builds a transformers `config.json` dict from GGUF metadata (`{arch}.*` keys).

  Args:
    metadata: `read_gguf_metadata(...)`.
    tensor_shapes: GGUF tensor name -> (out, in) shape; decides tied embeddings (no
      `output.weight`), q/k/v bias (`blk.0.attn_q.bias`) and the vocabulary size (embedding rows).
    source: file name for error messages.
  """
  arch = metadata.get("general.architecture")
  if arch not in SUPPORTED_GGUF_ARCHITECTURES:
    raise ValueError(f"{source}: unsupported GGUF architecture {arch!r}; jaxrl_dense reads "
                     f"{SUPPORTED_GGUF_ARCHITECTURES} GGUF files.")

  def key(name: str, default: Any = KeyError) -> Any:
    full = f"{arch}.{name}"
    if full in metadata:
      return metadata[full]
    if default is KeyError:
      raise ValueError(f"{source}: GGUF metadata lacks the required key {full!r}.")
    return default

  if "rope_freqs.weight" in tensor_shapes:
    raise ValueError(f"{source}: carries a `rope_freqs` tensor (Llama 3.1-style rope scaling), "
                     "which the GGUF reader does not support; load the Hugging Face checkpoint.")
  if "token_embd.weight" not in tensor_shapes:
    raise ValueError(f"{source}: has no `token_embd.weight` tensor.")
  hidden = int(key("embedding_length"))
  num_heads = int(key("attention.head_count"))
  head_dim = key("attention.key_length", None)
  if head_dim is None and arch in ("llama", "qwen3"):
    head_dim = key("rope.dimension_count", None)
  hf: dict[str, Any] = {
      "architectures": [_HF_ARCHITECTURE[arch]],
      "model_type": arch,
      "vocab_size": int(tensor_shapes["token_embd.weight"][0]),
      "hidden_size": hidden,
      "intermediate_size": int(key("feed_forward_length")),
      "num_hidden_layers": int(key("block_count")),
      "num_attention_heads": num_heads,
      "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
      "head_dim": int(head_dim) if head_dim else hidden // num_heads,
      "rope_theta": float(key("rope.freq_base", 10000.0)),
      "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
      "max_position_embeddings": int(key("context_length", 8192)),
      "tie_word_embeddings": "output.weight" not in tensor_shapes,
      "attention_bias": "blk.0.attn_q.bias" in tensor_shapes,
      "mlp_bias": "blk.0.ffn_gate.bias" in tensor_shapes,
      "hidden_act": "silu",
      "torch_dtype": "float32",
      "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
  }
  scaling = key("rope.scaling.type", None)
  if scaling not in (None, "none"):
    if scaling != "linear":
      raise ValueError(f"{source}: rope scaling type {scaling!r} is not supported from GGUF "
                       "(only 'linear'); load the Hugging Face checkpoint.")
    hf["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
  return hf


def _supported_qtypes():
  gguf = _require_gguf()
  traits = getattr(gguf.quants, "_type_traits", None)
  base = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
  return None if traits is None else base | set(traits)


def _dequantize(tensor, source: str) -> np.ndarray:
  gguf = _require_gguf()
  qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
  supported = _supported_qtypes()
  if supported is not None and qtype not in supported:
    names = sorted(t.name for t in supported)
    raise ValueError(f"{source}: tensor {tensor.name!r} uses quantization type {qtype.name}, "
                     f"which gguf {getattr(gguf, '__version__', '')} cannot dequantize; "
                     f"supported types: {names}.")
  try:
    w = gguf.quants.dequantize(tensor.data, qtype)
  except NotImplementedError as e:
    raise ValueError(f"{source}: tensor {tensor.name!r} uses quantization type {qtype.name}, "
                     f"which cannot be dequantized ({e}).") from None
  expected = tuple(int(s) for s in reversed(tensor.shape))  # GGUF stores ne0 (= in) first
  w = np.asarray(w, dtype=np.float32)
  if w.size != int(np.prod(expected)):
    raise ValueError(f"{source}: tensor {tensor.name!r} dequantized to {w.shape}, "
                     f"expected {expected}.")
  return w.reshape(expected)


def read_gguf(path: PathLike) -> GGUFCheckpoint:
  """Reads a llama/qwen2/qwen3 GGUF file -> (HF config dict, HF float32 state dict, metadata).

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: not a GGUF file, an unsupported architecture, an unknown tensor name or a
      quantization type the `gguf` package cannot dequantize (each names the file and tensor).
  """
  path = pathlib.Path(path)
  reader = _open(path)
  source = str(path)
  metadata = read_gguf_metadata(reader)
  shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}
  hf_config = hf_config_from_gguf_metadata(metadata, shapes, source=source)
  n_head = hf_config["num_attention_heads"]
  n_kv = hf_config["num_key_value_heads"]
  permuted = hf_config["model_type"] in _PERMUTED_ARCHITECTURES

  # Check every name and type before the slow dequantization.
  supported = _supported_qtypes()
  supported_ids = None if supported is None else {int(q) for q in supported}
  for t in reader.tensors:
    if gguf_to_hf_name(t.name) is None:
      raise ValueError(f"{source}: unexpected tensor {t.name!r} for a "
                       f"{hf_config['model_type']} model.")
    if supported_ids is not None and int(t.tensor_type) not in supported_ids:
      _dequantize(t, source)  # raises the error naming the tensor and its type

  state_dict: dict[str, np.ndarray] = {}
  for t in reader.tensors:
    w = _dequantize(t, source)
    if permuted and (".attn_q." in t.name or ".attn_k." in t.name):
      w = unpermute_qk(w, n_head if ".attn_q." in t.name else n_kv)
    state_dict[gguf_to_hf_name(t.name)] = w
  return GGUFCheckpoint(hf_config, state_dict, metadata)
