"""PRIME (and its outcome-only baselines) as one jitted update: `make_prime(model_config, cfg)`.

    init_fn, update_fn = make_prime(model_config, cfg, mesh=None)
    state = init_fn(policy_params, prm_params, ref_params)
    state, metrics = update_fn(state, batch, key)      # batch: RolloutBatch of B = G·n rows

`update_fn` is ONE jitted program (explicit in/out shardings on a mesh, the state donated), the
whole of PRIME (Cui et al., arXiv 2502.01456) for one rollout batch:

  1. scoring (no grad): old policy log-probs π_old (at the rollout temperature) and entropy,
     unless bypass (`--recompute_old_logp=false`: π_old := μ, the sampler's `batch.sampler_logp`);
     reference log-probs. Decoupled (three policies μ, π_old, π_θ): the rollout correction
     between μ and π_old (`losses.rollout_correction`: truncated IS weights on each token's loss,
     a rejection mask on the loss and its count; `rollout_corr/*` metrics whenever μ is given).
  2. implicit-PRM update (PRIME, arXiv 2502.01456; loss `cfg.prm.prm_loss`) on the in-band groups
     (`batch.in_band`; all rows with --prm_on_filler), then with `prm_update="before"`
     a re-scoring with the updated PRM (double forward), else the in-loop scores (single forward).
  3. PROF (`filter="prof"`, arXiv 2509.03403): keep mask from the PRM's step scores; the dropped
     responses leave the advantage and the policy loss (survivors-only leave-one-out, as PROF's
     GRPO on the filtered batch).
  4. rewards: outcome reward = outcome label (+ w·R_SA with `extra_reward="sar:w"`), PRIME implicit token rewards
     r_t = β (log π_prm − log π_ref) batch-normalised (veRL's PRIME recipe), then the estimator
     `advantages.ESTIMATORS[cfg.estimator]` (one calling convention).
  5. PPO-clip update over epochs × mini-batches × micro-batches (global token-count normaliser).
  With --filter_mode=mask|resample the out-of-band rows carry weight 0 in steps 2-6 (the fixed
  shape stays): the update then equals the update on the in-band rows alone (tested for PRIME,
  RLOO and GRPO with one PRM and one PPO mini-batch per step).
  6. metrics: KL(old ‖ ref) on the response tokens, entropy, PRM accuracy, advantage statistics.

The stages pass one `RolloutBatch` along and fill it in with `_replace` (old_logp, ref_logp,
prm_logp, keep, advantages / returns, weights, rollout_is_weights / rollout_rs_keep), as
purejaxrl's `Transition` goes from the environment step to the loss.
The update is the composition of named pure stages, `score -> update_prm -> advantages ->
update_policy -> step_metrics`; the PRM and policy passes share one shape,
`(state, batch, key) -> (state, batch, metrics)`. The state's layout on a mesh is decided at build
time from abstract shapes (`abstract_state`, `state_shardings`) and the update jitted once with it.
`make_stages` returns the stages themselves (pure, unjitted), which `rl.programs` compiles one by
one for memory plans and layout tests.
Inside, `jax.named_scope`s ("score", "prm_update", "prm_score", "advantage", "policy_update")
so a profiler trace (`jax.profiler`) shows per-stage time without host synchronisation.
The outcome-only algos (`algo=grpo|rloo|reinforce_pp`, `advantage=prl|...`) come from the same
builder: no PRM state, no PRM stages.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxrl_dense import advantages as adv_lib
from jaxrl_dense import _deprecation, losses, ops
from jaxrl_dense.observe import prm_health
from jaxrl_dense.parallel import mesh as mesh_lib, rules, placement
from jaxrl_dense.rewards import overlong as overlong_lib
from jaxrl_dense.filters import prof as prof_lib
from jaxrl_dense.rewards import implicit_prm, implicit_prm_objectives
from jaxrl_dense.rewards import sar as sar_lib
from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl import steps
from jaxrl_dense.rl.batch import RolloutBatch
from jaxrl_dense.rl.state import TrainState, init_train_state, make_optimizer


class PrimeState(NamedTuple):
  """policy, prm: TrainState (prm None for the outcome-only algos); ref_params: frozen reference
  params or None (not needed). `checkpoint_tree` / `restore_tree` give what a checkpoint holds."""
  policy: TrainState
  prm: Optional[TrainState]
  ref_params: Any


def checkpoint_tree(state: PrimeState) -> dict:
  """{"policy": {params, opt_state, step}, "prm": ...}: the trained parts (the reference is the
  frozen checkpoint it was loaded from)."""
  tree = {"policy": state.policy._asdict()}
  if state.prm is not None:
    tree["prm"] = state.prm._asdict()
  return tree


def restore_tree(state: PrimeState, tree: dict) -> PrimeState:
  prm = TrainState(**tree["prm"]) if state.prm is not None else None
  return state._replace(policy=TrainState(**tree["policy"]), prm=prm)


def model_params(state: PrimeState, which: str, cfg: Optional[config_lib.PrimeConfig] = None):
  """The params of the state's "policy" or "prm" model as the model functions take them: the
  trained params, or with LoRA (`cfg.policy_lora` / `cfg.prm_lora`; pass `cfg` outside
  `make_prime`) `lora.attach(state.ref_params, adapters)`: the frozen base plus the adapters
  (sampling, scoring and evaluation use this; the sampler merges them once per call)."""
  ts = state.policy if which == "policy" else state.prm
  lc = None
  if cfg is not None:
    lc = cfg.policy_lora if which == "policy" else cfg.prm_lora
  elif _is_adapters(ts.params):
    raise ValueError("model_params: these params are LoRA adapters; pass the PrimeConfig (cfg)")
  if lc is None:
    return ts.params
  from jaxrl_dense.models import lora  # pylint: disable=import-outside-toplevel
  return lora.attach(state.ref_params, ts.params, lc)


def _is_adapters(params) -> bool:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return bool(leaves) and all(str(getattr(p[-1], "key", "")) in ("lora_a", "lora_b") for p, _ in leaves)


@_deprecation.renamed_kwargs(acc="outcome")
def prof_keep(outcome, mask, prm_logp, ref_logp, *, beta: float, n: int, k: int, step_len: int):
  """PROF keep mask [B] (arXiv 2509.03403) on the implicit PRM's step scores.

  v_h = σ(β Σ_{s ≤ e(h)} (log π_prm − log π_ref)_s): the PRM's probability that the prefix ending
  at step h's last token (fixed `step_len` steps) leads to a correct answer; then
  c = prof_consistency(v, step_mask, outcome) (code variant) and prof_filter removes k responses per
  group of n, balancing correct / incorrect. Shapes: outcome [B], mask / log-probs [B, R] -> bool [B].
  """
  m = mask.astype(jnp.float32)  # [B, R]
  step_ids = ops.fixed_length_step_ids(m, step_len)  # [B, R]
  num_steps = -(-m.shape[1] // step_len)
  # Q_h = β Σ_{s ≤ e(h)} q_s: the implicit PRM's accumulative step reward (PRIME's eval get_reward)
  big_q, step_mask = implicit_prm_objectives.implicit_step_rewards(
      prm_logp, ref_logp, m, step_ids, num_steps, beta=beta, mode="accumulative")  # [B, S] x2
  v = jnp.where(step_mask > 0, jax.nn.sigmoid(big_q), 0.0)  # [B, S]
  c = prof_lib.prof_consistency(v, step_mask, outcome)  # [B]
  g = outcome.shape[0] // n
  return prof_lib.prof_filter(outcome, c, ops.contiguous_group_ids(g, n), g, n_remove=k)


# Moved to their topics; still importable here (same objects).
position_bin_means, POSITION_BINS = prm_health.position_bin_means, prm_health.POSITION_BINS
survivor_rows = prof_lib.survivor_rows


def _weighted_corr(x, y, w):
  """Pearson correlation of x and y [B] under row weights w [B]; 0 where either has no variance
  (e.g. step 1's process rewards, 0 by the float-noise guard), so the metric stays finite."""
  w = w / jnp.maximum(jnp.sum(w), 1e-12)
  dx, dy = x - jnp.sum(w * x), y - jnp.sum(w * y)
  vx, vy = jnp.sum(w * dx * dx), jnp.sum(w * dy * dy)
  ok = (vx > 0) & (vy > 0)
  return jnp.where(ok, jnp.sum(w * dx * dy) / jnp.sqrt(jnp.where(ok, vx * vy, 1.0)), 0.0)


def make_advantage_fn(cfg: config_lib.PrimeConfig):
  """Pure `(batch: RolloutBatch, extra=None) -> (batch with advantages, returns [B, R], stats)`.

  Reads the batch's outcome [B], response_mask [B, R], old_logp, ref_logp (None: old_logp stands in),
  prm_logp (PRIME), keep, in_band, process_rewards, turn_rewards, turn_ids; `extra` [B]: the
  Self-Aligned Reward R_SA (extra_reward "sar:w").

  `turn_rewards` [B, K], `turn_ids` [B, R]: a multi-turn rollout's turn rewards and token turns
  (--advantage=matchtir reads them).

  `process_rewards` [B, R]: with --process_reward, the served PRM's token rewards, PRIME's RLOO
  process term in place of the implicit PRM's (no batch norm: the PRM's own scale, e.g. p1 - p0
  in [-1, 1]).

  outcome reward = outcome label (+ w·extra with extra_reward "sar:w": R = R_verifiable + w·R_SA, arXiv 2509.05489;
  + R_len with --overlong_buffer, DAPO's overlong shaping, rewards/overlong.py);
  PRIME: process rewards = prime_batch_norm(zero_float_noise(implicit_token_rewards(prm_logp,
  ref_logp))): exactly 0 while every implicit log-ratio suffix sum is below --prm_noise_tol (the
  PRM still equals the reference up to float rounding). With a PROF `keep` mask [B] (exactly
  n − k per group) everything is computed over the survivors only (groups of n − k, batch norm
  and whitening over the survivors) and the dropped rows get 0.

  `in_band` [B] (RolloutBatch.in_band; None = all 1): with --filter_mode=mask|resample
  (`cfg.masks_filler`) the out-of-band rows are a `row_mask` of 0 for the batch-norm max, the
  leave-one-out, the whitening and the logged means (their advantages and returns are 0); with
  fill and --process_on_filler=false only their process rewards are 0 (and out of the batch-norm).
  The PRM metrics (prm/dpo_acc, prm_health/*) use every row's label. Diagnostics:
  filter/filler_adv_share = Σ|A| on out-of-band rows / Σ|A|; adv/process_length_corr =
  corr(L_i, mean_t of row i's process-only return) over the trained rows (0 without variance);
  prm/implicit_reward_pos{1..4} = mean β·q by quarter of the response.
  """
  n = cfg.rollout.n
  extra_w = cfg.extra_reward_weight
  estimator = adv_lib.ESTIMATORS.get(cfg.estimator)
  masks = cfg.masks_filler
  proc_masked = masks or not cfg.filter.process_on_filler

  def hp(group):
    return adv_lib.AdvantageParams(n=group, reference_impl=cfg.reference_impl, process_coef=cfg.process_coef,
                                   outcome_coef=cfg.outcome_coef, gamma=cfg.gamma, prl_eta=cfg.prl_eta,
                                   igpo_variant=cfg.igpo_variant)

  def fn(batch: RolloutBatch, extra=None):
    outcome, old_logp, prm_logp, keep, in_band = batch.outcome, batch.old_logp, batch.prm_logp, batch.keep, batch.in_band
    ref_logp = batch.ref_logp if batch.ref_logp is not None else old_logp
    external, turn_rewards, turn_ids = batch.process_rewards, batch.turn_rewards, batch.turn_ids
    m = batch.response_mask.astype(jnp.float32)  # [B, R]
    ones = jnp.ones(m.shape[:1], jnp.float32)
    band = ones if in_band is None else (in_band > 0).astype(jnp.float32)  # [B]
    w = band if masks else ones  # [B] rows of the advantage, the policy update and the means
    w_proc = w * band if proc_masked else w  # [B] rows that get a process reward
    stats = {}
    outcome_reward = outcome  # [B] the verifier label, shaped below
    if cfg.overlong_buffer:  # DAPO overlong shaping: R = R_verifier + R_len (rewards/overlong.py)
      r_len = overlong_lib.overlong_penalty(m, max_length=cfg.rollout.max_response_length,
                                            buffer=cfg.overlong_buffer, factor=cfg.overlong_penalty)
      outcome_reward = outcome_reward + r_len
      stats["reward/overlong_mean"] = ops.masked_mean(r_len, w)
      stats["reward/overlong_frac"] = ops.masked_mean((r_len < 0).astype(jnp.float32), w)
    if extra is not None:
      outcome_reward = sar_lib.combine_with_sar(outcome, extra, factor=extra_w)  # [B]
      stats["extra/sar_mean"] = jnp.mean(extra)
      stats["extra/reward_mean"] = jnp.mean(outcome_reward)
    if cfg.uses_prm:
      rw = implicit_prm.implicit_token_rewards(prm_logp, ref_logp, m, beta=cfg.prm.beta,
                                               reference_impl=cfg.reference_impl)
      stats.update(implicit_prm.prm_metrics(rw.q, m, outcome, n=n))
      # PRM health on this step's fresh samples (scored before the PRM trains on them with
      # --prm_update=after): AUROC / correlation with the outcome; NaN when all labels agree.
      stats.update({k: v for k, v in prm_health.prm_health_metrics(
          rw.scores, rw.q, m, outcome, n=n, beta=cfg.prm.beta).items() if not k.endswith("pairwise_acc")})
      stats["prm/q_seq_mean"] = jnp.sum(w * jnp.sum(rw.q, axis=1)) / jnp.maximum(jnp.sum(w), 1.0)
      for i, v in enumerate(position_bin_means(cfg.prm.beta * rw.q, m, w)):
        stats[f"prm/implicit_reward_pos{i + 1}"] = v
    rows, group = None, n
    if keep is not None:
      group = n - cfg.prof_k
      rows = survivor_rows(keep, n, cfg.prof_k)  # [G*(n-k)]
    take = (lambda x: x) if rows is None else (lambda x: None if x is None else jnp.take(x, rows, axis=0))
    ms = take(m)
    ws = take(w)
    process = None
    if cfg.uses_prm:
      rs = implicit_prm.implicit_token_rewards(take(prm_logp), take(ref_logp), ms, beta=cfg.prm.beta,
                                               reference_impl=cfg.reference_impl)
      wp = take(w_proc) if proc_masked else None
      scores = implicit_prm.zero_float_noise(rs.scores, rs.q, tol=cfg.prm.prm_noise_tol, row_mask=wp)
      process = implicit_prm.prime_batch_norm(scores, row_mask=wp)  # [B', R]
      stats["prm/process_reward_mean"] = ops.masked_mean(process, ms * ws[:, None])
    elif cfg.process_reward:  # a served PRM's step rewards, placed on the tokens (external_reward)
      if external is None:
        raise ValueError("--process_reward is set but RolloutBatch.process_rewards is None (the "
                         "rollout did not score the batch with the served PRM)")
      process = take(external).astype(jnp.float32) * ms
      if proc_masked:
        process = process * take(w_proc)[:, None]
      stats["reward/process_reward_mean"] = ops.masked_mean(process, ms * ws[:, None])
    inputs = adv_lib.AdvantageInputs(
        outcome=take(outcome_reward), mask=ms, process_rewards=process, old_logp=take(old_logp),
        ref_logp=take(ref_logp), step_ids=ops.fixed_length_step_ids(ms, cfg.step_len),
        row_mask=ws if masks else None, turn_rewards=take(turn_rewards), turn_ids=take(turn_ids))
    if turn_rewards is not None:
      stats["reward/turn_reward_sum"] = jnp.sum(turn_rewards * w[:, None]) / jnp.maximum(jnp.sum(w), 1.0)
    adv, ret = estimator(inputs, hp(group))  # [B', R] each
    if process is not None:  # the process term alone: its return's row mean against the length
      gammas = {} if cfg.reference_impl == "verl" else {"process_gamma": cfg.gamma}
      proc_ret = adv_lib.prime_rloo_advantages(
          process, None, ms, n=group, reference_impl=cfg.reference_impl, process_coef=cfg.process_coef,
          whiten=False, row_mask=ws if masks else None, **gammas)[1]  # [B', R]
      stats["adv/process_length_corr"] = _weighted_corr(
          jnp.sum(ms, axis=1), ops.masked_mean(proc_ret, ms, axis=1), ws)
    if rows is not None:
      adv = jnp.zeros_like(m).at[rows].set(adv)
      ret = jnp.zeros_like(m).at[rows].set(ret)
      m = m * keep[:, None].astype(jnp.float32)
    abs_a = jnp.sum(jnp.abs(adv) * m, axis=1)  # [B]
    stats["filter/filler_adv_share"] = jnp.sum(abs_a * (1.0 - band)) / jnp.maximum(jnp.sum(abs_a), 1e-12)
    m = m * w[:, None]  # the logged means: trained rows only
    stats["adv/mean"] = ops.masked_mean(adv, m)
    stats["adv/std"] = jnp.sqrt(ops.masked_mean(jnp.square(adv - ops.masked_mean(adv, m)), m))
    stats["adv/max"] = jnp.max(jnp.where(m > 0, adv, -jnp.inf))
    stats["adv/min"] = jnp.min(jnp.where(m > 0, adv, jnp.inf))
    stats["returns/mean"] = ops.masked_mean(ret, m)
    return batch._replace(advantages=adv, returns=ret), stats

  return fn


def optimizers(cfg: config_lib.PrimeConfig):
  """(policy optimizer, PRM optimizer or None): AdamW + global-norm clip."""
  p, q = cfg.policy, cfg.prm
  mu = jnp.bfloat16 if cfg.moments_dtype == "bfloat16" else None
  pol = make_optimizer(p.lr, weight_decay=p.weight_decay, grad_clip=p.grad_clip, mu_dtype=mu)
  prm = (make_optimizer(q.prm_lr, weight_decay=q.prm_weight_decay, grad_clip=q.prm_grad_clip, mu_dtype=mu)
         if cfg.uses_prm else None)
  return pol, prm


def abstract_state(model_config, cfg: config_lib.PrimeConfig) -> PrimeState:
  """The PrimeState `make_prime`'s init_fn builds, as `jax.ShapeDtypeStruct`s (nothing allocated):
  policy (and PRM) params of `model_config` (LoRA: the adapters) with their AdamW states and step
  counters, and the frozen reference / LoRA base in the compute dtype when the config keeps one.
  Its structure and shapes decide the layout (`state_shardings`); a loaded checkpoint has the same."""
  from jaxrl_dense.models import lora, transformer  # pylint: disable=import-outside-toplevel
  pol_opt, prm_opt = optimizers(cfg)

  def train_state(opt, lc, key):
    params = transformer.init_params(model_config, key) if lc is None else lora.init_adapters(model_config, lc, key)
    return TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))

  def init(key):
    ref = lora.freeze_base(transformer.init_params(model_config, key), model_config)[0] if cfg.keeps_base else None
    return PrimeState(train_state(pol_opt, cfg.policy_lora, key),
                      train_state(prm_opt, cfg.prm_lora, key) if cfg.uses_prm else None, ref)

  return jax.eval_shape(init, jax.random.PRNGKey(0))


def state_shardings(model_config, cfg: config_lib.PrimeConfig, mesh) -> PrimeState:
  """The layout of the state on `mesh`, decided from abstract shapes (MaxText's
  `get_functional_train_with_signature`): params by `rules.param_shardings` (FSDP + tensor
  rules of parallel/rules.py), AdamW moments like their params (`placement.opt_state_shardings`),
  step counters replicated. A PrimeState of `NamedSharding`s (None where the state holds None)."""
  shapes = abstract_state(model_config, cfg)
  rep = placement.replicated(mesh)

  def train_state(ts):
    ps = rules.param_shardings(ts.params, model_config, mesh)
    return TrainState(ps, placement.opt_state_shardings(ts.opt_state, ts.params, mesh, param_sharding_tree=ps), rep)

  ref = shapes.ref_params
  return PrimeState(train_state(shapes.policy), train_state(shapes.prm) if shapes.prm is not None else None,
                    rules.param_shardings(ref, model_config, mesh) if ref is not None else None)


class Prime(tuple):
  """What `make_prime` builds; unpacks as `init_fn, update_fn = make_prime(...)`.

  init_fn(policy_params, prm_params=None, ref_params=None) -> PrimeState;
  update_fn(state, batch, key) -> (state, metrics): the ONE jitted program
    (`update_fn.lower(*abstract_args).compile()` gives its compiled plan);
  state_shardings: the state's layout, a PrimeState of NamedShardings (`state_shardings(...)`;
    None without a mesh); batch_sharding: the batch's (every [B, ...] leaf along (data, fsdp)).
  """

  def __new__(cls, init_fn, update_fn, state_shardings=None, batch_sharding=None):
    self = super().__new__(cls, (init_fn, update_fn))
    self.init_fn, self.update_fn = init_fn, update_fn
    self.state_shardings, self.batch_sharding = state_shardings, batch_sharding
    return self


class Stages(NamedTuple):
  """The named pure stages of the update (`make_stages`), in the order `update` chains them; one
  `RolloutBatch` goes through them and each fills its fields in with `_replace`.

  score(state, batch) -> (batch, entropy, extra): pi_old (and its entropy [B, R] or None), the
    reference's log-probs, SAR's R_SA [B] (or None); reads the policy's params (and the frozen
    reference / LoRA base) of the state.
  update_prm(state, batch, key) -> (prm_state, batch, metrics): the implicit-PRM pass (and with
    --prm_update=before the re-scoring); reads state.prm (and the LoRA base).
  advantages(batch, extra) -> (batch, metrics): PROF's keep mask, the estimator, the row weights.
  update_policy(state, batch, key) -> (policy_state, batch, metrics): the rollout correction, then
    the PPO pass; reads state.policy (and the LoRA base).
  step_metrics(batch, entropy, metrics) -> metrics: KL(old || ref), entropy, token count, series.
  update(state, batch, key) -> (state, metrics): their composition, the function `make_prime`
    jits (once, with the state's layout); `rl.programs` jits the stages one by one.
  """
  score: Callable
  update_prm: Callable
  advantages: Callable
  update_policy: Callable
  step_metrics: Callable
  update: Callable


def make_stages(model_config, cfg: config_lib.PrimeConfig, mesh=None, *,
                token_series: bool = False) -> Stages:
  """The pure stages of PRIME's update and their composition (`Stages`), nothing jitted: what
  `make_prime` jits as one program and `rl.programs` compiles stage by stage.

  `mesh` only sets the policy loss's data-parallel shard count (`loss_shards`, read by
  --loss_norm=device_micro_batch); the stages trace under whatever mesh their caller's jit sets
  (`sharding.with_mesh`). `token_series`: see `make_prime`.
  """
  n = cfg.rollout.n
  group = cfg.prompt_group
  temp = cfg.rollout.temperature
  pol_opt, prm_opt = optimizers(cfg)
  score_mb = cfg.score_micro_batch_size
  logprobs = lambda **kw: steps.make_logprobs(model_config, micro_batch_size=score_mb, group_size=group, **kw)
  score_old = logprobs(temperature=temp, with_entropy=True)  # pi_old and its entropy
  score_sar = logprobs(temperature=temp)  # pi_old without entropy (SAR's answer-only pass)
  score_ref = score_prm = logprobs()  # the reference / the PRM at T = 1
  p = cfg.policy
  bypass = not p.recompute_old_logp
  policy_pass = steps.make_policy_update(
      model_config, pol_opt, p, reference_impl=cfg.reference_impl, bypass=bypass,
      loss_shards=mesh_lib.batch_divisor(mesh) if mesh is not None else 1,
      mini_batch_size=cfg.policy_mini, micro_batch_size=p.micro_batch_size, epochs=p.epochs,
      shuffle=p.shuffle, group_size=group, shuffle_group_size=cfg.shuffle_group, temperature=temp,
      lora_config=cfg.policy_lora)
  prm_pass = None
  if cfg.uses_prm:
    prm_pass = steps.make_prm_update(
        model_config, prm_opt, beta=cfg.prm.beta, mini_batch_size=cfg.prm_mini,
        micro_batch_size=cfg.prm.prm_micro_batch_size, loss_fn=cfg.prm.prm_loss, num_samples=n,
        group_size=group, lora_config=cfg.prm_lora, train_on_filler=cfg.filter.prm_on_filler)
  advantage_fn = make_advantage_fn(cfg)
  sar = cfg.extra_reward_name == "sar"

  pol_lora, prm_lora = cfg.policy_lora, cfg.prm_lora
  pol_base = lambda state: state.ref_params if pol_lora is not None else None
  prm_base = lambda state: state.ref_params if prm_lora is not None else None

  def score(state: PrimeState, batch: RolloutBatch):
    """Stage 1 (no grad): pi_old (recomputed, or mu in bypass) and its entropy [B, R], the
    reference's log-probs, SAR's R_SA [B] (or None). -> (batch, entropy, extra)."""
    pol_params = model_params(state, "policy", cfg)
    with jax.named_scope("score"):
      entropy = None
      if not bypass:  # decoupled: pi_old recomputed by the trainer
        old_logp, entropy = score_old(pol_params, batch)  # [B, R] each
      else:  # bypass: pi_old := mu (equal to the scorer's in f32, T = 1, no top-p/k; else --rollout_rs)
        old_logp = batch.sampler_logp
      batch = batch._replace(old_logp=old_logp)
      if batch.ref_logp is None and cfg.needs_ref:
        batch = batch._replace(ref_logp=score_ref(state.ref_params, batch))
    extra = None
    if sar:  # R_SA from the behaviour policy's answer log-probs with and without the query
      logp_a = score_sar(pol_params, batch.query_free())
      extra = sar_lib.self_aligned_reward(batch.old_logp, logp_a, batch.response_mask.astype(jnp.float32))  # [B]
    return batch, entropy, extra

  def update_prm(state: PrimeState, batch: RolloutBatch, key):
    """Stage 2: the implicit-PRM pass on the in-band groups (all rows with --prm_on_filler), then
    with --prm_update=before the re-scoring with the updated PRM. -> (prm state, batch, metrics)."""
    if not cfg.uses_prm:
      return state.prm, batch, {}
    with jax.named_scope("prm_update"):
      prm_state, batch, metrics = prm_pass(state.prm, batch, key, prm_base(state))
    if cfg.prm.prm_update == "before":  # double forward: re-score with the updated PRM
      with jax.named_scope("prm_score"):
        batch = batch._replace(prm_logp=score_prm(
            model_params(state._replace(prm=prm_state), "prm", cfg), batch))
    return prm_state, batch, metrics

  def advantages(batch: RolloutBatch, extra):
    """Stage 3: PROF's keep mask (filter=prof), the advantage estimator, and the row weights of
    --filter_mode=mask|resample (out-of-band rows leave the PPO loss). -> (batch, metrics)."""
    metrics = {}
    m = batch.response_mask.astype(jnp.float32)  # [B, R]
    in_band = batch.in_band  # [B] or None (all in band)
    w = in_band.astype(jnp.float32) if (cfg.masks_filler and in_band is not None) else None
    if cfg.filter.filter == "prof":
      keep = prof_keep(batch.outcome, m, batch.prm_logp, batch.ref_logp, beta=cfg.prm.beta, n=n, k=cfg.prof_k,
                       step_len=cfg.step_len)  # [B]
      batch = batch._replace(keep=keep)
      metrics["filter/prof_keep_frac"] = jnp.mean(keep.astype(jnp.float32))
    with jax.named_scope("advantage"):
      batch, adv_stats = advantage_fn(batch, extra=extra)
      metrics.update(adv_stats)
    return batch._replace(weights=w), metrics  # masked rows: out of the PPO loss and its token count

  def trained_tokens(batch: RolloutBatch):
    """[B, R] the response tokens of the rows the policy trains on (the logged means)."""
    m = batch.response_mask.astype(jnp.float32)
    return m if batch.weights is None else m * batch.weights[:, None]

  def update_policy(state: PrimeState, batch: RolloutBatch, key):
    """Stage 4: the rollout correction between mu and pi_old (three policies), then the PPO pass.
    -> (policy state, batch, metrics)."""
    metrics = {}
    mu = batch.sampler_logp
    if mu is not None and not bypass:  # three policies: correct the sampler -> trainer mismatch
      corr = losses.rollout_correction(batch.old_logp, mu, trained_tokens(batch), is_level=p.rollout_is,
                                       is_threshold=p.rollout_is_threshold, rs_level=p.rollout_rs,
                                       rs_low=p.rollout_rs_low, rs_high=p.rollout_rs_high,
                                       rs_k3_max=p.rollout_rs_k3_max)
      metrics.update({"rollout_corr/" + k: v for k, v in corr.metrics.items()})
      if p.rollout_rs != "none":  # rejected tokens leave the loss and its count
        batch = batch._replace(rollout_rs_keep=corr.keep)
      if p.rollout_is != "none":
        batch = batch._replace(rollout_is_weights=corr.weights)
    with jax.named_scope("policy_update"):
      policy, batch, pol_m = policy_pass(state.policy, batch, key, pol_base(state))
      metrics.update(pol_m)
    return policy, batch, metrics

  def step_metrics(batch: RolloutBatch, entropy, metrics):
    """Stage 5: KL(old ‖ ref) and entropy on the trained tokens, the token count, and (with
    token_series) the per-token series. -> metrics."""
    m = batch.response_mask.astype(jnp.float32)
    mw = trained_tokens(batch)
    old_logp, ref_logp = batch.old_logp, batch.ref_logp
    ntok = jnp.maximum(jnp.sum(mw), 1.0)
    out = {}
    out["entropy"] = (jnp.sum(entropy * mw) / ntok if entropy is not None
                      else metrics["actor/entropy"])  # the update's (first mini-batch) entropy
    out["kl_ref"] = (jnp.sum((old_logp - ref_logp) * mw) / ntok if ref_logp is not None
                     else jnp.float32(jnp.nan))  # NaN: no reference scored
    out["response/tokens"] = jnp.sum(m)  # every row the update ran (throughput)
    if token_series:
      series = {"advantage": batch.advantages, "return": batch.returns}
      if ref_logp is not None:
        series["log_ratio_ref"] = (old_logp - ref_logp) * m
      if cfg.uses_prm:
        series["process_reward"] = implicit_prm.implicit_token_rewards(
            batch.prm_logp, ref_logp, m, beta=cfg.prm.beta, reference_impl=cfg.reference_impl).scores
      if entropy is not None:
        series["entropy"] = entropy * m
      out["token_series"] = series
    return out

  def update(state: PrimeState, batch: RolloutBatch, key):
    # One typed batch through every stage: each fills its fields in with `_replace`.
    batch = batch.check(n)
    if batch.sampler_logp is None and (bypass or p.corrects_rollout):
      raise ValueError("RolloutBatch.sampler_logp is None, but --recompute_old_logp=false (bypass) "
                       "and --rollout_is/--rollout_rs read the sampler's log-probs")
    batch, entropy, extra = score(state, batch)
    prm_state, batch, metrics = update_prm(state, batch, key)
    batch, adv_m = advantages(batch, extra)
    policy, batch, pol_m = update_policy(state, batch, key)
    metrics = {**metrics, **adv_m, **pol_m}
    metrics.update(step_metrics(batch, entropy, metrics))
    return PrimeState(policy, prm_state, state.ref_params), metrics

  return Stages(score, update_prm, advantages, update_policy, step_metrics, update)


def make_prime(model_config, cfg: config_lib.PrimeConfig, mesh=None, *, token_series: bool = False) -> Prime:
  """Builds `(init_fn, update_fn)` for PRIME or an outcome-only baseline (see the module docstring).

  As MaxText's `get_functional_train_with_signature` and purejaxrl's `make_train`: the layout is
  decided here, from abstract shapes (`state_shardings`), and the update is jitted here, once,
  with explicit in / out shardings and the state donated. The update is the composition of named
  pure stages, each `(…, batch, …) -> (…, batch, metrics)`: score -> update_prm -> advantages ->
  update_policy -> step_metrics (`make_stages`; `rl.programs` compiles them one by one).

  Args:
    model_config: the policy's ModelConfig (the PRM and the reference share its architecture).
    cfg: a validated PrimeConfig.
    mesh: a `jax.sharding.Mesh` (params / optimizer states sharded by `state_shardings`,
      batches along (data, fsdp)), or None (single device, plain jit).
  Returns:
    Prime(init_fn, update_fn) (unpacks as a pair; `.state_shardings`, `.batch_sharding`).
    init_fn(policy_params, prm_params=None, ref_params=None) -> PrimeState: the one state
      constructor; the params are placed into `state_shardings` on a mesh (no copy where already
      placed) and the optimizer states initialised straight into theirs. Pass separate copies,
      since the state is donated.
    update_fn(state, batch: RolloutBatch, key) -> (state, metrics dict of scalars). With
      `token_series=True` the metrics also hold `"token_series"`: {name: [B, R] float32} of the
      batch's per-token "advantage", "return", "log_ratio_ref" (log pi_old - log pi_ref, when a
      reference is scored), "process_reward" (the implicit PRM's token reward, PRIME) and
      "entropy" (when the old log-probs are recomputed): what `viz.write_sample_page` draws.
  """
  stages = make_stages(model_config, cfg, mesh, token_series=token_series)
  update = stages.update
  pol_opt, prm_opt = optimizers(cfg)
  pol_lora, prm_lora = cfg.policy_lora, cfg.prm_lora

  st_sh = bsh = None
  if mesh is None:
    update_fn = jax.jit(update, donate_argnums=(0,))
  else:
    st_sh = state_shardings(model_config, cfg, mesh)
    bsh = placement.batch_sharding(mesh, 1)  # prefix: every [B, ...] leaf along (data, fsdp)
    rep = placement.replicated(mesh)
    # traced under the mesh: the model's activation constraints apply
    update_fn = jax.jit(mesh_lib.with_mesh(update, mesh), in_shardings=(st_sh, bsh, rep),
                        out_shardings=(st_sh, rep), donate_argnums=(0,))

  def init_fn(policy_params, prm_params=None, ref_params=None) -> PrimeState:
    if cfg.uses_prm and prm_params is None:
      raise ValueError("make_prime: algo='prime' needs prm_params")
    if (pol_lora is not None or prm_lora is not None) and ref_params is None:
      raise ValueError("make_prime: LoRA (policy_lora / prm_lora) adapts the frozen base; pass it "
                       "as ref_params (in the compute dtype: models.lora.freeze_base)")
    if cfg.needs_ref and ref_params is None:
      raise ValueError(f"make_prime: this config scores a frozen reference (algo={cfg.algo!r}, "
                       f"kl_coef={cfg.policy.kl_coef}, advantage={cfg.advantage!r}); pass ref_params")
    sh = st_sh or PrimeState(None, None, None)
    ref = ref_params if cfg.keeps_base else None
    if ref is not None and sh.ref_params is not None:
      ref = place(ref, sh.ref_params, "ref_params")
    return PrimeState(init_train_state(place_params(policy_params, sh.policy, "policy_params"), pol_opt, sh.policy),
                      init_train_state(place_params(prm_params, sh.prm, "prm_params"), prm_opt, sh.prm)
                      if cfg.uses_prm else None, ref)

  def place_params(params, shardings, what):
    return params if shardings is None else place(params, shardings.params, what)

  return Prime(init_fn, update_fn, st_sh, bsh)


def place(params, shardings, what: str = "params"):
  """`params` placed into `shardings` (a tree of the same structure; leaves already there stay,
  uncopied); a structure that differs from the layout's names the argument."""
  if jax.tree.structure(params) != jax.tree.structure(shardings, is_leaf=_is_sharding):
    raise ValueError(f"make_prime: {what} do not have the structure of the model config's params "
                     f"(the layout decided at build time): {jax.tree.structure(params)} vs "
                     f"{jax.tree.structure(shardings, is_leaf=_is_sharding)}")
  return jax.tree.map(lambda x, s: x if getattr(x, "sharding", None) == s else placement.device_put(x, s),
                      params, shardings)


def _is_sharding(x) -> bool:
  return isinstance(x, jax.sharding.Sharding)
