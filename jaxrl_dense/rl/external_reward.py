"""External process rewards for a rollout batch (--process_reward).

`make_process_scorer(cfg, tokenizer)` returns the host-side stage that runs between sampling and
the jitted update when a served step-scoring PRM is configured:

    text, char spans of the sampled tokens   rewards.token_offsets_from_ids (the sampled ids)
    steps                                    rewards.segment(text, --step_split)
    step scores                              rewards.service.RewardServiceClient (one request
                                             per batch_size rows, timeout, retries)
    credit                                   rewards.credit_step_rewards(--step_credit)
    token rewards [B, R]                     rewards.placement_weights(--step_placement) · scores

The result goes into `RolloutBatch.process_rewards`; `rl.prime.make_advantage_fn` runs PRIME's
RLOO over it (process term) plus the outcome RLOO. The PRM's tokenizer never meets the policy's:
the service receives text and character spans.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from jaxrl_dense.rewards import service as service_lib
from jaxrl_dense.rewards import step_rewards as sr
from jaxrl_dense.rl import config as config_lib

ProcessScorer = Callable[[Sequence, np.ndarray, np.ndarray], Tuple[np.ndarray, dict]]


def _prompt_text(record) -> str:
  """The question a served PRM scores the response against: the last user message."""
  users = [m["content"] for m in record.prompt_messages if m.get("role") == "user"]
  return users[-1] if users else record.prompt_messages[-1]["content"]


def make_process_scorer(cfg: config_lib.PrimeConfig, tokenizer,
                        client: Optional[service_lib.RewardServiceClient] = None) -> Optional[ProcessScorer]:
  """`scorer(records [B], response_tokens [B, R], response_mask [B, R]) -> (token rewards
  float32 [B, R], stats)` for --process_reward, or None when it is unset. `records[b]` is row
  b's prompt record. `client`: anything with `score(prompts, responses, steps)` and a `failures`
  counter (default: the HTTP client, or `rewards.local_prm.LocalPRM` for prm:DIR)."""
  if not cfg.process_reward:
    return None
  if client is None and cfg.process_reward.startswith("prm:"):  # a PRM in this process
    from jaxrl_dense.models import prm_head  # pylint: disable=import-outside-toplevel
    from jaxrl_dense.rewards.local_prm import LocalPRM  # pylint: disable=import-outside-toplevel
    from jaxrl_dense.rl.load import resolve_path  # pylint: disable=import-outside-toplevel
    path = resolve_path(cfg.process_reward[4:])
    client = LocalPRM(prm_head.load_discriminative_prm(path), separator=cfg.prm_step_separator or None)
  client = client or service_lib.RewardServiceClient(
      cfg.process_reward, timeout_s=cfg.reward_timeout_s, max_retries=cfg.reward_retries,
      on_error=cfg.reward_on_error)

  def scorer(records, response_tokens, response_mask):
    tokens = np.asarray(response_tokens)
    lengths = (np.asarray(response_mask) > 0).sum(axis=1)
    b, r = tokens.shape
    texts, offsets, spans = [], [], []
    for i in range(b):
      text, offs = sr.token_offsets_from_ids(tokenizer, tokens[i, :lengths[i]])
      texts.append(text)
      offsets.append(offs)
      spans.append(sr.segment(text, cfg.step_split))
    before = sum(client.failures.values())
    scores = client.score([_prompt_text(x) for x in records], texts, spans)
    s_max = max(1, max(len(s) for s in spans))
    sc = np.zeros((b, s_max), np.float32)
    sm = np.zeros((b, s_max), np.float32)
    for i, s in enumerate(scores):
      sc[i, :len(s)] = s
      sm[i, :len(s)] = 1.0
    credited = np.asarray(sr.credit_step_rewards(sc, sm, mode=cfg.step_credit,
                                                 temperature=cfg.step_credit_temperature))
    w = sr.placement_weights(offsets, spans, mode=cfg.step_placement, num_cols=r, num_steps=s_max,
                             text_lengths=[len(t) for t in texts])
    token_rewards = np.einsum("bts,bs->bt", w, credited).astype(np.float32)
    n_steps = sm.sum(axis=1)
    stats = {"reward/steps_mean": float(n_steps.mean()),
             "reward/step_score_mean": float((sc * sm).sum() / max(sm.sum(), 1.0)),
             "reward/service_failures": float(sum(client.failures.values()) - before)}
    return token_rewards, stats

  return scorer
