"""`Trainer`: the state of one RL run and its two operations, a training step and an evaluation.

    trainer = Trainer(run_config)          # load -> plan (meshes) -> build (make_prime) -> place
    metrics = trainer.train_step()         # rollout.collect -> shard -> make_prime's update_fn
    report = trainer.evaluate("_end")      # evaluation.evaluate (greedy pass@1), JSON report
    tree, meta = trainer.checkpoint()      # what an exact resume needs; trainer.restore(tree, meta)
    trainer.save(ckpt, history)            # to a checkpoint.Checkpointer; history = trainer.resume(ckpt)

Keys are derived from (seed, step), the data iterator state (and --filter_mode=resample's prompt
buffer) travels in `meta`, so restoring a checkpoint and stepping reproduces the original run.
experiments/prime_math.py owns the loop around it (logging, eval / checkpoint cadence, resume,
NaN stop).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_dense import sampling
from jaxrl_dense.eval import loop as evaluation, prm as eval_prm
from jaxrl_dense.parallel import inference, placement
from jaxrl_dense.rl import external_reward, load, plan, prime, rollout
from jaxrl_dense.rl.config import ConfigError, RunConfig


def host_generate(*args, **kwargs) -> sampling.GenerationOutput:
  """`sampling.generate` with its outputs gathered to numpy on every process (multi-process safe)."""
  return placement.to_host(sampling.generate(*args, **kwargs))


class Trainer:
  """Models, PrimeState, jitted update, data iterator and verifier of a run (see module docstring)."""

  def __init__(self, cfg: RunConfig):
    """Four phases, in this order: load (read from disk: the policy, its tokenizer, the prompt
    records, a local PRM), plan (the meshes and the rollout layout, every batch's rows checked
    against them), build (`make_prime`'s jitted update, which decides the state's layout) and
    place (every model copied into that layout: the initial `PrimeState`); `_start` then readies
    what moves as the run steps (data iterator, verifier, keys)."""
    t0 = time.time()
    self.cfg = cfg
    policy_params = self._load()
    self.mesh, self.rollout_mesh, self._rollout_layout = plan.meshes(cfg, self.model_config)
    built = prime.make_prime(self.model_config, cfg.prime, mesh=self.mesh,
                             token_series=cfg.sample_every > 0)
    self.init_fn, self.update_fn = built
    self.state = self._place(policy_params, built.state_shardings)
    self._start()
    self.setup_s = time.time() - t0

  def _load(self):
    """Load phase: the policy (`model_config`, `tokenizer`; returns its float32 params), the train
    and eval records that fit --max_prompt_length (`encoder` encodes them), and --process_reward's
    scorer (a prm:DIR is read here). --ref_model / --prm_model are read while placing (`_place`),
    one at a time."""
    from jaxrl_dense.data import batching
    cfg, r = self.cfg, self.cfg.prime.rollout
    self.model_config, policy_params, self.tokenizer = load.load_model(cfg.model, cfg, seed=cfg.seed)
    self.train_records, self.eval_records = load.load_records(cfg)
    if r.env:  # multi-turn tool use: the system prompt states the call format and the tools
      from jaxrl_dense import envs
      from jaxrl_dense.data.prompts import with_system_instruction
      text = envs.make_env(r.env, max_turns=r.max_turns)().instruction
      self.train_records, self.eval_records = (
          [with_system_instruction(x, text) for x in recs] for recs in (self.train_records, self.eval_records))
    self.encoder = batching.PromptEncoder(self.tokenizer, max_prompt_length=r.max_prompt_length,
                                          bucket_multiple=r.length_bucket or 64, overflow="error")
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
    self.eval_records, dropped = self.encoder.filter_overlong(self.eval_records)
    if dropped and jax.process_index() == 0:
      print(f"[data] dropped {len(dropped)} eval prompts longer than --max_prompt_length "
            f"({len(self.eval_records)} left)")
    # --process_reward: a served step-scoring PRM's rewards, placed on the sampled tokens
    self.process_scorer = external_reward.make_process_scorer(cfg.prime, self.tokenizer)
    return policy_params

  def _place(self, policy_params, layout):
    """Place phase: the initial `PrimeState`, every model copied into the update's state `layout`
    (`prime.place`; the state is donated every step, so each model is its own copy). Policy,
    frozen reference and PRM each start from their own checkpoint (PRIME: the same SFT model)."""
    from jaxrl_dense.models import lora
    cfg, mc = self.cfg, self.model_config
    p, r = cfg.prime, cfg.prime.rollout
    full = layout.ref_params if layout.ref_params is not None else layout.policy.params

    def place(params, shardings):
      return prime.place(jax.tree.map(lambda x: jnp.array(x, copy=True), params), shardings)

    def load_other(name, shardings):  # --ref_model / --prm_model: read, checked and placed
      spec = getattr(cfg, name)
      if not spec or spec == cfg.model:
        return place(policy_params, shardings)
      other, params, _ = load.load_model(spec, cfg, tokenizer=self.tokenizer, seed=cfg.seed, name=name)
      if other.replace(eos_token_ids=mc.eos_token_ids) != mc:
        raise ConfigError(name, spec, "has a different architecture from --model")
      return place(params, shardings)

    if p.policy_lora is None and p.prm_lora is None:
      # The frozen reference is stored in the compute dtype (the matmuls cast to it anyway);
      # the cast keeps the placement.
      ref = lora.freeze_base(load_other("ref_model", full), mc)[0] if p.needs_ref else None
      prm = load_other("prm_model", layout.prm.params) if p.uses_prm else None
      policy = place(policy_params, layout.policy.params)
    else:  # LoRA: ONE frozen base (compute dtype) is the reference and every adapted model's base
      base, _ = lora.freeze_base(policy_params, mc)
      ref = place(base, layout.ref_params)
      key = jax.random.PRNGKey(cfg.seed)

      def adapters(lc, i, shardings):
        return prime.place(lora.init_adapters(mc, lc, jax.random.fold_in(key, i)), shardings)

      policy = (place(policy_params, layout.policy.params) if p.policy_lora is None
                else adapters(p.policy_lora, 0, layout.policy.params))
      prm = None
      if p.uses_prm:
        prm = (place(policy_params, layout.prm.params) if p.prm_lora is None
               else adapters(p.prm_lora, 1, layout.prm.params))
    if p.share_prompt and p.prompt_group == 1 and r.n > 1 and jax.process_index() == 0:
      print(f"[setup] --share_prompt: micro-batch sizes are not all multiples of --n={r.n}; running "
            "full rows (no prompt sharing)")
    return self.init_fn(policy, prm, ref)

  def _start(self) -> None:
    """What moves as the run steps: the seeded data iterator (and --filter_mode=resample's prompt
    buffer), the verifier's workers, the base key and the step counter."""
    from jaxrl_dense.data import iterator
    cfg, p, r = self.cfg, self.cfg.prime, self.cfg.prime.rollout
    self.iterator = iterator.PromptIterator(self.train_records, seed=cfg.seed)
    # --filter_mode=resample: prompts of surplus in-band groups, re-sampled first next step.
    self.prompt_buffer = (rollout.PromptBuffer(capacity=r.prompts_per_step)
                          if p.filter_protocol == "resample" else None)
    self._fill_warned = False
    self.last_rollout = None  # (RolloutBatch, {series: [B, R]}) of the last step, with --sample_every
    self.verifier = rollout.Verifier(r.verify_timeout, cfg.verify_workers,
                                     code_sandbox="unsafe" if cfg.unsafe_code_sandbox else "auto")
    self.base_key = jax.random.PRNGKey(cfg.seed)
    self.step = 0

  def train_step(self) -> dict:
    """Runs RL step `self.step + 1`; returns its metrics as Python floats."""
    p, r = self.cfg.prime, self.cfg.prime.rollout
    step = self.step + 1
    gen_key, upd_key = jax.random.split(jax.random.fold_in(self.base_key, step))
    records = rollout.first_round_records(self.prompt_buffer, self.iterator.next_batch,
                                          r.prompts_per_step * r.oversample)
    batch, stats = rollout.collect(self.rollout_params(), self.model_config, self.tokenizer,
                                   self.encoder, records, gen_key, p, self.verifier,
                                   next_records=self.iterator.next_batch, buffer=self.prompt_buffer,
                                   process_scorer=self.process_scorer)
    if self.prompt_buffer is not None:
      stats["filter/buffer_size"] = float(len(self.prompt_buffer))
    self._warn_fill(stats["filter/fill_frac"], step)
    t = time.perf_counter()
    self.state, metrics = self.update_fn(self.state, placement.shard_batch(batch, self.mesh), upd_key)
    metrics = placement.to_host(metrics)  # waits for the update
    series = metrics.pop("token_series", None)
    if series is not None:
      self.last_rollout = (batch, {k: np.asarray(v) for k, v in series.items()})
    stats["time/update"] = time.perf_counter() - t
    stats["time/step"] = stats["time/generate"] + stats["time/verify"] + stats["time/update"]
    trained = float(metrics.pop("response/tokens"))
    stats["tokens_per_s"] = (stats.pop("response/sampled_tokens") + trained) / max(stats["time/step"], 1e-9)
    self.step = step
    return {"epoch": self.iterator.epoch, **{k: float(np.asarray(v)) for k, v in metrics.items()}, **stats}

  FILL_WARN_FRAC = 0.25  # veRL's fill is harmless only while >= 1/oversample of the groups pass

  def _warn_fill(self, fill_frac: float, step: int) -> None:
    """Once per run: a warning when more than 25% of the step's trained groups are out of band."""
    if self._fill_warned or fill_frac <= self.FILL_WARN_FRAC or jax.process_index() != 0:
      return
    self._fill_warned = True
    mode = self.cfg.prime.filter_protocol
    what = ("are trained as filler (--filter_mode=fill: the PRM skips them, the policy does not; "
            "PRIME's process term on them is noise normalised to full size)" if mode == "fill" else
            "are masked (weight 0): the step trains on fewer groups than --prompts_per_step")
    print(f"[filter] warning (step {step}, shown once): {fill_frac:.0%} of the trained groups are "
          f"outside the accuracy band and {what}. Consider --filter_mode=resample, a larger "
          f"--oversample or --resample_max_rounds, or an easier task / lower temperature. "
          f"Per-step value: filter/fill_frac.", flush=True)

  def evaluate(self, tag: str = "") -> dict:
    """Greedy pass@1 on the eval records (`evaluation.evaluate`, one compilation); process 0
    writes `eval_stepNNNNN{tag}.json` under --logdir."""
    cfg = self.cfg
    if not self.eval_records:
      return {}
    params = self.rollout_params()
    res = evaluation.evaluate(
        params, self.model_config, self.tokenizer, self.eval_records,
        max_new_tokens=cfg.eval_max_response_length or cfg.prime.rollout.max_response_length,
        batch_size=cfg.eval_batch_size, max_prompt_length=cfg.prime.rollout.max_prompt_length,
        verify_fn=self.verifier, encoder=self.encoder, generate_fn=host_generate,
        **self._eval_env())
    report = {"eval/pass@1": res.summary["accuracy"], "eval/num": res.summary["num_problems"],
              "eval/truncated_rate": res.summary["truncated_rate"], "time/eval": res.summary["eval_seconds"]}
    p = cfg.prime
    # The PRM's quality on held-out responses. Skipped while the PRM is still the reference
    # (PRIME's default start, before any PRM update): its implicit rewards are then only the
    # float rounding between the two forward passes (~1e-5 per response in float32), no signal.
    # (--env: skipped; the held-out re-scoring reads each response as one model turn)
    if cfg.eval_prm and p.uses_prm and p.needs_ref and not p.rollout.env and not self.prm_is_reference():
      t = time.perf_counter()
      held = eval_prm.heldout_prm_auroc(
          prime.model_params(self.state, "prm", p), self.state.ref_params, self.model_config,
          self.tokenizer, self.eval_records, res.problems, beta=p.prm.beta,
          max_new_tokens=cfg.eval_max_response_length or p.rollout.max_response_length,
          batch_size=p.score_micro_batch_size, encoder=self.encoder)
      report["eval/prm_auroc"] = held.auroc
      report["time/eval_prm"] = time.perf_counter() - t
      if cfg.sample_every and cfg.logdir and jax.process_index() == 0:  # the eval's heatmap page
        from jaxrl_dense.observe import viz
        k = held.scores.shape[1]
        prompts = [pr["question"] for pr in res.problems]
        viz.write_sample_page(os.path.join(cfg.logdir, "samples"), self.step, prompts=prompts,
                              response_tokens=held.tokens, mask=held.mask,
                              outcome=held.scores.reshape(-1),
                              series={"process_reward": held.token_rewards}, n=k, tokenizer=self.tokenizer,
                              num_best=2, num_worst=2, num_disagree=2 if k > 1 else 0,
                              tag=f"eval{tag}", meta={"eval/pass@1": report["eval/pass@1"],
                                                      "eval/prm_auroc": report["eval/prm_auroc"]})
    if cfg.logdir and jax.process_index() == 0:
      evaluation.write_report(res, os.path.join(cfg.logdir, f"eval_step{self.step:05d}{tag}.json"),
                              step=self.step, model=cfg.model, eval_data=cfg.eval_data)
    return report

  def _eval_env(self) -> dict:
    """--env: the eval runs the same multi-turn episodes as the rollout (greedy), with paused rows
    on the continuous engine."""
    r = self.cfg.prime.rollout
    if not r.env:
      return {}
    from jaxrl_dense import envs
    return {"env": envs.make_env(r.env, max_turns=r.max_turns), "max_turns": r.max_turns,
            "paused": r.rollout_engine == "continuous"}

  def prm_is_reference(self) -> bool:
    """True while the PRM computes the reference's log-probs exactly: its weights equal the
    reference's leaf for leaf, or (LoRA) every adapter B is still zero on the shared base."""
    p = self.cfg.prime
    if not (p.uses_prm and p.needs_ref) or self.state.prm is None:
      return False
    prm = self.state.prm.params
    if p.prm_lora is not None:
      return all(not np.any(np.asarray(leaf)) for path, leaf in jax.tree_util.tree_leaves_with_path(prm)
                 if "lora_b" in jax.tree_util.keystr(path))
    ref = self.state.ref_params
    if jax.tree.structure(prm) != jax.tree.structure(ref):
      return False
    return all(x.shape == y.shape and x.dtype == y.dtype and bool(jnp.array_equal(x, y))
               for x, y in zip(jax.tree.leaves(prm), jax.tree.leaves(ref)))

  def policy_params(self):
    """The policy as the model functions take it (LoRA: the base with the adapters attached)."""
    return prime.model_params(self.state, "policy", self.cfg.prime)

  def rollout_params(self):
    """The sampler's copy of the policy, made once per rollout (`inference.rollout_params`): cast to
    the compute dtype (--dtype=bfloat16: half the bytes of the float32 masters, the same values
    every matmul reads) and resharded to the decode layout (--rollout_mesh: tensor-parallel on that
    mesh), so no decode step gathers master weights. Dropped after the rollout; the training state
    is not touched."""
    policy = self.policy_params()
    return inference.rollout_params(policy, self.model_config, self.rollout_mesh,
                                   dtype=self.cfg.dtype, layout=self._rollout_layout)

  def export(self, directory: str, which: str = "policy"):
    """Writes the trained policy (or "prm") as a Hugging Face directory (`save_pretrained`);
    LoRA adapters are merged into the base first (W + alpha/r A B)."""
    from jaxrl_dense.models import loading, lora
    params = prime.model_params(self.state, which, self.cfg.prime)
    if isinstance(params, dict) and "lora" in params:
      params = jax.jit(lora.merge_attached)(params)
    params = placement.to_host(params)  # a collective on several processes: every process calls
    if jax.process_index() == 0:
      return loading.save_pretrained(params, self.model_config, self.tokenizer, directory)
    return None

  def write_samples(self, out_dir: str, **kwargs) -> dict:
    """`viz.write_sample_page` of the last step's trained groups (needs --sample_every > 0):
    `<out_dir>/step_NNNNN.html` with the per-token series of `make_prime(token_series=True)`; the
    best, the worst and the group where the PRM's return and the outcome disagree most."""
    from jaxrl_dense.observe import viz
    if self.last_rollout is None:
      raise RuntimeError("write_samples: no step has run with token series (--sample_every > 0)")
    batch, series = self.last_rollout
    n = self.cfg.prime.rollout.n
    prompts = [self.tokenizer.decode(np.asarray(batch.prompt_tokens[g])[np.asarray(batch.prompt_mask[g]) > 0]
                                     .tolist(), skip_special_tokens=False)
               for g in range(0, batch.num_rows, n)]
    meta = {"algo": self.cfg.prime.algo, "model": self.cfg.model}
    return viz.write_sample_page(out_dir, self.step, prompts=prompts, response_tokens=batch.response_tokens,
                                 mask=batch.response_mask, outcome=batch.outcome, series=series, n=n,
                                 tokenizer=self.tokenizer, meta=meta,
                                 observation_mask=batch.observation_mask, **kwargs)

  def checkpoint(self, history=()) -> tuple:
    """(state tree, meta): the trained states, and step / data-iterator state / history / model."""
    from jaxrl_dense import checkpoint as ckpt_lib
    meta = {"step": self.step, "data_state": self.iterator.get_state(), "history": list(history),
            "model_config": ckpt_lib.make_fingerprint(self.model_config)}
    if self.prompt_buffer is not None:  # resample's buffered prompts: part of the data state
      meta["prompt_buffer"] = self.prompt_buffer.get_state()
    return prime.checkpoint_tree(self.state), meta

  def restore(self, tree, meta) -> list:
    """Loads a `checkpoint()`; returns the metrics history it carried."""
    from jaxrl_dense import checkpoint as ckpt_lib
    if meta.get("model_config") != ckpt_lib.make_fingerprint(self.model_config):
      raise ckpt_lib.CheckpointMismatchError("the checkpoint was written for another model config")
    self.state = prime.restore_tree(self.state, tree)
    self.iterator.set_state(meta["data_state"])
    if self.prompt_buffer is not None:
      self.prompt_buffer.set_state(meta.get("prompt_buffer", []))
    self.step = int(meta["step"])
    return list(meta["history"])

  def save(self, ckpt, history=(), force: bool = False) -> bool:
    """Writes `checkpoint(history)` as step `self.step` of `ckpt` (a `checkpoint.Checkpointer`);
    True when a step was written (`Checkpointer.save`: its cadence, unless `force`)."""
    tree, meta = self.checkpoint(history)
    return ckpt.save(self.step, tree, meta, force=force)

  def resume(self, ckpt) -> list:
    """Restores the newest readable step of `ckpt` (a `checkpoint.Checkpointer`); returns the
    metrics history it carried."""
    target, _ = self.checkpoint()
    tree, meta = ckpt.restore(target=target)
    return self.restore(tree, meta)

  def close(self) -> None:
    self.verifier.close()
