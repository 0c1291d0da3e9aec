"""The served PRM: the HTTP client against the reference server on loopback:
batching, retries, a hung server timing out within the limit, a down server, malformed answers,
and served step scores driving RLOO (PRIME's process term), GRPO and GAE."""
import re
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense import advantages
from jaxrl_dense.rewards import service
from jaxrl_dense.rewards import step_rewards as sr

_EQ = re.compile(r"^\s*(\d+)\s*([-+*])\s*(\d+)\s*=\s*(-?\d+)\.$")


def arithmetic_prm(prompts, responses, steps):
  """A perfect step checker for chain_arith steps: +1 for a true equation, -1 for a false one, 0
  for any other step (the answer sentence)."""
  del prompts
  out = []
  for text, spans in zip(responses, steps):
    row = []
    for a, b in spans:
      m = _EQ.match(text[a:b])
      if not m:
        row.append(0.0)
        continue
      x, op, y, z = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
      row.append(1.0 if {"+": x + y, "-": x - y, "*": x * y}[op] == z else -1.0)
    out.append(row)
  return out


RESPONSES = ["3 + 4 = 7. 7 + 2 = 9. The answer is 9.", "3 + 4 = 8. 8 + 2 = 10. The answer is 10.",
             "3 + 4 = 7. 7 + 2 = 10. The answer is 10.", "no steps at all"]


@pytest.fixture()
def server():
  srv, url = service.serve(arithmetic_prm)
  yield url
  srv.shutdown()


def _steps():
  return [sr.segment(t, "sentences") for t in RESPONSES]


def test_client_batches_and_returns_one_score_per_step(server):
  service.check_service(server)
  client = service.RewardServiceClient(server, batch_size=3)
  scores = client.score(["q"] * 4, RESPONSES, _steps())
  assert client.requests == 2  # 4 rows in batches of 3
  assert [s.tolist() for s in scores] == [[1, 1, 0], [-1, 1, 0], [1, -1, 0], [0]]


def test_retries_a_failing_server_then_succeeds():
  calls = []

  def flaky(prompts, responses, steps):
    calls.append(1)
    if len(calls) == 1:
      raise RuntimeError("warming up")
    return arithmetic_prm(prompts, responses, steps)

  srv, url = service.serve(flaky)
  try:
    client = service.RewardServiceClient(url, max_retries=2, backoff_s=0.01)
    assert client.score(["q"], RESPONSES[:1], _steps()[:1])[0].tolist() == [1, 1, 0]
    assert len(calls) == 2 and client.requests == 2
  finally:
    srv.shutdown()


def test_a_hung_server_times_out_within_the_limit():
  release = threading.Event()

  def hang(prompts, responses, steps):
    release.wait(30)
    return arithmetic_prm(prompts, responses, steps)

  srv, url = service.serve(hang)
  try:
    client = service.RewardServiceClient(url, timeout_s=0.5, max_retries=1, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(service.RewardServiceError, match="timeout after 2 attempt"):
      client.score(["q"], RESPONSES[:1], _steps()[:1])
    assert time.monotonic() - t0 < 2.5  # 2 x 0.5 s + backoff, not the server's 30 s
    zero = service.RewardServiceClient(url, timeout_s=0.3, max_retries=0, on_error="zero")
    out = zero.score(["q", "q"], RESPONSES[:2], _steps()[:2])
    assert [o.tolist() for o in out] == [[0, 0, 0], [0, 0, 0]] and zero.failures == {"timeout": 2}
  finally:
    release.set()
    srv.shutdown()


def test_a_down_server_and_bad_answers_are_clear_errors(server):
  srv, url = service.serve(arithmetic_prm)
  srv.shutdown()
  srv.server_close()
  with pytest.raises(ValueError, match="not reachable"):
    service.check_service(url, timeout_s=1.0)
  client = service.RewardServiceClient(url, max_retries=1, backoff_s=0.01)
  with pytest.raises(service.RewardServiceError, match="unreachable"):
    client.score(["q"], RESPONSES[:1], _steps()[:1])
  wrong, wurl = service.serve(lambda p, r, s: [[0.5]] * len(r))  # one score whatever the steps
  try:
    with pytest.raises(service.RewardServiceError, match="has 3 steps but 1 scores"):
      service.RewardServiceClient(wurl).score(["q"], RESPONSES[:1], _steps()[:1])
  finally:
    wrong.shutdown()
  nan, nurl = service.serve(lambda p, r, s: [[float("nan")] * len(x) for x in s])
  try:
    with pytest.raises(service.RewardServiceError, match="non-finite"):
      service.RewardServiceClient(nurl).score(["q"], RESPONSES[:1], _steps()[:1])
  finally:
    nan.shutdown()
  for kw, msg in ((dict(timeout_s=0), "timeout_s"), (dict(on_error="ignore"), "on_error"),
                  (dict(batch_size=0), "batch_size")):
    with pytest.raises(ValueError, match=msg):
      service.RewardServiceClient(server, **kw)
  with pytest.raises(ValueError, match="http"):
    service.RewardServiceClient("localhost:80")


def test_served_step_scores_drive_rloo_grpo_and_gae(server):
  """Two groups of n = 2: scores from the served PRM, placed on character tokens, enter PRIME's
  RLOO process term, GRPO (PURE's soft-min sequence reward) and GAE. The response with the wrong
  first step gets the lowest advantage on its first step's tokens."""
  from jaxrl_dense.rl import load
  tok = load.load_tokenizer("chars")
  texts = RESPONSES
  steps = _steps()
  scores = service.RewardServiceClient(server).score(["q"] * 4, texts, steps)
  ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  offs = [sr.token_offsets_from_ids(tok, i)[1] for i in ids]
  t_max, s_max = max(map(len, ids)), max(map(len, steps))
  w = sr.placement_weights(offs, steps, num_cols=t_max, num_steps=s_max)
  smask = np.zeros((4, s_max), np.float32)
  sc = np.zeros((4, s_max), np.float32)
  for i, s in enumerate(scores):
    smask[i, :len(s)] = 1
    sc[i, :len(s)] = s
  mask = jnp.asarray([[1.0] * len(i) + [0.0] * (t_max - len(i)) for i in ids])
  token_r = sr.place_step_scores(w, jnp.asarray(sc), jnp.asarray(smask))
  acc = jnp.asarray([1.0, 0.0, 0.0, 0.0])
  hp = advantages.AdvantageParams(n=2)
  adv_rloo, _ = advantages.ESTIMATORS.get("prime_rloo")(
      advantages.AdvantageInputs(outcome=acc, mask=mask, process_rewards=token_r), hp)
  seq = sr.credit_step_rewards(jnp.asarray(sc), jnp.asarray(smask), mode="pure").sum(1)
  adv_grpo, _ = advantages.ESTIMATORS.get("grpo")(advantages.AdvantageInputs(outcome=seq, mask=mask), hp)
  adv_gae, _ = advantages.gae_advantages(token_r, jnp.zeros_like(token_r), mask, gamma=1.0, lam=1.0)
  for a in (adv_rloo, adv_grpo, adv_gae):
    assert a.shape == mask.shape and np.all(np.isfinite(np.asarray(a)))
    assert np.all(np.asarray(a)[np.asarray(mask) == 0] == 0)
  first = [b for a, b in steps[1]][0]  # the wrong first step of response 1 ("3 + 4 = 8.")
  assert float(adv_rloo[1, 0]) < float(adv_rloo[0, 0])  # same group: wrong first step is worse
  assert float(adv_gae[1, first - 1]) < float(adv_gae[0, first - 1])
  assert float(adv_grpo[1, 0]) < float(adv_grpo[0, 0])
