r"""Fine-Grained RLHF (Wu et al., arXiv 2306.01693) on the arithmetic task, with rule-based
reward functions so it runs without learned reward models.

    python experiments/fine_grained_rlhf.py --steps=2 --num_prompts=8 --n=4

Reward functions (each judges its own segments; a judgment is a reward on the segment's last token):
  * relevance (sub-sentence segments = text between tokens containing ".", ",", "!", "?", ":" or
    a newline; weight --w_rel): +1 if the segment mentions a number or the word "answer" and is not
    a repeat of an earlier segment, else -1.
  * factuality (sentence segments = text between tokens containing ".", "!", "?" or a newline;
    weight --w_fact): an equation "a op b = c" is +1 if true else -1; "the answer is N" is +1 if N
    equals the gold answer else -1; sentences with neither are not judged.
  * completeness (whole response): the verifier's 0/1 outcome, normalised
    ((s - 0.5) / 0.5) * --completeness_scale, on the last token.
Token rewards r_t = sum_k w_k R_k(j) 1[t = end_j] + completeness 1[t = L-1] - kl_coef (old_logp - ref_logp)
(jaxrl_dense.rewards.fine_grained_token_rewards), then mean-keeping reward scaling, GAE(gamma, lambda)
with a linear value head on the policy trunk, advantage whitening
(jaxrl_dense.rewards.fine_grained_advantages), and a PPO-clip + clipped value update.
"""
from __future__ import annotations

import functools
import time

from absl import flags

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxrl_dense import cli  # noqa: E402
import dense_common as dc  # noqa: E402
from dense_rules import factuality_judgments, pack, relevance_judgments  # noqa: E402
from jaxrl_dense import losses, ops  # noqa: E402
from jaxrl_dense.models import logprobs, transformer  # noqa: E402
from jaxrl_dense.rewards import fine_grained as fg  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_float("w_rel", 0.3, "Relevance reward weight.")
flags.DEFINE_float("w_fact", 0.5, "Factuality reward weight.")
flags.DEFINE_float("completeness_scale", 0.3, "Scale of the normalised outcome reward.")
flags.DEFINE_float("kl_coef", 0.05, "Per-token KL coefficient (paper: 0.3).")
flags.DEFINE_float("gamma", 1.0, "Discount.")
flags.DEFINE_float("lam", 0.95, "GAE lambda.")
flags.DEFINE_bool("quirk_whiten", False, "Reproduce the repo's 1/sqrt(std) reward scaling.")
flags.DEFINE_float("vf_coef", 0.5, "Value loss weight.")
flags.DEFINE_float("clip", 0.2, "PPO and value clip range.")

@functools.partial(jax.jit, static_argnames=("config", "response_len"))
def policy_outputs(params, vhead, config, tokens, attn, response_len: int):
  """(logp [B, R], values [B, R]): value of the state before each response token."""
  hidden = transformer.hidden_states(params, config, tokens, attn)  # [B, P+R, D]
  w = transformer.lm_head_weight(params, config).astype(transformer.compute_dtype(config))
  cut = tokens.shape[1] - response_len - 1
  lp = logprobs.logprobs_from_hidden(hidden[:, cut:], w, tokens[:, cut:], attn[:, cut:])[:, 1:]
  h = hidden[:, cut:-1].astype(jnp.float32)  # [B, R, D]: position t predicts response token t
  values = h @ vhead["w"] + vhead["b"]  # [B, R]
  return lp, values


def make_update(config, response_len, total_tokens, clip, vf_coef):
  def loss_fn(theta, batch):
    params, vhead = theta
    lp, v = policy_outputs(params, vhead, config, batch["tokens"], batch["attn"], response_len)
    pg = losses.ppo_clip_loss(lp, batch["old_logp"], batch["adv"], batch["mask"],
                              clip_ratio_low=clip)
    v_clip = batch["old_values"] + jnp.clip(v - batch["old_values"], -clip, clip)
    vl = jnp.maximum((v - batch["returns"]) ** 2, (v_clip - batch["returns"]) ** 2)
    v_sum = 0.5 * ops.masked_sum(vl, batch["mask"])
    return (pg.loss_sum + vf_coef * v_sum) / total_tokens, (pg.loss_sum, v_sum)

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def main(argv):
  del argv
  lm = dc.load_model(FLAGS.model, remat=FLAGS.remat)
  ref_params = lm.params
  params = lm.params
  vhead = {"w": jnp.zeros((lm.config.hidden_size,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(FLAGS.lr))
  opt_state = opt.init((params, vhead))
  history = []
  for step in range(FLAGS.steps):
    t0 = time.time()
    key = jax.random.PRNGKey(FLAGS.seed * 1000 + step)
    recs = dc.arithmetic_records("train", FLAGS.num_prompts, seed=FLAGS.seed,
                                 offset=step * FLAGS.num_prompts)
    gen_model = lm._replace(params=params)
    ro = dc.sample(gen_model, recs, n=FLAGS.n, max_new_tokens=FLAGS.max_new_tokens,
                   temperature=FLAGS.temperature, key=key)
    R, B = ro.response_len, ro.tokens.shape[0]
    old_lp, old_v, ref_lp = [], [], []
    for i in range(0, B, FLAGS.micro_batch):
      sl = slice(i, i + FLAGS.micro_batch)
      lp, v = policy_outputs(params, vhead, lm.config, jnp.asarray(ro.tokens[sl]),
                             jnp.asarray(ro.attention_mask[sl]), R)
      rl, _ = policy_outputs(ref_params, vhead, lm.config, jnp.asarray(ro.tokens[sl]),
                             jnp.asarray(ro.attention_mask[sl]), R)
      old_lp.append(np.asarray(lp)); old_v.append(np.asarray(v)); ref_lp.append(np.asarray(rl))
    mask = ro.response_mask
    old_lp = np.concatenate(old_lp) * mask
    old_v = np.concatenate(old_v) * mask
    ref_lp = np.concatenate(ref_lp) * mask
    # Rule-based judgments on the decoded tokens (host side).
    tok_texts = [[lm.tokenizer.decode([int(t)]) for t, m in zip(ro.response_tokens[b], mask[b]) if m]
                 for b in range(B)]
    rel = pack([relevance_judgments(tt) for tt in tok_texts], R)
    fact = pack([factuality_judgments(tt, ro.golds[b]) for b, tt in enumerate(tok_texts)], R)
    complete = fg.normalize_sequence_score(ro.acc, 0.5, 0.5, scale=FLAGS.completeness_scale)
    r = fg.fine_grained_token_rewards(
        [rel[0], fact[0]], [fg.binary_segment_values(rel[1], 1.0, -1.0),
                            fg.binary_segment_values(fact[1], 1.0, -1.0)],
        [rel[2], fact[2]], [FLAGS.w_rel, FLAGS.w_fact], mask, sequence_score=complete,
        old_logp=old_lp, ref_logp=ref_lp, kl_coef=FLAGS.kl_coef)
    adv, ret = fg.fine_grained_advantages(r, old_v, mask, gamma=FLAGS.gamma, lam=FLAGS.lam,
                                          quirk=FLAGS.quirk_whiten)
    total = float(mask.sum())
    update = make_update(lm.config, R, total, FLAGS.clip, FLAGS.vf_coef)
    grads, pg_sum, v_sum = None, 0.0, 0.0
    for i in range(0, B, FLAGS.micro_batch):
      sl = slice(i, i + FLAGS.micro_batch)
      batch = {"tokens": jnp.asarray(ro.tokens[sl]), "attn": jnp.asarray(ro.attention_mask[sl]),
               "old_logp": jnp.asarray(old_lp[sl]), "adv": adv[sl], "mask": jnp.asarray(mask[sl]),
               "old_values": jnp.asarray(old_v[sl]), "returns": ret[sl]}
      (_, (pgs, vs)), g = update((params, vhead), batch)
      pg_sum += float(pgs); v_sum += float(vs)
      grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
    updates, opt_state = opt.update(grads, opt_state, (params, vhead))
    params, vhead = optax.apply_updates((params, vhead), updates)
    rel_vals = np.where(rel[1], 1.0, -1.0)[rel[2] > 0]
    fact_vals = np.where(fact[1], 1.0, -1.0)[fact[2] > 0]
    rec = {"step": step, "acc": float(ro.acc.mean()),
           "mean_len": float(mask.sum(1).mean()),
           "relevance_mean": float(rel_vals.mean()) if rel_vals.size else 0.0,
           "factuality_mean": float(fact_vals.mean()) if fact_vals.size else 0.0,
           "judged_sentences": int(fact[2].sum()),
           "token_reward_sum_mean": float(np.asarray(r).sum(1).mean()),
           "kl_k1_mean": float(((old_lp - ref_lp) * mask).sum() / total),
           "policy_loss": pg_sum / total, "value_loss": v_sum / total,
           "seconds": round(time.time() - t0, 1)}
    history.append(rec)
    dc.log(f"step {rec}")
  print("RESULT", history, flush=True)


if __name__ == "__main__":
  cli.run(main)
