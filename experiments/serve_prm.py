r"""Serve a discriminative step-scoring PRM over HTTP (the protocol of jaxrl_dense/rewards/service.py).

    python experiments/serve_prm.py --prm=/path/to/Qwen2.5-Math-PRM-7B --separator='<extra_0>' --port=8123
    python experiments/prime_math.py --flagfile=... --algo=rloo --process_reward=http://127.0.0.1:8123/score

POST /score {"prompts", "responses", "steps": [[[start, end], ...], ...]} -> {"step_scores"}; GET
answers {"ok": true} (the trainer's start-up probe). The model runs in JAX
(`models.prm_head.load_discriminative_prm`, `rewards.local_prm.LocalPRM`): one jitted pass per
batch of rows, padded to token buckets. A trainer can also load the same directory in-process with
--process_reward=prm:DIR; serving it keeps it on its own machine or accelerator.
"""
from __future__ import annotations

import sys
import threading

from absl import app, flags

from jaxrl_dense import cli  # noqa: E402

flags.DEFINE_string("prm", "", "A Hugging Face directory holding a step-scoring PRM (Qwen2ForProcessRewardModel, "
                    "Qwen2/Qwen3/Llama ForTokenClassification) and its tokenizer.")
flags.DEFINE_string("separator", "", "The PRM's step separator token (Qwen2.5-Math-PRM: <extra_0>); '' = read "
                    "each step's last character.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8123, "Port (0 = any free port, printed).")
flags.DEFINE_string("dtype", "bfloat16", "Parameter dtype: float32, bfloat16 or float16.")
flags.DEFINE_integer("batch_size", 16, "Rows per jitted pass.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from jaxrl_dense.models import prm_head
  from jaxrl_dense.rewards import local_prm, service
  from jaxrl_dense.rl.config import ConfigError
  from jaxrl_dense.rl.load import check_process_reward
  try:
    if not FLAGS.prm:
      raise ConfigError("prm", FLAGS.prm, "is required (a PRM directory)")
    check_process_reward("prm:" + FLAGS.prm)
  except ConfigError as e:
    print(f"serve_prm.py: error: {e}", file=sys.stderr)
    sys.exit(cli.EXIT_BAD_INPUT)
  prm = local_prm.LocalPRM(prm_head.load_discriminative_prm(FLAGS.prm, dtype=FLAGS.dtype),
                           separator=FLAGS.separator or None, batch_size=FLAGS.batch_size)
  server, url = service.serve(prm.score, FLAGS.host, FLAGS.port)
  print(f"[serve_prm] {FLAGS.prm} at {url}", flush=True)
  try:
    threading.Event().wait()  # the server runs in its daemon thread; keep the process alive
  except KeyboardInterrupt:
    server.shutdown()


if __name__ == "__main__":
  cli.run(main)
