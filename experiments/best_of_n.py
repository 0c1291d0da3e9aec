r"""Best-of-N reranking with an implicit PRM (Yuan et al., arXiv 2412.01981).

    python experiments/best_of_n.py --objective=ce --num_candidates=4 --num_eval_prompts=16

Samples N responses per held-out arithmetic problem from the policy, scores every response with an
implicit PRM — step rewards r_k = beta * sum of token log-ratios (prm_logp - ref_logp) inside step k,
steps split at tokens containing `--step_delimiter` (default a blank line; the last token always
closes a step), response score = min_k r_k or sum_k r_k (`--step_score`) — and reports the accuracy
of the top-scored response next to majority vote over extracted answers, random choice (the mean
accuracy) and the oracle pass@N.

The PRM is loaded from `--prm_dir` (an HF directory written by implicit_prm.py --save_dir), or
trained inline with implicit_prm.py's flags (--objective, --steps, --lr, --num_prompts, --n, ...).
"""
from __future__ import annotations

from absl import flags

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxrl_dense import cli  # noqa: E402
import dense_common as dc  # noqa: E402
from dense_rules import rerank_report  # noqa: E402
import implicit_prm as iprm  # noqa: E402  (also defines the PRM training flags)
from jaxrl_dense import ops, rewards  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_candidates", 4, "N responses per eval problem.")
flags.DEFINE_string("step_delimiter", "\n\n", "Steps end at tokens whose text contains this.")
flags.DEFINE_enum("step_score", "min", ["min", "sum"], "Aggregate of the step rewards.")
flags.DEFINE_string("prm_dir", "", "Trained PRM (HF dir); default: train inline.")


def main(argv):
  del argv
  lm = dc.load_model(FLAGS.model, remat=FLAGS.remat)
  key = jax.random.PRNGKey(FLAGS.seed)
  k_train, k_eval = jax.random.split(key)
  n = FLAGS.num_candidates
  if FLAGS.prm_dir:
    prm_params = dc.load_model(FLAGS.prm_dir).params
    losses = []
  else:
    recs = dc.arithmetic_records("train", FLAGS.num_prompts, seed=FLAGS.seed)
    dc.log(f"training the implicit PRM ({FLAGS.objective}) on {len(recs)} x {FLAGS.n} samples")
    ro = dc.sample(lm, recs, n=FLAGS.n, max_new_tokens=FLAGS.max_new_tokens,
                   temperature=FLAGS.temperature, key=k_train)
    ref = dc.response_logprobs_batched(lm.params, lm.config, ro.tokens, ro.attention_mask,
                                       ro.response_len, FLAGS.micro_batch)
    prm_params, losses = iprm.train_prm(lm, ro, ref, objective=FLAGS.objective, steps=FLAGS.steps,
                                        lr=FLAGS.lr, beta=FLAGS.beta, micro=FLAGS.micro_batch)
  eval_recs = dc.arithmetic_records("eval", FLAGS.num_eval_prompts, seed=FLAGS.seed)
  dc.log(f"sampling {len(eval_recs)} x {n} eval candidates")
  ev = dc.sample(lm, eval_recs, n=n, max_new_tokens=FLAGS.max_new_tokens,
                 temperature=FLAGS.temperature, key=k_eval)
  lp_ref = dc.response_logprobs_batched(lm.params, lm.config, ev.tokens, ev.attention_mask,
                                        ev.response_len, FLAGS.micro_batch)
  lp_prm = dc.response_logprobs_batched(prm_params, lm.config, ev.tokens, ev.attention_mask,
                                        ev.response_len, FLAGS.micro_batch)
  delim = dc.delimiter_token_ids(lm.tokenizer, FLAGS.step_delimiter)
  step_ids = ops.step_ids_from_delimiter(ev.response_tokens, ev.response_mask, delim)  # [B, R]
  num_steps = ev.response_len
  r_step, step_mask = rewards.implicit_step_rewards(
      jnp.asarray(lp_prm), jnp.asarray(lp_ref), jnp.asarray(ev.response_mask),
      jnp.asarray(step_ids), num_steps, beta=FLAGS.beta, mode="single")
  scores = np.asarray(rewards.aggregate_step_scores(r_step, step_mask, how=FLAGS.step_score))
  answers = dc.extracted_answers(ev.texts)
  report = rerank_report(scores, ev.acc, answers, ev.golds, n)
  report.update({"N": n, "eval_problems": len(eval_recs), "step_score": FLAGS.step_score,
                 "mean_steps_per_response": float(np.asarray(step_mask).sum(1).mean()),
                 "prm_objective": FLAGS.objective if not FLAGS.prm_dir else FLAGS.prm_dir,
                 "prm_losses": losses})
  print("RESULT", report, flush=True)


if __name__ == "__main__":
  cli.run(main)
