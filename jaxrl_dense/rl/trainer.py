"""`Trainer`: the state of one RL run and its two operations, a training step and an evaluation.

    trainer = Trainer(run_config)          # mesh, models, PrimeState, data, verifier (loads)
    metrics = trainer.train_step()         # rollout.collect -> shard -> make_prime's update_fn
    report = trainer.evaluate("_end")      # evaluation.evaluate (greedy pass@1), JSON report
    tree, meta = trainer.checkpoint()      # what an exact resume needs; trainer.restore(tree, meta)

Keys are derived from (seed, step), the data iterator state travels in `meta`, so restoring a
checkpoint and stepping reproduces the original run. experiments/prime_math.py owns the loop
around it (logging, eval / checkpoint cadence, resume, NaN stop).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_dense import evaluation, sampling, sharding
from jaxrl_dense.rl import prime, rollout, setup
from jaxrl_dense.rl.config import ConfigError, RunConfig


def host_generate(*args, **kwargs) -> sampling.GenerationOutput:
  """`sampling.generate` with its outputs gathered to numpy on every process (multi-process safe)."""
  return sharding.to_host(sampling.generate(*args, **kwargs))


class Trainer:
  """Models, PrimeState, jitted update, data iterator and verifier of a run (see module docstring)."""

  def __init__(self, cfg: RunConfig):
    from jaxrl_dense.data import batching, iterator
    t0 = time.time()
    self.cfg = cfg
    p, r = cfg.prime, cfg.prime.rollout
    self.mesh = sharding.make_mesh(cfg.mesh)
    div = sharding.batch_divisor(self.mesh)
    for name, rows in (("prompts_per_step", r.rows), ("micro_batch_size", p.policy.micro_batch_size),
                       ("prm_micro_batch_size", p.prm.prm_micro_batch_size),
                       ("score_micro_batch_size", p.score_micro_batch_size)):
      if rows % div:
        raise ConfigError(name, rows, f"{rows} rows are not divisible by data*fsdp={div} of --mesh={cfg.mesh}")
    # Policy, frozen reference and PRM each start from their own checkpoint (PRIME: the same SFT
    # model), as separate device copies: the policy and PRM buffers are donated every step.
    self.model_config, policy_params, self.tokenizer = setup.load_model(cfg.model, cfg, seed=cfg.seed)
    mc = self.model_config

    def place(params):
      return sharding.shard_params(jax.tree.map(lambda x: jnp.array(x, copy=True), params), mc, self.mesh)

    def load_other(name):
      spec = getattr(cfg, name)
      if not spec or spec == cfg.model:
        return place(policy_params)
      other, params, _ = setup.load_model(spec, cfg, tokenizer=self.tokenizer, seed=cfg.seed)
      if other.replace(eos_token_ids=mc.eos_token_ids) != mc:
        raise ConfigError(name, spec, "has a different architecture from --model")
      return place(params)

    ref = load_other("ref_model") if p.needs_ref else None
    prm = load_other("prm_model") if p.uses_prm else None
    self.init_fn, self.update_fn = prime.make_prime(mc, p, mesh=self.mesh)
    self.state = self.init_fn(place(policy_params), prm, ref)
    if p.share_prompt and p.prompt_group == 1 and r.n > 1 and jax.process_index() == 0:
      print(f"[setup] --share_prompt: micro-batch sizes are not all multiples of --n={r.n}; running "
            "full rows (no prompt sharing)")
    # Data.
    self.train_records, self.eval_records = setup.load_records(cfg)
    self.encoder = batching.PromptEncoder(self.tokenizer, max_prompt_length=r.max_prompt_length,
                                          overflow="error")
    if cfg.train_data == "arithmetic":  # near-uniform lengths: check a sample, not all 25k
      _, dropped = self.encoder.filter_overlong(self.train_records[:256])
      if dropped:
        raise ConfigError("max_prompt_length", r.max_prompt_length,
                          f"arithmetic prompts do not fit (e.g. {dropped[0]})")
    else:
      self.train_records, dropped = self.encoder.filter_overlong(self.train_records)
      if dropped and jax.process_index() == 0:
        print(f"[data] dropped {len(dropped)} training prompts longer than --max_prompt_length")
    if not self.train_records:
      raise ConfigError("max_prompt_length", r.max_prompt_length, "every training prompt is longer than this")
    self.eval_records, _ = self.encoder.filter_overlong(self.eval_records)
    self.iterator = iterator.PromptIterator(self.train_records, seed=cfg.seed)
    self.verifier = rollout.Verifier(r.verify_timeout, cfg.verify_workers)
    self.base_key = jax.random.PRNGKey(cfg.seed)
    self.step = 0
    self.setup_s = time.time() - t0

  def train_step(self) -> dict:
    """Runs RL step `self.step + 1`; returns its metrics as Python floats."""
    p, r = self.cfg.prime, self.cfg.prime.rollout
    step = self.step + 1
    gen_key, upd_key = jax.random.split(jax.random.fold_in(self.base_key, step))
    records = self.iterator.next_batch(r.prompts_per_step * r.oversample)
    batch, stats = rollout.collect(self.state.policy.params, self.model_config, self.tokenizer,
                                   self.encoder, records, gen_key, p, self.verifier)
    t = time.perf_counter()
    self.state, metrics = self.update_fn(self.state, sharding.shard_batch(batch, self.mesh), upd_key)
    metrics = sharding.to_host(metrics)  # waits for the update
    stats["time/update"] = time.perf_counter() - t
    stats["time/step"] = stats["time/generate"] + stats["time/verify"] + stats["time/update"]
    trained = float(metrics.pop("response/tokens"))
    stats["tokens_per_s"] = (stats.pop("response/sampled_tokens") + trained) / max(stats["time/step"], 1e-9)
    self.step = step
    return {"epoch": self.iterator.epoch, **{k: float(np.asarray(v)) for k, v in metrics.items()}, **stats}

  def evaluate(self, tag: str = "") -> dict:
    """Greedy pass@1 on the eval records (`evaluation.evaluate`, one compilation); process 0
    writes `eval_stepNNNNN{tag}.json` under --logdir."""
    cfg = self.cfg
    if not self.eval_records:
      return {}
    res = evaluation.evaluate(
        self.state.policy.params, self.model_config, self.tokenizer, self.eval_records,
        max_new_tokens=cfg.eval_max_response_length or cfg.prime.rollout.max_response_length,
        batch_size=cfg.eval_batch_size, max_prompt_length=cfg.prime.rollout.max_prompt_length,
        verify_fn=self.verifier, encoder=self.encoder, generate_fn=host_generate)
    report = {"eval/pass@1": res.summary["accuracy"], "eval/num": res.summary["num_problems"],
              "eval/truncated_rate": res.summary["truncated_rate"], "time/eval": res.summary["eval_seconds"]}
    if cfg.logdir and jax.process_index() == 0:
      evaluation.write_report(res, os.path.join(cfg.logdir, f"eval_step{self.step:05d}{tag}.json"),
                              step=self.step, model=cfg.model, eval_data=cfg.eval_data)
    return report

  def checkpoint(self, history=()) -> tuple:
    """(state tree, meta): the trained states, and step / data-iterator state / history / model."""
    from jaxrl_dense import checkpoint as ckpt_lib
    meta = {"step": self.step, "data_state": self.iterator.get_state(), "history": list(history),
            "model_config": ckpt_lib.make_fingerprint(self.model_config)}
    return prime.checkpoint_tree(self.state), meta

  def restore(self, tree, meta) -> list:
    """Loads a `checkpoint()`; returns the metrics history it carried."""
    from jaxrl_dense import checkpoint as ckpt_lib
    if meta.get("model_config") != ckpt_lib.make_fingerprint(self.model_config):
      raise ckpt_lib.CheckpointMismatchError("the checkpoint was written for another model config")
    self.state = prime.restore_tree(self.state, tree)
    self.iterator.set_state(meta["data_state"])
    self.step = int(meta["step"])
    return list(meta["history"])

  def close(self) -> None:
    self.verifier.close()
