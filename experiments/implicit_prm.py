r"""Implicit PRM from outcome labels only ("Free Process Rewards without Process Labels",
Yuan et al., arXiv 2412.01981).

    python experiments/implicit_prm.py --objective=ce --num_prompts=16 --n=4 --steps=3

Samples n responses per arithmetic training problem from the policy (SmolLM2-135M-Instruct by
default), labels them with the verifier, and trains an implicit PRM pi_phi (initialised from the
policy; the frozen policy is the reference) on the token log-ratio q = logp_phi - ref_logp with
one of the PRM losses of `jaxrl_dense.rewards.PRM_LOSSES` (`--objective`): ce (PRIME's / the
paper's CE on z = sum_t q), dpo (veRL's detached DPO: each response against the mean z of the
other-label responses of its prompt), bon_acc / bon_rm (its best-of-N weightings). The update is
the library's `rl.steps.make_prm_update(loss_fn=...)` (the one PRIME trains with): one jitted
optimizer step over the whole batch per `--steps`, gradients accumulated over `--micro_batch`
rows. The pairwise sequence objectives of the paper (rewards.dpo_loss / nca_loss / kto_loss on
z) stay available as library functions.

Prints the training loss per step and, on freshly sampled held-out (eval split) responses, the PRM
pairwise accuracy (PRIME's `compute_dpo_accuracy`) before and after training.
"""
from __future__ import annotations

import time

from absl import flags

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxrl_dense import cli  # noqa: E402
import dense_common as dc  # noqa: E402
from dense_rules import contrastive_pairs  # noqa: E402
from jaxrl_dense import rewards  # noqa: E402
from jaxrl_dense.rl import state as state_lib  # noqa: E402
from jaxrl_dense.rl import steps as steps_lib  # noqa: E402

OBJECTIVES = rewards.PRM_LOSSES.names()

FLAGS = flags.FLAGS
flags.DEFINE_enum("objective", "ce", OBJECTIVES, "Implicit-PRM objective.")
flags.DEFINE_integer("num_eval_prompts", 8, "Held-out prompts for the pairwise accuracy.")
flags.DEFINE_float("beta", 0.05, "Implicit-reward scale beta.")
flags.DEFINE_string("save_dir", "", "Save the trained PRM here (HF safetensors), optional.")


def sequence_z(params, config, ro: dc.Rollout, ref_logp: np.ndarray, micro: int) -> np.ndarray:
  lp = dc.response_logprobs_batched(params, config, ro.tokens, ro.attention_mask, ro.response_len,
                                    micro)
  return np.asarray(rewards.sequence_logratio(lp, ref_logp, ro.response_mask))


def train_prm(lm, ro: dc.Rollout, ref_logp: np.ndarray, *, objective: str, steps: int, lr: float,
              beta: float, micro: int):
  """Returns (trained params, list of per-step losses): `steps` optimizer steps of
  `make_prm_update(loss_fn=objective)` over the whole batch."""
  rows = ro.tokens.shape[0]
  opt = optax.adam(lr)
  update = jax.jit(steps_lib.make_prm_update(lm.config, opt, beta=beta, mini_batch_size=rows,
                                             micro_batch_size=micro, loss_fn=objective, num_samples=ro.n),
                   donate_argnums=(0,))
  # Every row trains (in_band=None: the unweighted mini-batch loss).
  batch = ro.batch._replace(ref_logp=np.asarray(ref_logp, np.float32), in_band=None)
  state = state_lib.init_train_state(jax.tree.map(jnp.copy, lm.params), opt)  # the update donates it
  losses = []
  for step in range(steps):
    t0 = time.time()
    state, _, metrics = update(state, batch)
    losses.append(float(metrics["prm/loss"]))
    dc.log(f"step {step}: {objective} loss {losses[-1]:.5f}  ({time.time() - t0:.0f}s)")
  return state.params, losses


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
  cli.run(main)
