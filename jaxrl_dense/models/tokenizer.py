"""Tokenizers for jaxrl_dense models: transformers `PreTrainedTokenizerFast`, never torch.

Two sources:

* a Hugging Face directory with `tokenizer.json` (+ `tokenizer_config.json`,
  `special_tokens_map.json`): `tokenizer_from_hf_dir`;
* GGUF metadata (`tokenizer.ggml.model == "gpt2"`, byte-level BPE): `tokenizer_from_gguf_metadata`
  rebuilds the tokenizer with the `tokenizers` library from `tokenizer.ggml.tokens`, `.merges`,
  `.token_type` (3 = control -> special added token, 4 = user-defined -> plain added token),
  `.bos/eos/padding/unknown_token_id`, `.pre` (the pre-tokenizer split regex) and
  `tokenizer.chat_template`. It gives the same ids as transformers'
  `AutoTokenizer.from_pretrained(dir, gguf_file=...)` (tested on SmolLM2, pre-tokenizer "smollm").

`check_vocab_fits` guards against a tokenizer that can emit ids outside the embedding.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

# llama.cpp `tokenizer.ggml.pre` -> the split regex its merges were learned with. Names not listed
# (e.g. "default", "gpt2", "smollm") use the GPT-2 byte-level regex, as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}
_GPT2_DEFAULT_PRE = ("default", "gpt2", "smollm", "gpt-2", None)

_CONTROL, _USER_DEFINED = 3, 4
_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode character map (byte-level BPE alphabet)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
      range(ord("\xae"), ord("\xff") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def has_tokenizer_files(directory: PathLike) -> bool:
  directory = pathlib.Path(directory)
  return any((directory / f).is_file() for f in TOKENIZER_FILES)


def tokenizer_from_hf_dir(directory: PathLike):
  """Loads the tokenizer saved in an HF model directory (local files only, no download).

  Raises:
    FileNotFoundError: the directory has none of the tokenizer files.
  """
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(directory)
  if not has_tokenizer_files(directory):
    raise FileNotFoundError(f"{str(directory)!r} has no tokenizer files (looked for {TOKENIZER_FILES}).")
  try:
    # A generic tokenizer (one we saved from GGUF metadata, say) must come back exactly as saved:
    # AutoTokenizer would re-interpret it by config.json's model_type (e.g. Qwen2Tokenizer adds an
    # `<|endoftext|>` unk token). Model-specific classes go through AutoTokenizer.
    cls = AutoTokenizer
    config_file = directory / "tokenizer_config.json"
    if (directory / "tokenizer.json").is_file() and config_file.is_file():
      if json.loads(config_file.read_text()).get("tokenizer_class") in _GENERIC_CLASSES:
        from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
        cls = PreTrainedTokenizerFast
    return cls.from_pretrained(str(directory), local_files_only=True)
  except Exception as e:  # transformers raises many types for broken tokenizer files
    raise ValueError(f"{directory}: cannot load its tokenizer ({type(e).__name__}: {e}).") from e


def _gguf_token(metadata: dict, key: str) -> Optional[str]:
  token_id = metadata.get(f"tokenizer.ggml.{key}")
  tokens = metadata["tokenizer.ggml.tokens"]
  if token_id is None:
    return None
  if not 0 <= int(token_id) < len(tokens):
    raise ValueError(f"tokenizer.ggml.{key}={token_id} is outside the vocabulary of {len(tokens)}.")
  return tokens[int(token_id)]


def backend_tokenizer_from_gguf_metadata(metadata: dict, *, source: str = "GGUF file"):
  """A `tokenizers.Tokenizer` (byte-level BPE) from GGUF `tokenizer.*` metadata."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers.models import BPE  # pylint: disable=import-outside-toplevel

  model = metadata.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"{source}: tokenizer.ggml.model={model!r} is not supported; jaxrl_dense "
                     "builds byte-level BPE ('gpt2') tokenizers from GGUF metadata.")
  for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
    if k not in metadata:
      raise ValueError(f"{source}: GGUF metadata lacks {k!r}, needed to build the tokenizer.")
  tokens = list(metadata["tokenizer.ggml.tokens"])
  token_types = list(metadata.get("tokenizer.ggml.token_type") or [])
  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab = {}
  for i, tok in enumerate(tokens):
    # Byte-level vocabularies spell tokens in the byte alphabet; respell any that are not.
    key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
    vocab[key] = i
  merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
  tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                      end_of_word_suffix="", fuse_unk=False))
  pre = metadata.get("tokenizer.ggml.pre")
  if pre in _PRE_TOKENIZER_SPLITS:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  elif pre in _GPT2_DEFAULT_PRE:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    raise ValueError(f"{source}: unknown GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; known: "
                     f"{sorted(set(_PRE_TOKENIZER_SPLITS) | {p for p in _GPT2_DEFAULT_PRE if p})}.")
  tok.decoder = decoders.ByteLevel()
  # Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
  # tokens, so they are matched whole. A control token outside the byte alphabet is a llama.cpp
  # mislabel and is skipped, as transformers does.
  special = [AddedToken(t, normalized=False, special=True)
             for t, ty in zip(tokens, token_types) if ty == _CONTROL and set(t) <= alphabet]
  if special:
    tok.add_special_tokens(special)
  user = [AddedToken(t, normalized=False, special=False)
          for t, ty in zip(tokens, token_types) if ty == _USER_DEFINED and t in vocab]
  if user:
    tok.add_tokens(user)
  return tok


def tokenizer_from_gguf_metadata(metadata: dict, *, source: str = "GGUF file"):
  """A transformers `PreTrainedTokenizerFast` from GGUF metadata, without torch.

  Special tokens: bos/eos/pad/unk from `tokenizer.ggml.{bos,eos,padding,unknown}_token_id`;
  `add_bos_token` / `add_eos_token` from the metadata flags (llama.cpp defaults: off for gpt2
  vocabularies); `chat_template` from `tokenizer.chat_template`.
  """
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  backend = backend_tokenizer_from_gguf_metadata(metadata, source=source)
  kwargs = {}
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
    token = _gguf_token(metadata, key)
    if token is not None:
      kwargs[name] = token
  template = metadata.get("tokenizer.chat_template")
  if template:
    kwargs["chat_template"] = template
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                      **kwargs)
  add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
  add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
  if add_bos or add_eos:
    _add_bos_eos_post_processor(tokenizer, add_bos, add_eos)
  return tokenizer


def _add_bos_eos_post_processor(tokenizer, add_bos: bool, add_eos: bool) -> None:
  from tokenizers import processors  # pylint: disable=import-outside-toplevel
  bos, eos = tokenizer.bos_token, tokenizer.eos_token
  single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
  pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
  special = []
  if add_bos:
    special.append((bos, tokenizer.bos_token_id))
  if add_eos and eos != bos:
    special.append((eos, tokenizer.eos_token_id))
  tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
      single=single, pair=pair, special_tokens=special)


def check_vocab_fits(tokenizer, vocab_size: int, *, source: str = "model") -> None:
  """Raises ValueError when the tokenizer can produce ids >= the embedding's `vocab_size`.

  Embeddings may be larger than the tokenizer (Qwen2.5 pads to 151936); never smaller.
  """
  if tokenizer is None:
    return
  n = len(tokenizer)
  max_id = max(tokenizer.get_vocab().values(), default=-1)
  if max(n, max_id + 1) > vocab_size:
    raise ValueError(
        f"{source}: the tokenizer has {n} tokens (largest id {max_id}) but the model's embedding "
        f"has only vocab_size={vocab_size} rows; tokenizer and checkpoint do not match.")


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CHAR_SPECIALS = ("<pad>", "<|im_start|>", "<|im_end|>", "<unk>")


def char_chat_tokenizer():
  """A character-level ChatML tokenizer: 4 specials (ids 0-3) + printable ASCII, ~104 ids.

  Built in milliseconds from no files (a `tokenizers` WordLevel model over single characters,
  wrapped in a transformers `PreTrainedTokenizerFast`, the interface `load_pretrained` returns).
  For tiny random-initialised models (smoke runs, tests), where reading a real 49k-token
  vocabulary would dominate the run. pad = `<pad>` (0), bos = `<|im_start|>` (1), eos = `<|im_end|>` (2).
  """
  import string  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  vocab = {t: i for i, t in enumerate(CHAR_SPECIALS)}
  for c in sorted(set(string.printable)):
    vocab.setdefault(c, len(vocab))
  tok = Tokenizer(tk_models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(CHAR_SPECIALS))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                 bos_token="<|im_start|>", unk_token="<unk>")
  fast.chat_template = CHATML_TEMPLATE
  return fast
