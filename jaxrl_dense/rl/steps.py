"""Jittable pass builders for RL of language models: log-probs, implicit-PRM update, PPO update.

Every pass takes the one typed batch, `rl.batch.RolloutBatch` (purejaxrl's `Transition`, Tunix's
`TrainExample`), and the update fills its fields in with `_replace`. `rl.prime.make_prime` composes
the pure passes into one jitted PRIME update:

  logprobs(params, batch)                  -> log-probs [B, R] (and entropies) of the response
                                              tokens (`make_logprobs`; one model per pass)
  prm_update(prm_state, batch)             -> (prm_state, batch with prm_logp, metrics): the
                                              implicit-PRM update with any loss of
                                              rewards.PRM_LOSSES (PRIME, arXiv 2502.01456 Sec. 3)
  policy_update(policy_state, batch, rng)  -> PPO-clip over epochs x mini-batches x micro-batches,
                                              normalised by the GLOBAL token count (or the
                                              references' forms, `loss_norm`)

A pass reads the token layout from `RolloutBatch.sequences()`, B rows, prompt length P, response
length R:
  tokens          int32   [B, P + R]   left-padded prompt followed by the right-padded response
  attention_mask  int32   [B, P + R]   1 on real prompt tokens and on response tokens incl. EOS
  response_mask   float32 [B, R]       1 on generated tokens up to and including the first EOS
and the row fields (outcome, ref_logp, old_logp, advantages, ...) from the batch itself.

Every builder returns a pure function (optax-style) and takes no jit or mesh options: the one
jit of training is `make_prime`'s (explicit in / out shardings, donated state);
`rl.programs` jits the same stages one by one with explicit shardings for compiled plans, and a
stand-alone user wraps `jax.jit` (on a mesh `jax.jit(sharding.with_mesh(fn, mesh), ...)`).

Deprecated (one release): the passes still accept the former `Mapping[str, Array]` batch
(`{"tokens", "attention_mask", "response_mask", ...}`; converted by `as_rollout_batch`),
`make_scoring` builds the former multi-model scorer (use `make_logprobs`), and the builders'
former `jit=` / `mesh=` / `*_sharding=` options still give the former jitted function, warning.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from jaxrl_dense.models import logprobs, transformer
from jaxrl_dense import _deprecation, losses, ops, rewards
from jaxrl_dense.parallel import mesh as mesh_lib, rules, placement
from jaxrl_dense.rewards import implicit_prm
from jaxrl_dense.rl.batch import RolloutBatch
from jaxrl_dense.rl.state import TrainState

Batch = Union[RolloutBatch, Mapping[str, jax.Array]]  # deprecated: the Mapping form
LOSS_NORMS = ("mini_batch", "micro_batch", "device_micro_batch")


def _split(n: int, size: int, what: str) -> int:
  if size <= 0 or n % size:
    raise ValueError(f"{what}: {n} rows are not divisible into chunks of {size}.")
  return n // size


def _chunk(tree, num_chunks: int):
  """[B, ...] leaves -> [num_chunks, B // num_chunks, ...] (chunk c = rows c*B/nc .. (c+1)*B/nc - 1).

  Sharding: under a mesh context (`mesh_lib.use_mesh` / `mesh_lib.with_mesh`) the
  chunked arrays are constrained to P(None, ("data", "fsdp")), i.e. the batch sharding stays on
  the ROW axis and every chunk (micro-batch) is split over all data x fsdp devices. Without it
  GSPMD puts the sharded batch on the chunk axis (each micro-batch on one device) and the
  scan / lax.map over chunks moves a micro-batch every step while the other devices wait. The
  constraint costs one all-to-all of the (small, token-sized) batch arrays where the chunks are
  made; chunk contents and order are unchanged (groups stay whole, same optimizer steps).
  """
  from jaxrl_dense.parallel import rules  # pylint: disable=import-outside-toplevel

  def chunk(x):
    x = x.reshape((num_chunks, x.shape[0] // num_chunks) + x.shape[1:])  # [nc, B/nc, ...]
    return rules.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

  return jax.tree.map(chunk, tree)


def response_logprobs(params, config, tokens, attention_mask, response_len: int, with_entropy: bool,
                      group_size: int = 1, temperature: float = 1.0):
  """Log-probs (and entropies) of the last `response_len` tokens: [b, R] (and [b, R] or None).

  The one response-log-prob helper of the library (scoring, PRM and policy updates use it).
  `temperature` != 1 takes them under softmax(logits / temperature), the distribution a tempered
  rollout sampled from (veRL divides the actor's logits by the rollout temperature in both the
  old-log-prob pass and the update).

  group_size == 1: the trunk runs over the whole sequence [b, P+R]. group_size == n > 1: rows
  come in groups of n consecutive rows sharing one prompt (GRPO/RLOO/PRIME groups), and the trunk
  runs each prompt once (`transformer.shared_prefix_hidden_states`: same values and gradients,
  b/n * P + b * R token passes instead of b * (P + R)) - unless, under a mesh, the b/n prompts
  split over fewer devices than the b rows (2 prompts of a micro-batch on fsdp:8): a prompt pass
  that cannot split would run replicated on every device with activation collectives per layer,
  so the rows then run whole, each on its own device (`_prompts_split_like_rows`). Either way the LM head (vocabulary-sized,
  chunked) runs only over the R positions that predict response tokens.
  """
  w = transformer.lm_head_weight(params, config).astype(transformer.compute_dtype(config))  # [D, V]
  if temperature != 1.0:
    w = w / jnp.asarray(temperature, w.dtype)  # logits / T = h @ (W / T)
  if group_size > 1 and _prompts_split_like_rows(tokens.shape[0], group_size):
    p = tokens.shape[1] - response_len
    n = group_size
    prompt_tok, prompt_am = tokens[::n, :p], attention_mask[::n, :p]  # [b/n, P]
    prompt_h, resp_h = transformer.shared_prefix_hidden_states(
        params, config, prompt_tok, prompt_am, tokens[:, p:], attention_mask[:, p:])
    # The last (left-padded, so real) prompt position predicts response token 0.
    hidden = jnp.concatenate([jnp.repeat(prompt_h[:, -1:], n, axis=0), resp_h], axis=1)  # [b, 1+R, D]
    cut = p - 1
  else:
    hidden = transformer.hidden_states(params, config, tokens, attention_mask)  # [b, P+R, D]
    cut = tokens.shape[1] - response_len - 1
    hidden = hidden[:, cut:]
  out = logprobs.logprobs_from_hidden(
      hidden, w, tokens[:, cut:], attention_mask[:, cut:], return_entropy=with_entropy)
  if with_entropy:
    logp, ent = out
    return logp[:, 1:], ent[:, 1:]  # [b, R], [b, R]
  return out[:, 1:], None  # [b, R]


_response_logprobs = response_logprobs  # former private name


def _prompts_split_like_rows(rows: int, group_size: int) -> bool:
  """Whether the rows // group_size shared prompts split over as many devices as the rows do
  (always true without a context mesh): the condition for sharing the prompt pass."""
  mesh = mesh_lib.current_mesh()
  if mesh is None:
    return True
  sizes = dict(mesh.shape)

  def shards(n):
    entry = rules.logical_to_spec(("batch",), (n,), mesh)[0]
    return math.prod(sizes[a] for a in ((entry,) if isinstance(entry, str) else (entry or ())))

  return shards(rows // group_size) == shards(rows)


def _check_group_size(group_size: int, **sizes):
  if group_size < 1:
    raise ValueError(f"group_size={group_size} must be >= 1.")
  for name, size in sizes.items():
    if size % group_size:
      raise ValueError(f"{name}={size} must be a multiple of group_size={group_size}: prompts are "
                       "shared by the group's consecutive rows, so a chunk cannot split a group.")


def _model_params(lora_config, base) -> Callable:
  """params -> the model's params: the identity, or (LoRA) `lora.attach(base, adapters)`."""
  if lora_config is None:
    if base is not None:
      raise ValueError("a frozen base was passed to an update built without lora_config")
    return lambda params: params
  if base is None:
    raise ValueError("an update built with lora_config needs the frozen base params (argument `base`)")
  from jaxrl_dense.models import lora  # pylint: disable=import-outside-toplevel
  return lambda adapters: lora.attach(base, adapters, lora_config)


def _deprecated_jit(fn, builder: str, *, in_shardings, out_shardings, donate_argnums=(), jit=None,
                    mesh=None, **shardings):
  """`fn` itself: the builders return pure functions (optax-style), and whoever runs one jits it
  (`rl.prime.make_prime` jits the whole update once; `rl.programs` jits each stage with explicit
  shardings). Deprecated (one release): the former `jit=` / `mesh=` / `*_sharding=` options still
  give the former jitted function (`jax.jit(fn, donate_argnums)`, or on a mesh
  `jax.jit(sharding.with_mesh(fn, mesh), in_shardings, out_shardings, donate_argnums)`), with a
  DeprecationWarning."""
  given = [k for k, v in (("jit", jit), ("mesh", mesh), *shardings.items()) if v is not None]
  if not given:
    return fn
  warnings.warn(f"rl.steps.{builder}: {', '.join(k + '=' for k in given)} deprecated; the builder "
                "returns the pure function: wrap it in jax.jit yourself (on a mesh "
                "jax.jit(parallel.sharding.with_mesh(fn, mesh), in_shardings=..., out_shardings=...), "
                "as rl.programs does)", DeprecationWarning, stacklevel=3)
  if jit is False:
    return fn
  if mesh is None:
    return jax.jit(fn, donate_argnums=donate_argnums)
  # Traced under the mesh, so the model's activation constraints (FSDP: rows over data x fsdp)
  # and the gradient constraints apply.
  return jax.jit(mesh_lib.with_mesh(fn, mesh), in_shardings=in_shardings, out_shardings=out_shardings,
                 donate_argnums=donate_argnums)


_DICT_FIELDS = {"acc": "outcome", "ref_logp": "ref_logp", "prm_logp": "prm_logp", "old_logp": "old_logp",
                "advantages": "advantages", "weight": "in_band", "is_weight": "rollout_is_weights"}


def as_rollout_batch(batch: Batch) -> RolloutBatch:
  """The batch as a `RolloutBatch`. Deprecated input (one release): the former `Mapping` batch
  {"tokens" [B, P+R], "attention_mask" [B, P+R], "response_mask" [B, R], "acc" (-> outcome), "ref_logp",
  "old_logp", "advantages", "weight" (-> in_band), "is_weight" (-> rollout_is_weights)}, split at
  P = tokens.shape[1] - R; response tokens attended beyond the response mask become the
  observation mask, so `sequences()` gives back the same tokens and attention mask."""
  if isinstance(batch, RolloutBatch):
    return batch
  warnings.warn("rl.steps: Mapping batches are deprecated; pass an rl.batch.RolloutBatch",
                DeprecationWarning, stacklevel=3)
  tokens, attn, rmask = batch["tokens"], batch["attention_mask"], batch["response_mask"]
  p = tokens.shape[1] - rmask.shape[1]
  resp_attn = attn[:, p:].astype(jnp.float32)  # [B, R]
  fields = {new: batch[old] for old, new in _DICT_FIELDS.items() if batch.get(old) is not None}
  fields.setdefault("outcome", jnp.zeros(rmask.shape[:1], jnp.float32))
  return RolloutBatch(prompt_tokens=tokens[:, :p], prompt_mask=attn[:, :p], response_tokens=tokens[:, p:],
                      response_mask=rmask,
                      observation_mask=resp_attn * (rmask.astype(jnp.float32) == 0), **fields)


def _score_chunks(tokens, attn, response_len: int, micro_batch_size: int, one: Callable) -> dict:
  """{name: float32 [B, R]}: `one(tok [b, P+R], am [b, P+R]) -> {name: [b, R]}` over micro-batches
  of `micro_batch_size` rows (lax.map: one compilation), without gradient."""
  B, R = tokens.shape[0], response_len
  nm = _split(B, micro_batch_size, "scoring micro_batch_size")
  out = jax.lax.map(lambda chunk: one(*chunk), _chunk((tokens, attn), nm))
  return jax.tree.map(lambda x: jax.lax.stop_gradient(x.reshape((B, R))), out)  # [B, R] each


def make_logprobs(config, *, micro_batch_size: int, group_size: int = 1, temperature: float = 1.0,
                  with_entropy: bool = False) -> Callable:
  """Builds the pure `logprobs(params, batch: RolloutBatch) -> logp [B, R]` (or `(logp, entropy)`
  with `with_entropy`): one model's no-grad log-probs of the response tokens, float32.

  log π(y_t | x, y_<t) under softmax(logits / `temperature`) (the rollout's temperature for the
  old policy, as veRL scores it; 1 for the reference and the PRM), over micro-batches of
  `micro_batch_size` rows (lax.map, one compilation). `group_size` = n > 1: rows come in groups
  of n sharing a prompt, which then runs once per group (`response_logprobs`). The update fills
  the result in with `batch._replace(old_logp=...)` (or ref_logp / prm_logp).
  """
  _check_group_size(group_size, micro_batch_size=micro_batch_size)

  def logprobs_fn(params, batch: RolloutBatch):
    seq = as_rollout_batch(batch).sequences()
    tokens, attn, rmask = seq["tokens"], seq["attention_mask"], seq["response_mask"]
    chex.assert_rank([tokens, attn, rmask], [2, 2, 2])
    R = rmask.shape[1]

    def one(tok, am):
      logp, ent = response_logprobs(params, config, tok, am, R, with_entropy, group_size, temperature)
      return {"logp": logp, "entropy": ent} if with_entropy else {"logp": logp}

    out = _score_chunks(tokens, attn, R, micro_batch_size, one)
    return (out["logp"], out["entropy"]) if with_entropy else out["logp"]

  return logprobs_fn


def make_scoring(
    config,
    *,
    micro_batch_size: int,
    with_policy: bool = True,
    with_ref: bool = True,
    with_prm: bool = True,
    with_entropy: bool = True,
    prm_config=None,
    ref_config=None,
    mesh=None,
    param_shardings: Optional[Mapping[str, Any]] = None,
    batch_sharding=None,
    group_size: int = 1,
    policy_temperature: float = 1.0,
    jit: Optional[bool] = None,
) -> Callable:
  """Deprecated (one release; use `make_logprobs`, one model per pass): builds
  `scoring(policy_params, ref_params, prm_params, batch) -> dict`.

  Runs up to three no-grad forwards over micro-batches of `micro_batch_size` rows (lax.map, so a
  single compilation) and returns float32 [B, R] arrays: "old_logp" (policy; with "entropy" if
  requested), "ref_logp" (frozen reference) and "prm_logp" (implicit PRM), for the response tokens.
  Models that are switched off may be passed as None. `group_size` = n > 1: rows come in groups
  of n sharing a prompt, which is then run once per group (see `response_logprobs`).
  `policy_temperature`: the policy's log-probs (and entropy) are taken at this temperature (the
  reference and PRM passes at 1). Returns the pure function (wrap it in `jax.jit`); the former
  `jit=` / `mesh=` / `param_shardings=` / `batch_sharding=` options are deprecated (one release).
  `batch`: the former {"tokens", "attention_mask", "response_mask"} mapping, or a `RolloutBatch`.
  """
  warnings.warn("rl.steps.make_scoring is deprecated; use make_logprobs (one model per pass)",
                DeprecationWarning, stacklevel=2)
  _check_group_size(group_size, micro_batch_size=micro_batch_size)
  prm_config = prm_config or config
  ref_config = ref_config or config

  def scoring(policy_params, ref_params, prm_params, batch):
    if isinstance(batch, RolloutBatch):
      batch = batch.sequences()
    tokens, attn, rmask = batch["tokens"], batch["attention_mask"], batch["response_mask"]
    chex.assert_rank([tokens, attn, rmask], [2, 2, 2])
    R = rmask.shape[1]

    def one(tok, am):
      out = {}
      if with_policy:
        lp, ent = response_logprobs(policy_params, config, tok, am, R, with_entropy, group_size,
                                    policy_temperature)
        out["old_logp"] = lp
        if with_entropy:
          out["entropy"] = ent
      if with_ref:
        out["ref_logp"], _ = response_logprobs(ref_params, ref_config, tok, am, R, False, group_size)
      if with_prm:
        out["prm_logp"], _ = response_logprobs(prm_params, prm_config, tok, am, R, False, group_size)
      return out

    return _score_chunks(tokens, attn, R, micro_batch_size, one)

  ps = param_shardings or {}
  return _deprecated_jit(scoring, "make_scoring", jit=jit, mesh=mesh, param_shardings=param_shardings,
                         batch_sharding=batch_sharding, out_shardings=batch_sharding,
                         in_shardings=(ps.get("policy"), ps.get("ref"), ps.get("prm"), batch_sharding))


def make_prm_update(
    config,
    optimizer: optax.GradientTransformation,
    *,
    beta: float,
    mini_batch_size: int,
    micro_batch_size: int,
    loss_fn: str = "ce",
    num_samples: Optional[int] = None,
    mesh=None,
    state_sharding=None,
    batch_sharding=None,
    group_size: int = 1,
    lora_config=None,
    base_sharding=None,
    train_on_filler: bool = False,
    jit: Optional[bool] = None,
) -> Callable:
  """Builds `prm_update(prm_state, batch, key=None) -> (prm_state, batch, metrics)`: the implicit-PRM update
  (PRIME, arXiv 2502.01456 Sec. 3.2); the returned batch carries `prm_logp` [B, R] (given the
  deprecated Mapping batch, the pass returns `prm_logp` itself in its place, as before). The
  shape `(state, batch, key) -> (state, batch, metrics)` is the policy pass's, so `rl.prime`
  chains them; the PRM pass draws no randomness (`key` is unused).

  The batch (rows in their group order) is cut into B / mini_batch_size mini-batches, processed in
  order; each mini-batch is one optimizer step whose gradient is accumulated over micro-batches of
  `micro_batch_size` rows, each micro-batch loss scaled by micro/mini (the mini-batch mean).
  With q = prm_logp − ref_logp (token log-ratio, carrying the gradient):

    loss_fn = the name of a loss of `rewards.PRM_LOSSES`:
      "ce" (PRIME's cross-entropy, Cui et al., arXiv 2502.01456): z_i = β Σ_t m q, ℓ = −mean_i [outcome log σ(z) + (1−outcome) log σ(−z)];
      "dpo" / "bon_acc" / "bon_rm" (veRL's PRIME recipe, detached DPO): these compare each response
      with the others of its group: `q_bc` / `outcome_bc` [b, n] are the detached Σ_t m q and labels of
      its group (from a no-grad pass at the start of each mini-batch, which must hold whole groups
      of `num_samples` = n rows). `loss_fn` names an entry of `rewards.PRM_LOSSES`: a loss
      takes `(q, mask, outcome, *, beta)` or, registered with grouped=True,
      `(q, mask, outcome, q_bc, outcome_bc, *, beta)`.

  Row weights `batch.in_band` [B] (1 = train on the row, 0 = not; PRIME trains its PRM on the
  in-band groups only; ignored with `train_on_filler`, None = every row): the mini-batch loss becomes the weighted mean of the per-row losses,
  Σ_i w_i ℓ_i / Σ_i w_i over the mini-batch (each loss evaluated on single rows; for the
  summing best-of-N losses × micro_batch_size, their scale above), so with every weight 1 it is
  the loss above, and it equals the loss of the weighted rows alone for any micro-batch size. A
  mini-batch whose weights are all 0 takes no optimizer step (state unchanged).

  Gradient clipping and AdamW live in `optimizer`. `prm_logp` holds the log-probs computed inside
  the update loop: mini-batch k is scored by the PRM after k optimizer steps of this call, i.e.
  PRIME-RL's "single forward" (`update: after`) scores. Required batch fields: the tokens, outcome,
  ref_logp. `group_size` = n > 1: rows come in groups of n
  sharing a prompt, run once per group (same loss and gradient). Returns the pure function (wrap
  it in `jax.jit`; `rl.prime.make_prime` composes it into its one jitted update); the former
  `jit=` / `mesh=` / `state_sharding=` / `batch_sharding=` / `base_sharding=` options are
  deprecated (one release).
  `lora_config` (a `models.lora.LoraConfig`): `prm_state.params` are LoRA adapters and the
  function takes the frozen base as a fourth argument, `prm_update(prm_state, batch, key, base)`; the
  model is `lora.attach(base, adapters)`, so gradients and AdamW states exist for the adapters only.
  """
  _check_group_size(group_size, mini_batch_size=mini_batch_size, micro_batch_size=micro_batch_size)
  if not isinstance(loss_fn, str) or loss_fn not in rewards.PRM_LOSSES:
    raise ValueError(f"loss_fn={loss_fn!r}: expected a registered PRM loss name "
                     f"{rewards.PRM_LOSSES.names()} (register new ones in rewards.PRM_LOSSES "
                     "with grouped= and sums_rows=)")
  info = rewards.PRM_LOSSES.info(loss_fn)
  grouped, sums_rows = bool(info["grouped"]), bool(info["sums_rows"])
  loss_fn = rewards.PRM_LOSSES.get(loss_fn)
  if grouped:
    n = num_samples or group_size
    if n < 2 or mini_batch_size % n:
      raise ValueError(f"a group-wise PRM loss needs num_samples=n >= 2 dividing mini_batch_size="
                       f"{mini_batch_size}, got n={n}")

  def prm_update(state: TrainState, batch: Batch, key: Optional[jax.Array] = None, base=None):
    del key  # the pass shape (state, batch, key) shared with the policy pass; no sampling here
    model = _model_params(lora_config, base)
    legacy = not isinstance(batch, RolloutBatch)  # deprecated Mapping batch: returns prm_logp itself
    batch = as_rollout_batch(batch)
    if batch.ref_logp is None:
      raise ValueError("prm_update: RolloutBatch.ref_logp is None (score the reference first)")
    seq = batch.sequences()
    rmask = seq["response_mask"]  # [B, R]
    chex.assert_rank([seq["tokens"], rmask, batch.outcome, batch.ref_logp], [2, 2, 1, 2])
    B, R = rmask.shape
    n_mini = _split(B, mini_batch_size, "PRM mini_batch_size")
    n_micro = _split(mini_batch_size, micro_batch_size, "PRM micro_batch_size")
    scale = micro_batch_size / mini_batch_size
    weights = None if train_on_filler else batch.in_band
    weighted = weights is not None
    # The pass's rows, chunked into mini- and micro-batches (the batch's own names).
    rows = dict(tokens=seq["tokens"], attention_mask=seq["attention_mask"], response_mask=rmask,
                outcome=batch.outcome, ref_logp=batch.ref_logp)
    if weighted:
      chex.assert_shape(weights, (B,))
      rows["weights"] = weights.astype(jnp.float32)
    minis = _chunk(rows, n_mini)

    def row_losses(q, mb):
      """[b] the loss of each row alone."""
      one = lambda x: x[None]
      if grouped:
        f = lambda q1, m1, a1, qb, ab: loss_fn(one(q1), one(m1), one(a1), one(qb), one(ab), beta=beta)
        return jax.vmap(f)(q, mb["response_mask"], mb["outcome"], mb["q_bc"], mb["outcome_bc"])
      return jax.vmap(lambda q1, m1, a1: loss_fn(one(q1), one(m1), one(a1), beta=beta))(
          q, mb["response_mask"], mb["outcome"])

    def micro_loss(params, mb, wsum):
      logp, _ = response_logprobs(model(params), config, mb["tokens"], mb["attention_mask"], R, False,
                                  group_size)
      q = implicit_prm.token_log_ratio(logp, mb["ref_logp"], mb["response_mask"])  # [b, R]
      if weighted:  # weighted mean over the mini-batch (global weight count)
        loss = jnp.sum(mb["weights"] * row_losses(q, mb)) / jnp.maximum(wsum, 1e-8)
        return loss * (micro_batch_size if sums_rows else 1.0), logp
      if grouped:
        loss = loss_fn(q, mb["response_mask"], mb["outcome"], mb["q_bc"], mb["outcome_bc"], beta=beta)
      else:
        loss = loss_fn(q, mb["response_mask"], mb["outcome"], beta=beta)
      return loss * scale, logp

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def mini_step(st: TrainState, mini):
      if grouped:  # detached group matrices of Σ_t m q and outcome, from the params of this step
        def seq_q(_, mb):
          logp, _ = response_logprobs(model(st.params), config, mb["tokens"], mb["attention_mask"], R,
                                      False, group_size)
          m = mb["response_mask"]
          return None, ops.masked_sum(implicit_prm.token_log_ratio(logp, mb["ref_logp"], m), m, axis=1)  # [b]
        _, qs = jax.lax.scan(seq_q, None, _chunk(mini, n_micro))
        qs = jax.lax.stop_gradient(qs.reshape((mini_batch_size,)))  # [mini]
        mini = dict(mini, q_bc=implicit_prm.group_matrix(qs, n),  # [mini, n]
                    outcome_bc=implicit_prm.group_matrix(mini["outcome"], n))
      micros = _chunk(mini, n_micro)
      wsum = jnp.sum(mini["weights"]) if weighted else jnp.float32(mini_batch_size)

      def acc_step(carry, mb):
        gsum, lsum = carry
        (loss, logp), g = grad_fn(st.params, mb, wsum)
        g = placement.constrain_like_params(g, st.params, config)  # reduce-scatter into the FSDP layout
        return (jax.tree.map(jnp.add, gsum, g), lsum + loss), logp

      zeros = jax.tree.map(jnp.zeros_like, st.params)
      (grads, loss), logps = jax.lax.scan(acc_step, (zeros, jnp.zeros((), jnp.float32)), micros)
      gnorm = optax.global_norm(grads)
      updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
      params = optax.apply_updates(st.params, updates)
      new = TrainState(params=params, opt_state=opt_state, step=st.step + 1)
      if weighted:  # no row to train on: no optimizer step (AdamW would still move on its moments)
        new = jax.tree.map(lambda a, b: jnp.where(wsum > 0, a, b), new, st)
      return new, (logps.reshape((mini_batch_size, R)), loss, gnorm)

    state, (logps, losses_, gnorms) = jax.lax.scan(mini_step, state, minis)
    prm_logp = jax.lax.stop_gradient(logps.reshape((B, R)))  # [B, R]
    metrics = {"prm/loss": jnp.mean(losses_), "prm/grad_norm": jnp.mean(gnorms)}
    return state, (prm_logp if legacy else batch._replace(prm_logp=prm_logp)), metrics

  return _deprecated_jit(
      prm_update, "make_prm_update", jit=jit, mesh=mesh, state_sharding=state_sharding,
      batch_sharding=batch_sharding, base_sharding=base_sharding, donate_argnums=(0,),
      in_shardings=(state_sharding, batch_sharding, None) + ((base_sharding,) if lora_config is not None else ()),
      out_shardings=(state_sharding, batch_sharding, None))


@_deprecation.renamed_kwargs(variant="reference_impl")
def make_policy_update(
    config,
    optimizer: optax.GradientTransformation,
    policy,
    *,
    reference_impl: str = "verl",
    loss_shards: int = 1,
    bypass: bool = False,
    mini_batch_size: int,
    micro_batch_size: int,
    epochs: int = 1,
    shuffle: bool = True,
    mesh=None,
    state_sharding=None,
    batch_sharding=None,
    group_size: int = 1,
    shuffle_group_size: Optional[int] = None,
    temperature: float = 1.0,
    lora_config=None,
    base_sharding=None,
    jit: Optional[bool] = None,
) -> Callable:
  """Builds `policy_update(policy_state, batch, rng) -> (policy_state, batch, metrics)`: PPO-clip
  (Schulman et al., arXiv 1707.06347) on a `RolloutBatch` carrying old_logp and advantages; the
  batch comes back as given (the PRM pass's shape, so `rl.prime` chains the two). Given the
  deprecated Mapping batch it returns `(policy_state, metrics)`, as before.

  For each of `epochs` epochs the B rows are (optionally) shuffled with `rng` and cut into
  B / mini_batch_size mini-batches; each mini-batch is one optimizer step. Its gradient is
  accumulated over micro-batches, and every micro-batch loss is divided by the aggregation count
  of the WHOLE mini-batch (tokens for token-mean, sequences for seq-mean-*), obtained first as a
  parameter-free (sum, count) reduction. So the step equals the loss of the full mini-batch for
  any micro-batch size (Tunix / veRL "global token count" normalisation):

    L = [Σ_micro pg_sum − c_H Σ_micro H_sum + c_KL Σ_micro KL_sum] / count(mini-batch).

  (`policy.loss_norm` offers the references' forms instead: the mean of micro-batch aggregates
  [O], or of per-device micro-batch aggregates [V], over `loss_shards` data-parallel shards;
  see docs/algorithms.md.)

  The objective's settings are the run's validated `rl.config.PolicyConfig` (one source): the loss
  (`policy_loss`, with `reference_impl="original"` selecting PRIME-RL's plain clip for ppo), its clip range
  and aggregation (anchor defaults resolved by `clip_range` / `agg_mode`), `clip_c`,
  `entropy_coeff`, `kl_coef` / `kl_type`, `loss_norm`. `bypass`=True (old_logp is the sampler's μ):
  `policy.rollout_rs` rejects tokens on sg(π_θ)/μ inside each micro-batch's loss (veRL
  compute_policy_loss_bypass_mode; rejected tokens add 0 and stay in the count).

  Required batch fields: the tokens, old_logp, advantages (and ref_logp when kl_coef > 0); the
  loss covers `batch.policy_mask()` (response_mask × keep × weights × rollout_rs_keep); optional
  `rollout_is_weights` [B, R]: rollout-correction weights multiplying each token's loss
  (`losses.rollout_correction`). The token loss is `policy.policy_loss` from
  `losses.POLICY_LOSSES` (one signature for ppo, gspo, gspo_token, cispo). Rows whose response_mask is all 0 (rows masked out by the caller) add
  nothing to the loss or its count; a mini-batch of such rows only takes no optimizer step. `group_size` = n > 1: rows come in groups of n sharing a prompt, which is run
  once per group (same loss and gradient). The shuffle permutes blocks of `shuffle_group_size`
  rows (default `group_size`); give it explicitly (e.g. n whenever a mini-batch holds whole
  groups) to make the trajectory independent of `group_size`, which is then a speed setting only.
  `temperature`: new log-probs and entropies under softmax(logits / T), as the old ones were
  scored (veRL). Returns the pure function (wrap it in `jax.jit`; `rl.prime.make_prime` composes
  it into its one jitted update); the former `jit=` / `mesh=` / `state_sharding=` /
  `batch_sharding=` / `base_sharding=` options are deprecated (one release). `lora_config`: the state's params are
  LoRA adapters of the frozen base passed as `policy_update(policy_state, batch, rng, base)`
  (as `make_prm_update`).
  """
  if reference_impl not in ("verl", "original"):
    raise ValueError(f"make_policy_update: reference_impl={reference_impl!r}; expected 'verl' or 'original'.")
  if loss_shards < 1:
    raise ValueError(f"make_policy_update: loss_shards={loss_shards} must be >= 1.")
  clip_low, clip_high = policy.clip_range
  agg_mode, loss_norm = policy.agg_mode, policy.loss_norm
  bypass_rs = policy.rollout_rs if bypass else "none"
  if loss_norm == "device_micro_batch" and micro_batch_size % loss_shards:
    raise ValueError(f"loss_norm='device_micro_batch': micro_batch_size={micro_batch_size} must split "
                     f"into loss_shards={loss_shards} device shards")
  _check_group_size(group_size, mini_batch_size=mini_batch_size, micro_batch_size=micro_batch_size)
  shuffle_g = group_size if shuffle_group_size is None else shuffle_group_size
  if shuffle and shuffle_g % group_size:
    raise ValueError(f"shuffle_group_size={shuffle_g} must be a multiple of group_size={group_size} "
                     "(a shared prompt's rows must stay together)")
  if epochs < 1:
    raise ValueError(f"epochs={epochs} must be >= 1.")
  need_entropy = True  # entropy is always reported as a metric
  loss_terms = losses.get_policy_loss(
      "ppo_original" if (policy.policy_loss == "ppo" and reference_impl == "original") else policy.policy_loss)

  def policy_update(state: TrainState, batch: Batch, rng: jax.Array, base=None):
    model = _model_params(lora_config, base)
    legacy = not isinstance(batch, RolloutBatch)  # deprecated Mapping batch: (state, metrics) as before
    given = batch
    batch = as_rollout_batch(batch)
    for name in ("old_logp", "advantages") + (("ref_logp",) if policy.kl_coef > 0 else ()):
      if getattr(batch, name) is None:
        raise ValueError(f"policy_update: RolloutBatch.{name} is None"
                         + (" (--kl_coef > 0 needs the reference's log-probs)" if name == "ref_logp" else ""))
    seq = batch.sequences()
    rmask = batch.policy_mask()  # [B, R] the loss's tokens
    B, R = rmask.shape
    n_mini = _split(B, mini_batch_size, "policy mini_batch_size")
    n_micro = _split(mini_batch_size, micro_batch_size, "policy micro_batch_size")
    # The pass's rows, shuffled and chunked into mini- and micro-batches (the batch's own names).
    rows = {"tokens": seq["tokens"], "attention_mask": seq["attention_mask"], "response_mask": rmask,
            "old_logp": batch.old_logp, "advantages": batch.advantages}
    if batch.rollout_is_weights is not None:
      rows["rollout_is_weights"] = batch.rollout_is_weights
    if policy.kl_coef > 0:
      rows["ref_logp"] = batch.ref_logp

    def micro_terms(params, mb, count):
      logp, ent = response_logprobs(model(params), config, mb["tokens"], mb["attention_mask"], R, need_entropy,
                                    group_size, temperature)
      m = mb["response_mask"]
      terms = loss_terms(logp, mb["old_logp"], mb["advantages"], m, clip_ratio_low=clip_low,
                         clip_ratio_high=clip_high, clip_ratio_c=policy.clip_c)
      token_loss = terms.token_loss
      if "rollout_is_weights" in mb:  # decoupled rollout correction: min(pi_old / mu, C) (no gradient)
        token_loss = token_loss * mb["rollout_is_weights"]
      if bypass_rs != "none":  # bypass: reject on sg(pi_theta) / mu (old_logp = mu)
        keep = losses.rejection_mask(jax.lax.stop_gradient(logp) - mb["old_logp"], m,
                                     level=bypass_rs, low=policy.rollout_rs_low,
                                     high=policy.rollout_rs_high, k3_max=policy.rollout_rs_k3_max)
        token_loss = token_loss * keep
      agg = lambda x: normalised(x, m, count)
      sums = {"pg": agg(token_loss), "entropy": agg(ent)}
      total = sums["pg"] - policy.entropy_coeff * sums["entropy"]
      if policy.kl_coef > 0:
        sums["kl"] = agg(losses.get_kl(policy.kl_type)(logp, mb["ref_logp"]))  # of [b, R]
        total = total + policy.kl_coef * sums["kl"]
      tok_stats = {"clipfrac": terms.clipped.astype(jnp.float32),
                   "clipfrac_lower": terms.dual_clipped.astype(jnp.float32),
                   "ppo_kl": terms.neg_log_ratio}
      if bypass_rs != "none":
        tok_stats["rollout_rs_masked_frac"] = 1.0 - keep
      # Token-level diagnostics as masked sums (divided by the token count at the end).
      for name, v in tok_stats.items():
        sums["tok/" + name] = jnp.sum(v * m)
      return total, sums

    def normalised(x, m, count):
      """This micro-batch's share of the mini-batch loss of the token values x [b, R]."""
      if loss_norm == "mini_batch":  # Σ_micro sum / global count of the mini-batch
        return losses.aggregate_terms(x, m, agg_mode)[0] / count
      d = loss_shards if loss_norm == "device_micro_batch" else 1
      xs, ms = (v.reshape((d, v.shape[0] // d) + v.shape[1:]) for v in (x, m))  # [d, b/d, R]
      s, c = jax.vmap(lambda a, w: losses.aggregate_terms(a, w, agg_mode))(xs, ms)  # [d]
      return jnp.sum(s / jnp.maximum(c, 1e-8)) / (d * n_micro)  # mean of (shard) micro-batch means

    def mini_step(st: TrainState, mini):
      count = losses.aggregate_terms(jnp.zeros_like(mini["response_mask"]), mini["response_mask"],
                                     agg_mode)[1]  # parameter-free global count
      count = jnp.maximum(count, 1e-8)
      micros = _chunk(mini, n_micro)

      def loss_fn(params, mb):
        return micro_terms(params, mb, count)

      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

      def acc_step(carry, mb):
        gsum, lsum, ssum = carry
        (loss, sums), g = grad_fn(st.params, mb)
        g = placement.constrain_like_params(g, st.params, config)  # reduce-scatter into the FSDP layout
        return (jax.tree.map(jnp.add, gsum, g), lsum + loss, jax.tree.map(jnp.add, ssum, sums)), None

      zeros = jax.tree.map(jnp.zeros_like, st.params)
      _, sums_shape = jax.eval_shape(micro_terms, st.params, jax.tree.map(lambda x: x[0], micros), count)
      zsums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
      (grads, loss, sums), _ = jax.lax.scan(acc_step, (zeros, jnp.zeros((), jnp.float32), zsums), micros)
      gnorm = optax.global_norm(grads)
      updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
      params = optax.apply_updates(st.params, updates)
      new = TrainState(params=params, opt_state=opt_state, step=st.step + 1)
      # A mini-batch without a valid token (every row masked out, --filter_mode=mask) takes no
      # optimizer step: AdamW would still move the params on its moments.
      new = jax.tree.map(lambda a, b: jnp.where(jnp.sum(mini["response_mask"]) > 0, a, b), new, st)
      ntok = jnp.maximum(jnp.sum(mini["response_mask"]), 1.0)
      stats = {"loss": loss, "grad_norm": gnorm, "pg_loss": sums["pg"], "entropy": sums["entropy"]}
      if "kl" in sums:
        stats["kl_loss"] = sums["kl"]
      for k, v in sums.items():
        if k.startswith("tok/"):
          stats[k[4:]] = v / ntok
      return new, stats

    def epoch_step(st, key):
      if shuffle:  # blocks of shuffle_g rows move together (a block of 1 = a row)
        g = shuffle_g
        perm = (jax.random.permutation(key, B // g)[:, None] * g + jnp.arange(g)[None, :]).reshape(B)
        data = jax.tree.map(lambda x: jnp.take(x, perm, axis=0), rows)
      else:
        data = rows
      return jax.lax.scan(mini_step, st, _chunk(data, n_mini))

    state, stats = jax.lax.scan(epoch_step, state, jax.random.split(rng, epochs))
    metrics = {"actor/" + k: jnp.mean(v) for k, v in stats.items()}
    metrics["actor/loss_finite"] = jnp.all(jnp.isfinite(stats["loss"]))
    return (state, metrics) if legacy else (state, given, metrics)

  # out_shardings None: (state, metrics) or (state, batch, metrics), the state's layout its input's
  return _deprecated_jit(
      policy_update, "make_policy_update", jit=jit, mesh=mesh, state_sharding=state_sharding,
      batch_sharding=batch_sharding, base_sharding=base_sharding, donate_argnums=(0,),
      in_shardings=(state_sharding, batch_sharding, None) + ((base_sharding,) if lora_config is not None else ()),
      out_shardings=None)
