"""A discriminative PRM scoring (prompt, response, step spans) in this process.

`LocalPRM(prm).score(prompts, responses, steps)` has the signature of
`service.RewardServiceClient.score`, so the trainer uses a local PRM (``--process_reward=prm:DIR``)
and a served one (``--process_reward=http://...``) alike, and ``service.serve(LocalPRM(prm).score)``
is the reference server for any ``prm:DIR`` model (``experiments/serve_prm.py``).

The PRM reads ``prompt + "\\n\\n" + response`` in its own tokenizer (through its chat template
when it has one: user = prompt, assistant = response). Without a separator each step's score is
read at the PRM token that holds the step's last character; with ``separator`` (Qwen2.5-Math-PRM:
``"<extra_0>"``) the response is rewritten as ``step_1 + sep + step_2 + sep + ...`` (the text
between steps is dropped, as that model was trained) and scores are read at the separators.
Rows are padded to multiples of ``bucket`` tokens (and steps to multiples of 8), so the jitted
pass compiles once per bucket. Step reward = ``p(1) − p(0)`` of the head
(`models.prm_head.prm_step_rewards`).
"""
from __future__ import annotations

import collections
from typing import List, Optional, Sequence, Tuple

import numpy as np

Span = Tuple[int, int]


class LocalPRM:
  """See the module docstring. ``prm``: `models.prm_head.DiscriminativePRM` with its tokenizer."""

  def __init__(self, prm, *, separator: Optional[str] = None, bucket: int = 64, batch_size: int = 16):
    if prm.tokenizer is None:
      raise ValueError("LocalPRM: the PRM has no tokenizer (load it with require_tokenizer=True)")
    if separator is not None and prm.tokenizer.convert_tokens_to_ids(separator) in (None, prm.tokenizer.unk_token_id):
      raise ValueError(f"LocalPRM: the separator {separator!r} is not a token of the PRM's tokenizer")
    self.prm, self.separator, self.bucket, self.batch_size = prm, separator, int(bucket), int(batch_size)
    self.failures = collections.Counter()  # the client's interface: a local PRM does not fail softly
    self.requests = 0

  def _row(self, prompt: str, response: str, spans: Sequence[Span]):
    """(token ids, positions of the step-score tokens) of one row."""
    tok = self.prm.tokenizer
    if self.separator:
      resp = "".join(response[a:b] + self.separator for a, b in spans)
      ends, pos = [], 0
      for a, b in spans:
        pos += b - a + len(self.separator)
        ends.append(pos - 1)  # the separator's last character
    else:
      resp, ends = response, [b - 1 for _, b in spans]
    if getattr(tok, "chat_template", None):
      full = tok.apply_chat_template([{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": resp}], tokenize=False)
      start = full.rfind(resp) if resp else len(full)
      if start < 0:
        raise ValueError("LocalPRM: the chat template changed the response text")
    else:
      full = prompt + "\n\n" + resp
      start = len(prompt) + 2
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    offs = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    positions = []
    for c in ends:
      hit = np.nonzero((offs[:, 0] <= start + c) & (offs[:, 1] > start + c))[0]
      if not hit.size:
        raise ValueError(f"LocalPRM: no PRM token holds character {start + c} of the scored text")
      positions.append(int(hit[-1]))
    return list(enc["input_ids"]), positions

  def score(self, prompts: Sequence[str], responses: Sequence[str],
            steps: Sequence[Sequence[Span]]) -> List[np.ndarray]:
    from jaxrl_dense.models import prm_head  # pylint: disable=import-outside-toplevel
    if not len(prompts) == len(responses) == len(steps):
      raise ValueError(f"LocalPRM: {len(prompts)} prompts, {len(responses)} responses, {len(steps)} step lists")
    out: List[np.ndarray] = []
    limit = self.prm.config.max_position_embeddings
    for i0 in range(0, len(responses), self.batch_size):
      rows = [self._row(p, r, s) for p, r, s in zip(prompts[i0:i0 + self.batch_size],
                                                      responses[i0:i0 + self.batch_size],
                                                      steps[i0:i0 + self.batch_size])]
      t = max(len(ids) for ids, _ in rows)
      if limit and t > limit:
        raise ValueError(f"LocalPRM: a scored text has {t} tokens, more than the PRM's "
                         f"max_position_embeddings={limit}")
      t = -(-t // self.bucket) * self.bucket
      s = max(8, -(-max(max(len(p) for _, p in rows), 1) // 8) * 8)
      tokens = np.zeros((len(rows), t), np.int32)
      mask = np.zeros((len(rows), t), np.int32)
      pos = np.zeros((len(rows), s), np.int32)
      smask = np.zeros((len(rows), s), np.int32)
      for b, (ids, p) in enumerate(rows):  # right padding
        tokens[b, :len(ids)], mask[b, :len(ids)] = ids, 1
        pos[b, :len(p)], smask[b, :len(p)] = p, 1
      self.requests += 1
      rew = np.asarray(prm_head.prm_step_rewards(self.prm, tokens, mask, pos, smask))
      out.extend(rew[b, :len(p)].astype(np.float32) for b, (_, p) in enumerate(rows))
    return out
