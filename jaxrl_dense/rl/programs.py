"""The programs of one RL step as the trainer runs them, from abstract inputs, for compiled plans.

`parallel.plan` compiles and measures any `Program` (a jitted function and abstract arguments:
`jax.ShapeDtypeStruct`s carrying their shardings, no weights); this module builds the RL step's
programs from the production code, so a plan or a layout test compiles what runs:

  generate       `sampling`'s jitted static sampler on the rollout copy of the params
                 (`inference.inference_shardings`: the decode layout, optionally another dtype).
  scoring        `rl.prime.make_stages(...).score`: pi_old (with its entropy) and the reference's
                 log-probs of the batch.
  prm_update     `.update_prm`: the implicit-PRM pass (and the re-scoring of --prm_update=before).
  policy_update  `.update_policy`: the rollout correction and the PPO pass.
  update         `rl.prime.make_prime(...).update_fn`: the ONE jitted update the trainer runs
                 (the stages above chained with the advantages, the state donated).

The three stage programs are the same functions `make_prime` chains (`make_stages`), each jitted
here with explicit in / out shardings from the production layout (`prime.state_shardings`, the
batch rows over (data, fsdp)), traced under the mesh (`mesh_lib.with_mesh`), each given the
part of the state it reads and donating the state it updates. Their batches are the production
batch as it reaches each stage (the rollout's fields, then what the earlier stages fill in).

  mesh = mesh_lib.make_mesh("fsdp:8")
  programs = rl_step_programs(model_config, mesh, batch_size=..., prompt_len=..., ...)
  plan.memory_plan(model_config, mesh, programs)["programs"]["update"]["peak_bytes"]
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrl_dense.parallel import mesh as mesh_lib, rules, placement, inference
from jaxrl_dense.parallel.plan import Program, abstract, abstract_batch
from jaxrl_dense.rl import config as config_lib
from jaxrl_dense.rl import prime
from jaxrl_dense.rl.batch import RolloutBatch
from jaxrl_dense.rl.state import TrainState

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Abstract inputs
# ----------------------------------------------------------------------------------------------

def abstract_params(config: Any, mesh: Mesh, *, dtype: Any = None, layout: str = "train",
                    max_bytes: Optional[int] = None) -> PyTree:
  """Abstract params of `config` on `mesh` (nothing is allocated).

  layout "train": the FSDP + tensor layout of `rules.param_shardings`; "inference" (or any
  layout of `inference.inference_shardings`: "auto", "replicated", "tensor"): the rollout's copy,
  optionally in `dtype`.
  """
  from jaxrl_dense.models import transformer  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(lambda k: transformer.init_params(config, k), jax.random.PRNGKey(0))
  if dtype is not None:
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), shapes)
  if layout == "train":
    shardings = rules.param_shardings(shapes, config, mesh)
  else:
    shardings, _ = inference.inference_shardings(
        shapes, config, mesh, max_bytes=max_bytes, layout="auto" if layout == "inference" else layout)
  return abstract(shapes, shardings)


def abstract_train_state(config: Any, optimizer: Any, mesh: Mesh) -> PyTree:
  """Abstract `rl.TrainState` (params, optimizer state, step) in the FSDP + tensor layout."""
  from jaxrl_dense.models import transformer  # pylint: disable=import-outside-toplevel

  def init(key):
    params = transformer.init_params(config, key)
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  return abstract(shapes, placement.tree_shardings(shapes, config, mesh))


def rl_batch_shapes(batch_size: int, prompt_len: int, response_len: int) -> dict:
  """Shapes and dtypes of the former Mapping batch of the pass builders (`rl.steps`, deprecated
  there): {name: (shape, dtype)}. The programs here take `RolloutBatch`es
  (`rollout_batch_shapes`)."""
  b, p, r = batch_size, prompt_len, response_len
  return {"tokens": ((b, p + r), jnp.int32), "attention_mask": ((b, p + r), jnp.int32),
          "response_mask": ((b, r), jnp.float32), "acc": ((b,), jnp.float32),
          "ref_logp": ((b, r), jnp.float32), "old_logp": ((b, r), jnp.float32),
          "advantages": ((b, r), jnp.float32)}


def rollout_batch_shapes(cfg: config_lib.PrimeConfig) -> dict:
  """{RolloutBatch field: (shape, dtype)} of the batch `rl.rollout.collect` hands the update:
  cfg.rollout.rows rows of max_prompt_length + max_response_length tokens, the sampler's
  log-probs and the in-band weights (always filled), the served PRM's token rewards with
  --process_reward, and a multi-turn rollout's observation mask and turn ids (turn rewards for
  --advantage=matchtir|igpo) with --env."""
  r = cfg.rollout
  b, p_, r_ = r.rows, r.max_prompt_length, r.max_response_length
  out = {"prompt_tokens": ((b, p_), jnp.int32), "prompt_mask": ((b, p_), jnp.int32),
         "response_tokens": ((b, r_), jnp.int32), "response_mask": ((b, r_), jnp.float32),
         "outcome": ((b,), jnp.float32), "sampler_logp": ((b, r_), jnp.float32),
         "in_band": ((b,), jnp.float32)}
  if cfg.process_reward:
    out["process_rewards"] = ((b, r_), jnp.float32)
  if r.env:
    out.update(observation_mask=((b, r_), jnp.float32), turn_ids=((b, r_), jnp.int32))
    if cfg.advantage in ("matchtir", "igpo"):
      out["turn_rewards"] = ((b, r.max_turns), jnp.float32)
  return out


def abstract_rollout_batch(mesh: Mesh, shapes: Mapping[str, tuple]) -> RolloutBatch:
  """A RolloutBatch of ShapeDtypeStructs, rows over (data, fsdp), from {field: (shape, dtype)}."""
  return RolloutBatch(**abstract_batch(mesh, shapes))


def _rows_sharded(mesh: Mesh, tree: PyTree) -> PyTree:
  """`tree`'s leaves (arrays or ShapeDtypeStructs) as ShapeDtypeStructs with rows over (data, fsdp)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, placement.batch_spec(x.ndim) if x.ndim else P())), tree)


def step_config(*, batch_size: int, prompt_len: int, response_len: int, micro_batch_size: int,
                mini_batch_size: Optional[int] = None, num_samples: int = 2,
                **changes) -> config_lib.PrimeConfig:
  """The PrimeConfig (--algo=prime, every other setting its default) of a step of `batch_size`
  rows = batch_size / num_samples prompts x num_samples samples, prompt_len + response_len tokens,
  policy and PRM mini-batches of `mini_batch_size` rows (default: the batch), every micro-batch
  (policy, PRM, scoring) `micro_batch_size` rows, and each row run whole (--noshare_prompt).
  `changes`: further settings by flag name (`config_lib.replace`)."""
  if batch_size % num_samples:
    raise ValueError(f"rl_step_programs: batch_size={batch_size} is not a multiple of "
                     f"num_samples={num_samples}.")
  mini = batch_size if mini_batch_size is None else mini_batch_size
  values = dict(n=num_samples, prompts_per_step=batch_size // num_samples, oversample=1,
                max_prompt_length=prompt_len, max_response_length=response_len,
                mini_batch_size=mini, micro_batch_size=micro_batch_size, prm_mini_batch_size=mini,
                prm_micro_batch_size=micro_batch_size, score_micro_batch_size=micro_batch_size,
                share_prompt=False)
  values.update(changes)
  return config_lib.build(config_lib.PrimeConfig, values)


# ----------------------------------------------------------------------------------------------
# Programs
# ----------------------------------------------------------------------------------------------

def generate_program(config: Any, mesh: Mesh, *, batch_size: int, prompt_len: int, response_len: int,
                     num_samples: int = 1, rollout_layout: str = "auto",
                     rollout_max_bytes: Optional[int] = None, rollout_dtype: Any = None) -> Program:
  """The rollout sampler (`sampling`'s jitted static sampler): batch_size / num_samples prompts x
  num_samples samples, prompt_len prompt tokens, response_len new tokens, params in the rollout
  layout (`inference.inference_shardings`, `rollout_layout`) and `rollout_dtype`."""
  from jaxrl_dense import sampling  # pylint: disable=import-outside-toplevel
  if batch_size % num_samples:
    raise ValueError(f"rl_step_programs: batch_size={batch_size} is not a multiple of "
                     f"num_samples={num_samples}.")
  n_prompts = batch_size // num_samples
  prompts = abstract_batch(mesh, {"tokens": ((n_prompts, prompt_len), jnp.int32),
                                  "mask": ((n_prompts, prompt_len), jnp.int32)})
  rollout_params = abstract_params(config, mesh, dtype=rollout_dtype, layout=rollout_layout,
                                   max_bytes=rollout_max_bytes)
  rep = placement.replicated(mesh)
  scalar = lambda dt: jax.ShapeDtypeStruct((), jnp.dtype(dt), sharding=rep)
  key = jax.ShapeDtypeStruct(jax.random.PRNGKey(0).shape, jnp.uint32, sharding=rep)
  return Program(sampling._generate_jit,  # pylint: disable=protected-access
                 (rollout_params, prompts["tokens"], prompts["mask"], key, scalar(jnp.float32),
                  scalar(jnp.float32)),
                 dict(config=config, max_new_tokens=response_len, top_k=0, greedy=False,
                      use_top_p=False, eos_ids=tuple(config.eos_token_ids), num_samples=num_samples,
                      pad_id=0))


def update_program(model_config: Any, cfg: config_lib.PrimeConfig, mesh: Mesh) -> Program:
  """`make_prime(model_config, cfg, mesh).update_fn` with the abstract state (in the layout the
  build decided, `Prime.state_shardings`) and the rollout's batch (`rollout_batch_shapes`)."""
  built = prime.make_prime(model_config, cfg, mesh=mesh)
  state = abstract(prime.abstract_state(model_config, cfg), built.state_shardings)
  batch = abstract_rollout_batch(mesh, rollout_batch_shapes(cfg))
  rep = placement.replicated(mesh)
  key = jax.ShapeDtypeStruct(jax.random.PRNGKey(0).shape, jnp.uint32, sharding=rep)
  return Program(built.update_fn, (state, batch, key))


def stage_programs(model_config: Any, cfg: config_lib.PrimeConfig, mesh: Mesh) -> dict[str, Program]:
  """{"scoring", "prm_update" (PRIME only), "policy_update"}: the stages of
  `prime.make_stages(model_config, cfg, mesh)` jitted one by one with explicit shardings.

  Each takes the part of the `PrimeState` it reads (the others None: "scoring" the policy's
  params and the reference, "prm_update" the PRM's TrainState, "policy_update" the policy's; the
  frozen base where a LoRA adapter needs it), the batch as the production update hands it to the
  stage (the rollout's fields, plus old_logp / ref_logp for the PRM pass, plus the advantages for
  the policy pass: shapes traced through the earlier stages) and a key; the updates donate their
  TrainState.
  """
  stages = prime.make_stages(model_config, cfg, mesh)
  st_sh = prime.state_shardings(model_config, cfg, mesh)
  state = abstract(prime.abstract_state(model_config, cfg), st_sh)
  bsh = placement.batch_sharding(mesh, 1)  # prefix: every [B, ...] leaf along (data, fsdp)
  rep = placement.replicated(mesh)
  key = jax.ShapeDtypeStruct(jax.random.PRNGKey(0).shape, jnp.uint32, sharding=rep)
  batch = abstract_rollout_batch(mesh, rollout_batch_shapes(cfg))

  def part(tree, policy=None, prm=None, ref=False):
    """The PrimeState `tree` (abstract state or its shardings) with only the named parts."""
    pol = tree.policy if policy == "state" else (
        TrainState(tree.policy.params, None, None) if policy == "params" else None)
    return prime.PrimeState(pol, tree.prm if prm else None, tree.ref_params if ref else None)

  def jit(fn, in_shardings, out_shardings, donate=()):
    return jax.jit(mesh_lib.with_mesh(fn, mesh), in_shardings=in_shardings,
                   out_shardings=out_shardings, donate_argnums=donate)

  out = {}
  score_part = dict(policy="params", ref=True)
  score_state = part(state, **score_part)
  out["scoring"] = Program(jit(stages.score, (part(st_sh, **score_part), bsh), bsh),
                           (score_state, batch))
  # The batch as the next stages receive it (shapes traced through the stages, no compile).
  scored, _, extra = jax.eval_shape(stages.score, score_state, batch)
  prm_batch = _rows_sharded(mesh, scored)
  policy_in = scored
  if cfg.uses_prm:
    prm_part = dict(prm=True, ref=cfg.prm_lora is not None)
    prm_state = part(state, **prm_part)
    out["prm_update"] = Program(
        jit(stages.update_prm, (part(st_sh, **prm_part), bsh, rep), (st_sh.prm, bsh, rep), donate=(0,)),
        (prm_state, prm_batch, key))
    policy_in = jax.eval_shape(stages.update_prm, prm_state, prm_batch, key)[1]
  policy_in = jax.eval_shape(stages.advantages, policy_in, extra)[0]
  pol_part = dict(policy="state", ref=cfg.policy_lora is not None)
  out["policy_update"] = Program(
      jit(stages.update_policy, (part(st_sh, **pol_part), bsh, rep), (st_sh.policy, bsh, rep), donate=(0,)),
      (part(state, **pol_part), _rows_sharded(mesh, policy_in), key))
  return out


def rl_step_programs(config: Any, mesh: Mesh, *, batch_size: int, prompt_len: int,
                     response_len: int, micro_batch_size: int, mini_batch_size: Optional[int] = None,
                     num_samples: int = 2, rollout_layout: str = "auto",
                     rollout_max_bytes: Optional[int] = None, rollout_dtype: Any = None,
                     prime_config: Optional[config_lib.PrimeConfig] = None, optimizer: Any = None,
                     prm_beta: Optional[float] = None) -> dict[str, Program]:
  """The programs of one PRIME step (module docstring) as `Program`s: "generate", "scoring",
  "prm_update", "policy_update" and "update".

  `prime_config`: the run's PrimeConfig (its rollout sizes then shape the training programs);
  default `step_config(...)` of the sizes given: `batch_size` rows (batch_size / num_samples
  prompts x num_samples samples), `mini_batch_size` rows (default: the batch) per optimizer
  step, `micro_batch_size` rows per gradient-accumulation / scoring step (a multiple of
  data x fsdp, so every device keeps its own rows). The sampler always gets the sizes given.
  Deprecated (one release): `prm_beta` (give `prime_config`, or it sets the default config's
  --beta) and `optimizer` (ignored: the programs are the production ones, whose AdamW comes from
  the config's --lr / --weight_decay / --grad_clip and --prm_lr / ...).
  """
  changes = {}
  if prm_beta is not None:
    warnings.warn("rl_step_programs(prm_beta=) is deprecated; pass prime_config (its --beta)",
                  DeprecationWarning, stacklevel=2)
    changes["beta"] = prm_beta
  if optimizer is not None:
    warnings.warn("rl_step_programs(optimizer=) is deprecated and ignored: the programs are the "
                  "production ones, with the PrimeConfig's optimizers (pass prime_config with its "
                  "--lr, --weight_decay, --grad_clip, --prm_lr, ...)", DeprecationWarning, stacklevel=2)
  cfg = prime_config
  if cfg is None:
    cfg = step_config(batch_size=batch_size, prompt_len=prompt_len, response_len=response_len,
                      micro_batch_size=micro_batch_size, mini_batch_size=mini_batch_size,
                      num_samples=num_samples, **changes)
  elif changes:
    cfg = config_lib.replace(cfg, **changes)
  out = {"generate": generate_program(
      config, mesh, batch_size=batch_size, prompt_len=prompt_len, response_len=response_len,
      num_samples=num_samples, rollout_layout=rollout_layout, rollout_max_bytes=rollout_max_bytes,
      rollout_dtype=rollout_dtype)}
  out.update(stage_programs(config, cfg, mesh))
  out["update"] = update_program(config, cfg, mesh)
  return out
