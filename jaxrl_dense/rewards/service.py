"""A process reward model served over HTTP: the client the trainer calls, and a reference server.

The field serves reward models beside the trainer (veRL's reward loop, OpenRLHF
``--reward.remote_url``, prime-rl's endpoints); this is that path for step scores. One JSON
protocol, small enough to put in front of any model (vLLM/SGLang behind an adapter, or
``serve(score_fn)`` below for a JAX PRM):

    POST <url>   {"prompts": [str], "responses": [str], "steps": [[[start, end], ...], ...]}
    200          {"step_scores": [[float, ...], ...]}      one score per given step span

``steps`` are character spans of each response's steps (``step_rewards.segment``); the server
scores them in its own tokenizer, and the trainer puts the scores on its own tokens
(``step_rewards.placement_weights``), so the two tokenizers never need to agree.

``RewardServiceClient`` batches requests (``batch_size`` rows each), gives each request a hard
``timeout_s``, retries connection errors, timeouts and 5xx answers ``max_retries`` times with
exponential backoff, and then either raises ``RewardServiceError`` (``on_error="raise"``, the
default: the step fails with the reason) or scores the batch 0 and counts the reason
(``on_error="zero"``; ``client.failures`` by reason). Answers of the wrong shape or non-finite
scores are errors, never silently used. ``check_service(url)`` is the start-up probe (GET
``<url>`` answers 200 with ``{"ok": true}`` on the reference server).
"""
from __future__ import annotations

import collections
import http.server
import json
import math
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

Span = Tuple[int, int]
ScoreFn = Callable[[List[str], List[str], List[List[Span]]], List[List[float]]]

ON_ERROR = ("raise", "zero")


class RewardServiceError(RuntimeError):
  """The reward service could not score a batch (the message says why and where)."""


def _validate_answer(answer, steps: Sequence[Sequence[Span]], url: str) -> List[np.ndarray]:
  if not isinstance(answer, dict) or "step_scores" not in answer:
    raise RewardServiceError(f"{url}: answer has no 'step_scores' field")
  scores = answer["step_scores"]
  if not isinstance(scores, list) or len(scores) != len(steps):
    raise RewardServiceError(f"{url}: {len(scores) if isinstance(scores, list) else 'no'} score rows "
                             f"for {len(steps)} responses")
  out = []
  for i, (row, spans) in enumerate(zip(scores, steps)):
    arr = np.asarray(row, np.float64)
    if arr.ndim != 1 or arr.shape[0] != len(spans):
      raise RewardServiceError(f"{url}: response {i} has {len(spans)} steps but {arr.size} scores")
    if not np.all(np.isfinite(arr)):
      raise RewardServiceError(f"{url}: response {i} has non-finite scores {row}")
    out.append(arr.astype(np.float32))
  return out


class RewardServiceClient:
  """Scores (prompt, response, step spans) rows on a served PRM; see the module docstring."""

  def __init__(self, url: str, *, timeout_s: float = 30.0, max_retries: int = 2, batch_size: int = 64,
               on_error: str = "raise", backoff_s: float = 0.5):
    if not url.startswith(("http://", "https://")):
      raise ValueError(f"reward service url {url!r} must start with http:// or https://")
    if not timeout_s > 0 or not math.isfinite(timeout_s):
      raise ValueError(f"reward service timeout_s must be a finite number > 0, got {timeout_s}")
    if max_retries < 0 or batch_size < 1:
      raise ValueError(f"reward service needs max_retries >= 0 and batch_size >= 1, got "
                       f"{max_retries} and {batch_size}")
    if on_error not in ON_ERROR:
      raise ValueError(f"reward service on_error={on_error!r}; expected one of {ON_ERROR}")
    self.url, self.timeout_s, self.max_retries = url, float(timeout_s), int(max_retries)
    self.batch_size, self.on_error, self.backoff_s = int(batch_size), on_error, float(backoff_s)
    self.failures = collections.Counter()  # reason -> rows scored 0 (on_error="zero")
    self.requests = 0

  def _post(self, payload: bytes) -> dict:
    req = urllib.request.Request(self.url, data=payload, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 (http(s) checked)
      return json.loads(resp.read().decode("utf-8"))

  def _score_batch(self, prompts, responses, steps) -> List[np.ndarray]:
    payload = json.dumps({"prompts": list(prompts), "responses": list(responses),
                          "steps": [[list(s) for s in row] for row in steps]}).encode("utf-8")
    last = "no attempt"
    for attempt in range(self.max_retries + 1):
      if attempt:
        time.sleep(self.backoff_s * 2 ** (attempt - 1))
      self.requests += 1
      try:
        return _validate_answer(self._post(payload), steps, self.url)
      except urllib.error.HTTPError as e:
        last = f"HTTP {e.code}"
        if e.code < 500:  # a client error will not pass on retry
          break
      except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        last = "timeout" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else \
            f"unreachable ({reason})"
      except (json.JSONDecodeError, UnicodeDecodeError):
        last = "answer is not JSON"
        break
      except RewardServiceError as e:
        last = str(e)
        break
    message = (f"reward service {self.url}: {last} after {attempt + 1} attempt(s) "
               f"(timeout {self.timeout_s:g} s each, {len(responses)} responses)")
    if self.on_error == "raise":
      raise RewardServiceError(message)
    self.failures[last.split(" (")[0]] += len(responses)
    return [np.zeros(len(s), np.float32) for s in steps]

  def score(self, prompts: Sequence[str], responses: Sequence[str],
            steps: Sequence[Sequence[Span]]) -> List[np.ndarray]:
    """One float32 array of step scores per response (empty for a response without steps)."""
    if not len(prompts) == len(responses) == len(steps):
      raise ValueError(f"reward service: {len(prompts)} prompts, {len(responses)} responses, "
                       f"{len(steps)} step lists")
    out: List[np.ndarray] = []
    for i in range(0, len(responses), self.batch_size):
      sl = slice(i, i + self.batch_size)
      out.extend(self._score_batch(prompts[sl], responses[sl], steps[sl]))
    return out


def check_service(url: str, timeout_s: float = 5.0) -> None:
  """Start-up probe: raises ValueError naming the url unless GET ``url`` answers within
  ``timeout_s`` (any HTTP answer below 500 counts as reachable)."""
  try:
    with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310
      return
  except urllib.error.HTTPError as e:
    if e.code < 500:
      return
    raise ValueError(f"{url}: the reward service answers HTTP {e.code}") from None
  except (urllib.error.URLError, OSError) as e:
    raise ValueError(f"{url}: the reward service is not reachable ({getattr(e, 'reason', e)})") from None


# ----------------------------------------------------------------------------- reference server


def make_handler(score_fn: ScoreFn):
  """An ``http.server`` handler class answering the protocol with ``score_fn(prompts, responses,
  steps) -> [[score per step], ...]``; bad requests get 400 with the reason, failures 500."""

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code: int, body: dict):
      data = json.dumps(body).encode("utf-8")
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's name)
      self._send(200, {"ok": True})

    def do_POST(self):  # noqa: N802
      try:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode("utf-8"))
        prompts, responses, steps = body["prompts"], body["responses"], body["steps"]
        if not len(prompts) == len(responses) == len(steps):
          raise ValueError("prompts, responses and steps differ in length")
        steps = [[(int(a), int(b)) for a, b in row] for row in steps]
      except (ValueError, KeyError, TypeError) as e:
        self._send(400, {"error": f"bad request: {e}"})
        return
      try:
        scores = score_fn(prompts, responses, steps)
        self._send(200, {"step_scores": [[float(x) for x in row] for row in scores]})
      except Exception as e:  # pylint: disable=broad-except  (the client sees a 500 and retries)
        self._send(500, {"error": f"{type(e).__name__}: {e}"})

    def log_message(self, *args):  # quiet
      del args

  return Handler


def serve(score_fn: ScoreFn, host: str = "127.0.0.1", port: int = 0) -> Tuple[http.server.ThreadingHTTPServer, str]:
  """Starts the reference server in a daemon thread; returns (server, url). ``port=0`` picks a
  free port. ``server.shutdown()`` stops it."""
  server = http.server.ThreadingHTTPServer((host, port), make_handler(score_fn))
  server.daemon_threads = True
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, f"http://{host}:{server.server_address[1]}/score"
