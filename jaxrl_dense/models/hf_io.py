"""Read and write Hugging Face model directories (config.json + safetensors), without torch.

A Hugging Face checkpoint directory holds `config.json` and either one `model.safetensors`
or shards `model-00001-of-0000N.safetensors` listed in `model.safetensors.index.json`
(`{"metadata": {"total_size": ...}, "weight_map": {tensor name: shard file}}`).

The safetensors format is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` and the raw
little-endian bytes. We read it with `np.memmap` (zero copy until the caller converts) and write it
ourselves, so bfloat16 (`ml_dtypes.bfloat16`) and float8 work on every numpy/safetensors version.

State dicts are `dict[str, np.ndarray]` keyed by HF tensor names in PyTorch (out, in) layout.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any, Mapping, Optional, Union

import ml_dtypes
import numpy as np

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default "5GB"

_ST_TO_NP = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}


# ---------------------------------------------------------------------------------------------
# safetensors files


def read_safetensors(path: PathLike, *, mmap: bool = True) -> dict[str, np.ndarray]:
  """Reads one `.safetensors` file into `{name: np.ndarray}`.

  Args:
    path: the file.
    mmap: map the file read-only instead of reading it; arrays are read-only views.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a corrupt header or an unsupported dtype (the message names the file).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"safetensors file {str(path)!r} does not exist.")
  file_size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes).")
    (n,) = struct.unpack("<Q", head)
    if n > file_size - 8:
      raise ValueError(f"{path}: not a safetensors file (header length {n} exceeds the file size).")
    try:
      header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e}).") from None
  header.pop("__metadata__", None)
  data_start = 8 + n
  if mmap and file_size > data_start:
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)
  else:
    buf = np.fromfile(path, dtype=np.uint8, offset=data_start)
  out = {}
  for name, info in header.items():
    st_dtype = info["dtype"]
    if st_dtype not in _ST_TO_NP:
      raise ValueError(f"{path}: tensor {name!r} has unsupported safetensors dtype {st_dtype!r}.")
    dtype = _ST_TO_NP[st_dtype]
    begin, end = info["data_offsets"]
    shape = tuple(int(s) for s in info["shape"])
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end > buf.size:
      raise ValueError(f"{path}: tensor {name!r} offsets {begin}..{end} do not fit shape {shape} "
                       f"of {st_dtype} in a data section of {buf.size} bytes.")
    arr = np.asarray(buf[begin:end]).view(dtype).reshape(shape)
    out[name] = arr.astype(arr.dtype.newbyteorder("=")) if dtype.byteorder == ">" else arr
  return out


def write_safetensors(path: PathLike, tensors: Mapping[str, Any],
                      metadata: Optional[Mapping[str, str]] = None) -> int:
  """Writes `{name: array}` as one `.safetensors` file; returns the bytes of tensor data.

  `metadata` defaults to `{"format": "pt"}`, which transformers requires to load the file.
  Arrays may be numpy, jax or `ml_dtypes` (bfloat16, float8) arrays.
  """
  metadata = {"format": "pt"} if metadata is None else dict(metadata)
  arrays = {}
  for name, value in tensors.items():
    arr = np.ascontiguousarray(np.asarray(value))
    if arr.dtype not in _NP_TO_ST:
      raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors.")
    if arr.dtype.byteorder == ">":
      arr = arr.astype(arr.dtype.newbyteorder("<"))
    arrays[name] = arr
  header: dict[str, Any] = {"__metadata__": metadata}
  offset = 0
  for name in sorted(arrays):
    arr = arrays[name]
    header[name] = {"dtype": _NP_TO_ST[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
  tmp = pathlib.Path(str(path) + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in sorted(arrays):
      f.write(memoryview(arrays[name].reshape(-1).view(np.uint8)))
  os.replace(tmp, path)
  return offset


# ---------------------------------------------------------------------------------------------
# HF model directories


def read_hf_config(directory: PathLike) -> dict:
  """Reads `config.json` of an HF model directory (clear errors for a missing or bad file)."""
  directory = pathlib.Path(directory)
  cfg = directory / CONFIG_NAME
  if not directory.exists():
    raise FileNotFoundError(f"model path {str(directory)!r} does not exist.")
  if not cfg.is_file():
    raise FileNotFoundError(
        f"{str(directory)!r} is not a Hugging Face model directory: it has no {CONFIG_NAME}.")
  try:
    return json.loads(cfg.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg}: invalid JSON ({e}).") from None


def read_hf_state_dict(directory: PathLike, *, mmap: bool = True) -> dict[str, np.ndarray]:
  """Reads the weights of an HF directory: `model.safetensors` or the sharded index."""
  directory = pathlib.Path(directory)
  index = directory / SAFE_WEIGHTS_INDEX_NAME
  single = directory / SAFE_WEIGHTS_NAME
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"{index}: not a valid safetensors index ({e!r}).") from None
    state_dict: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = directory / shard
      if not shard_path.is_file():
        raise FileNotFoundError(f"{index} lists shard {shard!r}, which is missing from {directory}.")
      tensors = read_safetensors(shard_path, mmap=mmap)
      state_dict.update({k: v for k, v in tensors.items() if weight_map.get(k) == shard})
    missing = sorted(set(weight_map) - set(state_dict))
    if missing:
      raise ValueError(f"{index} maps {len(missing)} tensor(s) to shards that lack them, "
                       f"e.g. {missing[:3]}.")
    return state_dict
  if single.is_file():
    return read_safetensors(single, mmap=mmap)
  others = sorted(p.name for p in directory.glob("*.safetensors"))
  if others:  # a single file with a non-standard name (e.g. written by another tool)
    state_dict = {}
    for name in others:
      state_dict.update(read_safetensors(directory / name, mmap=mmap))
    return state_dict
  torch_files = sorted(p.name for p in directory.glob("*.bin")) + sorted(
      p.name for p in directory.glob("*.pt"))
  hint = (f" It has PyTorch pickles {torch_files[:3]}; convert them to safetensors "
          f"(transformers: model.save_pretrained(dir, safe_serialization=True)).") if torch_files else ""
  raise FileNotFoundError(
      f"{str(directory)!r} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}.{hint}")


def read_hf_dir(directory: PathLike, *, mmap: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads an HF model directory -> `(config.json dict, state dict of numpy arrays)`.

  Arrays keep the stored dtype (float32, float16, `ml_dtypes.bfloat16`, ...); with `mmap`
  they are read-only views of the mapped files.
  """
  return read_hf_config(directory), read_hf_state_dict(directory, mmap=mmap)


def _shard(state_dict: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
  """Greedy split in name order; a tensor larger than the limit gets a shard of its own."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(state_dict):
    arr = state_dict[name]
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  return shards


def write_hf_dir(directory: PathLike, hf_config: Mapping[str, Any],
                 state_dict: Mapping[str, Any], *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes `config.json` and the weights as transformers does; returns the weight files written.

  Up to `max_shard_bytes` of tensor data go into `model.safetensors`; more is split into
  `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`. Stale weight files
  of an earlier save in the same directory are removed so the two layouts never mix.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
  for stale in list(directory.glob("model*.safetensors")) + [directory / SAFE_WEIGHTS_INDEX_NAME]:
    if stale.is_file():
      stale.unlink()
  (directory / CONFIG_NAME).write_text(json.dumps(dict(hf_config), indent=2, sort_keys=True) + "\n")
  shards = _shard(arrays, max_shard_bytes)
  if len(shards) == 1:
    write_safetensors(directory / SAFE_WEIGHTS_NAME, shards[0])
    return [SAFE_WEIGHTS_NAME]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  total = 0
  for name, shard in zip(names, shards):
    total += write_safetensors(directory / name, shard)
    weight_map.update({k: name for k in shard})
  index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
  (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
  return names
