r"""Implicit PRM from outcome labels only ("Free Process Rewards without Process Labels",
arXiv 2412.01981; methods.md §1.2).

    python experiments/implicit_prm.py --objective=ce --num_prompts=16 --n=4 --steps=3

Samples n responses per arithmetic training problem from the policy (SmolLM2-135M-Instruct by
default), labels them with the verifier, and trains an implicit PRM pi_phi (initialised from the
policy; the frozen policy is the reference) on the sequence log-ratio z = sum_t (logp_phi - logp_ref)
with one of the objectives in jaxrl_dense.rewards: ce (unpaired BCE), dpo / nca (pairs: every
correct x incorrect response of the same prompt), kto (balanced, same pairs split into w / l).

Memory-light exact gradients for any objective L(z_1..z_B): compute z for all rows, c = dL/dz,
then accumulate grad of sum_i c_i z_i(phi) over micro-batches.

Prints the training loss per step and, on freshly sampled held-out (eval split) responses, the PRM
pairwise accuracy (PRIME's `compute_dpo_accuracy`) before and after training.
"""
from __future__ import annotations

import functools
import os
import sys
import time

from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments import dense_common as dc  # noqa: E402
from experiments.dense_rules import contrastive_pairs  # noqa: E402
from jaxrl_dense import rewards  # noqa: E402

OBJECTIVES = ("ce", "dpo", "nca", "kto")

FLAGS = flags.FLAGS
flags.DEFINE_enum("objective", "ce", OBJECTIVES, "Implicit-PRM objective.")
flags.DEFINE_integer("num_eval_prompts", 8, "Held-out prompts for the pairwise accuracy.")
flags.DEFINE_float("beta", 0.05, "Implicit-reward scale beta.")
flags.DEFINE_string("save_dir", "", "Save the trained PRM here (HF safetensors), optional.")


def objective_fn(objective: str, acc: np.ndarray, n: int, beta: float):
  """loss(z [B]) for the chosen objective, or None if the batch has no usable signal."""
  if objective == "ce":
    labels = jnp.asarray(acc)
    return lambda z: rewards.implicit_ce_loss(z, labels, beta=beta)
  w, l = contrastive_pairs(acc, n)
  if len(w) == 0:
    return None
  w, l = jnp.asarray(w), jnp.asarray(l)
  fn = {"dpo": rewards.dpo_loss, "nca": rewards.nca_loss, "kto": rewards.kto_loss}[objective]
  return lambda z: fn(z[w], z[l], beta=beta)


@functools.partial(jax.jit, static_argnames=("config", "response_len"))
def _weighted_z_grad(params, config, tokens, attn, ref_logp, rmask, coef, response_len):
  def f(p):
    lp = dc.response_logprobs(p, config, tokens, attn, response_len)  # [b, R]
    z = rewards.sequence_logratio(lp, ref_logp, rmask)  # [b]
    return jnp.sum(coef * z)
  return jax.grad(f)(params)


def sequence_z(params, config, ro: dc.Rollout, ref_logp: np.ndarray, micro: int) -> np.ndarray:
  lp = dc.response_logprobs_batched(params, config, ro.tokens, ro.attention_mask, ro.response_len,
                                    micro)
  return np.asarray(rewards.sequence_logratio(lp, ref_logp, ro.response_mask))


def train_prm(lm, ro: dc.Rollout, ref_logp: np.ndarray, *, objective: str, steps: int, lr: float,
              beta: float, micro: int):
  """Returns (trained params, list of per-step losses)."""
  loss_fn = objective_fn(objective, ro.acc, ro.n, beta)
  if loss_fn is None:
    dc.log(f"objective {objective}: no (correct, incorrect) pair in the batch; PRM left unchanged")
    return lm.params, []
  opt = optax.adam(lr)
  params = lm.params
  opt_state = opt.init(params)
  losses = []
  for step in range(steps):
    t0 = time.time()
    z = sequence_z(params, lm.config, ro, ref_logp, micro)
    loss, coef = jax.value_and_grad(loss_fn)(jnp.asarray(z))
    coef = np.asarray(coef)
    grads = None
    for i in range(0, z.shape[0], micro):
      sl = slice(i, i + micro)
      g = _weighted_z_grad(params, lm.config, jnp.asarray(ro.tokens[sl]),
                           jnp.asarray(ro.attention_mask[sl]), jnp.asarray(ref_logp[sl]),
                           jnp.asarray(ro.response_mask[sl]), jnp.asarray(coef[sl]),
                           ro.response_len)
      grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
    dc.log(f"step {step}: {objective} loss {float(loss):.5f}  ({time.time() - t0:.0f}s)")
  return params, losses


def pairwise_accuracy(z: np.ndarray, acc: np.ndarray, n: int) -> float:
  scores = jnp.asarray(z)[:, None] * jnp.ones((1, 1))  # [B, 1]: the sequence score as one token
  return float(rewards.prm_pairwise_accuracy(scores, jnp.ones_like(scores), jnp.asarray(acc), n=n))


def run(objective: str) -> dict:
  lm = dc.load_model(FLAGS.model, remat=FLAGS.remat)
  key = jax.random.PRNGKey(FLAGS.seed)
  k_train, k_eval = jax.random.split(key)
  train_recs = dc.arithmetic_records("train", FLAGS.num_prompts, seed=FLAGS.seed)
  eval_recs = dc.arithmetic_records("eval", FLAGS.num_eval_prompts, seed=FLAGS.seed)
  dc.log(f"sampling {len(train_recs)} x {FLAGS.n} training responses")
  ro = dc.sample(lm, train_recs, n=FLAGS.n, max_new_tokens=FLAGS.max_new_tokens,
                 temperature=FLAGS.temperature, key=k_train)
  dc.log(f"train accuracy {ro.acc.mean():.3f}; pairs {len(contrastive_pairs(ro.acc, FLAGS.n)[0])}")
  ref_train = dc.response_logprobs_batched(lm.params, lm.config, ro.tokens, ro.attention_mask,
                                           ro.response_len, FLAGS.micro_batch)
  ev = dc.sample(lm, eval_recs, n=FLAGS.n, max_new_tokens=FLAGS.max_new_tokens,
                 temperature=FLAGS.temperature, key=k_eval)
  ref_eval = dc.response_logprobs_batched(lm.params, lm.config, ev.tokens, ev.attention_mask,
                                          ev.response_len, FLAGS.micro_batch)
  params, losses = train_prm(lm, ro, ref_train, objective=objective, steps=FLAGS.steps,
                             lr=FLAGS.lr, beta=FLAGS.beta, micro=FLAGS.micro_batch)
  z_train = sequence_z(params, lm.config, ro, ref_train, FLAGS.micro_batch)
  z_eval = sequence_z(params, lm.config, ev, ref_eval, FLAGS.micro_batch)
  out = {
      "objective": objective, "train_acc": float(ro.acc.mean()), "eval_acc": float(ev.acc.mean()),
      "losses": losses,
      "train_pairwise_acc_after": pairwise_accuracy(z_train, ro.acc, FLAGS.n),
      "eval_pairwise_acc_after": pairwise_accuracy(z_eval, ev.acc, FLAGS.n),
      "eval_pairwise_acc_before": 0.5,  # z = 0 for every response when phi = ref
  }
  if FLAGS.save_dir:
    from jaxrl_dense.models import loading
    loading.save_pretrained(params, lm.config, lm.tokenizer, FLAGS.save_dir)
    out["saved"] = FLAGS.save_dir
  return out


def main(argv):
  del argv
  out = run(FLAGS.objective)
  print("RESULT", out, flush=True)


if __name__ == "__main__":
  app.run(main)
