"""Prompt data for RL: records, readers, the arithmetic task, batching, checkpointable iteration.

Modules (import them explicitly):
  `prompts`    PromptRecord, load_prompts (jsonl / parquet with veRL columns / shipped math sets).
  `arithmetic` the synthetic 1–2 digit +, −, × task with disjoint train / held-out eval splits.
  `batching`   chat template -> ids -> left-padded, length-bucketed PromptBatch.
  `iterator`   PromptIterator: seeded epoch shuffling, get_state()/set_state() as JSON ints.

The most used names are re-exported here.
"""
from jaxrl_dense.data.prompts import (BOXED_INSTRUCTION, SHIPPED_DATASETS, PromptDataError,
                                      PromptRecord, load_prompts)
from jaxrl_dense.data.arithmetic import ArithmeticTask, make_splits
from jaxrl_dense.data.batching import PromptBatch, PromptEncoder, bucket_length, encode_batch
from jaxrl_dense.data.iterator import PromptIterator

__all__ = [
    "BOXED_INSTRUCTION", "SHIPPED_DATASETS", "PromptDataError", "PromptRecord", "load_prompts",
    "ArithmeticTask", "make_splits", "PromptBatch", "PromptEncoder", "bucket_length",
    "encode_batch", "PromptIterator",
]
