"""What a run loads, and the checks that come before any of it: models, tokenizer, prompt records,
and the dry-run plan. Every failure is a `ConfigError` naming the flag (field) at fault.

  check_inputs(cfg)                  model specs exist and hold weights, data sources parse (every
                                     row of a .jsonl / .parquet file), output directories can be
                                     written, sizes within their bounds, before any model loads
  load_tokenizer(spec)               'smollm2', 'chars', a HF directory or a .gguf file
  load_model(spec, cfg, tokenizer)   (ModelConfig, params, tokenizer); 'random:K=V,...' = random init
  load_records(cfg)                  (train records, eval records)
  data_fingerprint(cfg)              content hash of a file --train_data (for the checkpoint)
  checkpoint_fingerprint(cfg)        config + data fingerprint a resumed checkpoint must match
  plan(cfg) -> (text, problems)      memory per device, steps, sizes (for --dry_run)
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import Optional

from jaxrl_dense.rl.config import ConfigError, RunConfig

_RANDOM_KEYS = {"hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads",
                "kv_heads": "num_kv_heads", "mlp": "intermediate_size"}
_RANDOM_DEFAULT = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                   "intermediate_size": 128}

# Architecture presets (for --dry_run without the checkpoint on disk).
ARCH_PRESETS = {
    # SmolLM2-135M-Instruct (HF config.json of HuggingFaceTB/SmolLM2-135M-Instruct).
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    # Qwen2.5-Math-7B (the base of Eurus-2-7B-SFT / -PRIME).
    "qwen2.5-math-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                            intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-6,
                            tie_word_embeddings=False, max_position_embeddings=4096),
}


def random_shape(spec: str) -> dict:
  """'random:hidden=64,layers=2' -> ModelConfig overrides (unknown keys raise ValueError)."""
  body = spec[len("random:"):]
  shape = dict(_RANDOM_DEFAULT)
  if body in ("", "tiny"):
    return shape
  for item in body.split(","):
    if "=" not in item:
      raise ValueError(f"expected key=value items after 'random:', got {item!r}")
    k, v = item.split("=", 1)
    if k.strip() not in _RANDOM_KEYS:
      raise ValueError(f"unknown random-model key {k!r}; known: {sorted(_RANDOM_KEYS)}")
    try:
      shape[_RANDOM_KEYS[k.strip()]] = int(v)
    except ValueError:
      raise ValueError(f"random-model key {k!r} needs an integer, got {v!r}") from None
    if int(v) <= 0:
      raise ValueError(f"random-model key {k!r} must be > 0")
  if shape["num_heads"] % shape["num_kv_heads"] or shape["hidden_size"] % shape["num_heads"]:
    raise ValueError("heads must divide hidden and be a multiple of kv_heads")
  return shape


def resolve_path(spec: str) -> str:
  if spec == "smollm2":
    from jaxrl_dense.models import loading
    return str(loading.smollm2_gguf_path())
  return spec


def check_model_spec(name: str, spec: str) -> None:
  """'smollm2', 'random:...', a .gguf file or a HF directory with config.json and weights."""
  if not spec and name != "model":
    return
  if spec == "smollm2":
    return
  if spec.startswith("random:"):
    try:
      random_shape(spec)
    except ValueError as e:
      raise ConfigError(name, spec, str(e)) from None
    return
  if not os.path.exists(spec):
    raise ConfigError(name, spec, "path does not exist (expected 'smollm2', 'random:...', a HF "
                      "directory or a .gguf file)")
  if os.path.isdir(spec):
    if not os.path.exists(os.path.join(spec, "config.json")):
      raise ConfigError(name, spec, "directory has no config.json")
    if not any(glob.glob(os.path.join(spec, pat)) for pat in ("*.safetensors", "*.bin", "*.gguf")):
      raise ConfigError(name, spec, "directory holds no weights (*.safetensors, *.bin or *.gguf)")


def check_data_spec(name: str, spec: str, cfg: RunConfig, allow_empty: bool) -> None:
  """Parses the whole data source (every row of a file), so a bad row fails before any model loads."""
  if not spec:
    if allow_empty:
      return
    raise ConfigError(name, spec, "must not be empty")
  if spec == "arithmetic":
    return
  from jaxrl_dense.data import prompts
  try:
    records = prompts.load_prompts(spec, **({"system_prompt": cfg.system_prompt} if cfg.system_prompt else {}))
  except (ValueError, OSError, ImportError) as e:  # PromptDataError, unknown sources, unreadable
    raise ConfigError(name, spec, str(e)) from None  # files, an optional package (rg:) missing
  from jaxrl_dense.verifiers import dispatch, sandbox
  n_code = sum(dispatch.kind_of_source(r.verifier_source) == "code" for r in records)
  if n_code:  # code rows need the isolating sandbox (or the explicit unsafe mode), known now
    try:
      sandbox.resolve_mode("unsafe" if cfg.unsafe_code_sandbox else "auto")
    except sandbox.SandboxUnavailableError as e:
      raise ConfigError(name, spec, f"{n_code} rows are scored by the code verifier: {e}") from None


OUTPUT_DIRS = ("logdir", "checkpoint_dir", "export_dir")
MAX_VERIFY_WORKERS_PER_CPU = 4


def _output_dir_problem(path: str):
  """Why directory `path` cannot be written (None: it can, or it can be created)."""
  p = os.path.abspath(path)
  if os.path.exists(p):
    if not os.path.isdir(p):
      return "exists and is not a directory"
    return None if os.access(p, os.W_OK | os.X_OK) else "directory is not writable"
  parent = os.path.dirname(p)
  while not os.path.exists(parent) and parent != os.path.dirname(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"cannot be created: {parent} is not a directory"
  return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot be created: {parent} is not writable"


def check_output_dir(name: str, path: str) -> None:
  """An output directory flag: '' (off), an existing writable directory, or a path that can be
  created (its nearest existing ancestor is a writable directory). Not an existing file."""
  why = _output_dir_problem(path) if path else None
  if why:
    raise ConfigError(name, path, why)


def check_output_file(name: str, path: str) -> None:
  """An output file flag: '' (off), or a path that is not a directory, in a writable directory."""
  if not path:
    return
  if os.path.isdir(path):
    raise ConfigError(name, path, "is a directory (expected a file path)")
  why = _output_dir_problem(os.path.dirname(os.path.abspath(path)))
  if why:
    raise ConfigError(name, path, f"its directory {why}")


def arith_task(cfg: RunConfig):
  """The `data.arithmetic.ArithmeticTask` of the --arith_* flags (`cfg.arithmetic`, the task config
experiments/eval_math.py reuses)."""
  return cfg.arithmetic.task()


def model_vocab_size(cfg: RunConfig) -> int:
  """The policy's vocabulary size without loading its weights: the tokenizer of a random: model,
  config.json of a HF directory, the embedding's shape in a .gguf file."""
  spec = cfg.model
  if spec.startswith("random:"):
    return len(load_tokenizer(cfg.tokenizer))
  path = resolve_path(spec)
  try:
    if os.path.isdir(path):
      from jaxrl_dense.models import ModelConfig, hf_io
      return int(ModelConfig.from_hf_dict(hf_io.read_hf_config(path), source=path).vocab_size)
    from jaxrl_dense.models import gguf
    return gguf.vocab_size(path)
  except (ValueError, OSError, KeyError) as e:
    raise ConfigError("model", spec, f"cannot read its vocabulary size: {e}") from None


def check_limits(cfg: RunConfig) -> None:
  """Upper bounds that depend on this machine, the data or the model (ConfigError naming the flag):
  --verify_workers, --arith_num_eval (distinct arithmetic problems), --top_k (vocabulary)."""
  cpus = os.cpu_count() or 1
  if cfg.verify_workers > MAX_VERIFY_WORKERS_PER_CPU * cpus:
    raise ConfigError("verify_workers", cfg.verify_workers, f"must be <= {MAX_VERIFY_WORKERS_PER_CPU} "
                      f"x the {cpus} CPUs of this machine (0 = one per CPU)")
  if "arithmetic" in (cfg.train_data, cfg.eval_data):
    from jaxrl_dense.data import arithmetic
    n = arithmetic.num_distinct_problems(arith_task(cfg))
    if cfg.arith_num_eval >= n:
      raise ConfigError("arith_num_eval", cfg.arith_num_eval, f"must be < the {n} distinct problems of "
                        f"--arith_ops={cfg.arith_ops} --arith_max_digits={cfg.arith_max_digits} "
                        "(the rest are the training problems)")
  top_k = cfg.prime.rollout.top_k
  if top_k:
    vocab = model_vocab_size(cfg)
    if top_k > vocab:
      raise ConfigError("top_k", top_k, f"must be <= the vocabulary size {vocab} of --model={cfg.model}")


def compilation_cache_dir(cfg: RunConfig) -> str:
  """--compilation_cache_dir resolved: the directory, or '' (off)."""
  spec = cfg.compilation_cache_dir
  if spec == "none":
    return ""
  if spec:
    return os.path.expanduser(spec)
  return os.path.join(cfg.logdir, "jax_cache") if cfg.logdir else ""


def configure_compilation_cache(cfg: RunConfig) -> str:
  """Turns on JAX's persistent compilation cache in `compilation_cache_dir(cfg)` (every program,
  however fast it compiled: an RL step compiles a few large programs, the update once per length
  bucket); returns the directory or ''. Call before the first compilation. The setting is
  process-wide: the scripts call it (experiments/prime_math.py), the `Trainer` does not, so
  library users and tests in one process keep their own cache settings."""
  import jax  # pylint: disable=import-outside-toplevel
  path = compilation_cache_dir(cfg)
  if not path:
    return ""
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def check_process_reward(spec: str, timeout_s: float = 5.0) -> None:
  """--process_reward: a served PRM answers; a prm:DIR holds a step-scoring PRM (its config's
  architecture, tokenizer files): cheap, no weights read."""
  if spec.startswith("prm:"):
    from jaxrl_dense.models import hf_io, prm_head  # pylint: disable=import-outside-toplevel
    from jaxrl_dense.models import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
    path = resolve_path(spec[4:])
    if not os.path.isdir(path):
      raise ConfigError("process_reward", spec, "is not a directory (a Hugging Face PRM directory)")
    try:
      archs = hf_io.read_hf_config(path).get("architectures") or []
    except (OSError, ValueError) as e:
      raise ConfigError("process_reward", spec, f"cannot read its config.json: {e}") from None
    if not set(archs) & set(prm_head.PRM_ARCHITECTURES):
      raise ConfigError("process_reward", spec, f"architectures={archs} is not a step-scoring PRM "
                        f"(one of {sorted(prm_head.PRM_ARCHITECTURES)})")
    if not tok_lib.has_tokenizer_files(path):
      raise ConfigError("process_reward", spec, "has no tokenizer files (the PRM scores text in its "
                        "own tokenizer)")
    return
  from jaxrl_dense.rewards import service  # pylint: disable=import-outside-toplevel
  try:
    service.check_service(spec, timeout_s=min(5.0, timeout_s))
  except ValueError as e:
    raise ConfigError("process_reward", spec, str(e)) from None


def check_inputs(cfg: RunConfig) -> None:
  """Model, data, output-path and bound checks (raises ConfigError naming the flag). Cheap except
  for large data files."""
  for name in ("model", "ref_model", "prm_model"):
    check_model_spec(name, getattr(cfg, name))
  check_data_spec("train_data", cfg.train_data, cfg, allow_empty=False)
  check_data_spec("eval_data", cfg.eval_data, cfg, allow_empty=True)
  for name in OUTPUT_DIRS:
    check_output_dir(name, getattr(cfg, name))
  if cfg.compilation_cache_dir not in ("", "none"):
    check_output_dir("compilation_cache_dir", cfg.compilation_cache_dir)
  check_limits(cfg)
  if cfg.prime.process_reward:  # the external PRM is there before any model loads
    check_process_reward(cfg.prime.process_reward, cfg.prime.reward_timeout_s)
  if cfg.resume and not os.path.isdir(cfg.checkpoint_dir):
    raise ConfigError("checkpoint_dir", cfg.checkpoint_dir, "does not exist (nothing to resume)")
  if (cfg.sample_every or cfg.wandb_project) and not cfg.logdir:
    raise ConfigError("sample_every" if cfg.sample_every else "wandb_project",
                      cfg.sample_every or cfg.wandb_project, "needs --logdir")
  if cfg.wandb_project:
    import importlib.util
    if importlib.util.find_spec("wandb") is None:
      raise ConfigError("wandb_project", cfg.wandb_project, "needs the optional `wandb` package "
                        "(pip install wandb)")


def load_tokenizer(spec: str):
  """The tokenizer of a checkpoint ('smollm2', a HF directory or a .gguf file), or 'chars' (the
  character-level ChatML tokenizer, built in milliseconds, for random: models)."""
  from jaxrl_dense.models import gguf
  from jaxrl_dense.models import tokenizer as tok_lib
  if spec == "chars":
    return tok_lib.char_chat_tokenizer()
  path = resolve_path(spec)
  if not os.path.exists(path):
    raise ConfigError("tokenizer", spec, "path does not exist")
  try:
    if str(path).endswith(".gguf"):
      return tok_lib.tokenizer_from_gguf_metadata(gguf.read_gguf_metadata(path), source=str(path))
    return tok_lib.tokenizer_from_hf_dir(path)
  except (ValueError, OSError) as e:  # a damaged file: the loaders name it
    raise ConfigError("tokenizer", spec, f"cannot load the tokenizer: {e}") from None


def dtype_overrides(cfg: RunConfig) -> dict:
  """Mixed precision: float32 master parameters (so gradients, their accumulation and the AdamW
  states are float32 too), activations and matmuls in --dtype."""
  return dict(param_dtype="float32", dtype=cfg.dtype, remat=cfg.remat)


def load_model(spec: str, cfg: RunConfig, tokenizer=None, seed: int = 0, name: str = "model"):
  """(ModelConfig, params, tokenizer) for a model spec (see --model); a file that cannot be read
  (damaged .gguf / config.json / .safetensors) raises ConfigError naming flag `name` and the file."""
  import jax
  from jaxrl_dense import models
  if spec.startswith("random:"):
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    shape = random_shape(spec)
    eos = tok.convert_tokens_to_ids(["<|im_end|>"]) if "<|im_end|>" in tok.get_vocab() else [tok.eos_token_id]
    mc = models.ModelConfig(model_type="llama", vocab_size=len(tok), head_dim=shape["hidden_size"] // shape["num_heads"],
                            rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=4096,
                            bos_token_id=tok.bos_token_id, eos_token_ids=tuple(int(e) for e in eos),
                            pad_token_id=tok.pad_token_id, **shape, **dtype_overrides(cfg))
    return mc, models.init_params(mc, jax.random.PRNGKey(seed)), tok
  try:
    loaded = models.load_pretrained(resolve_path(spec))  # float32 master weights
  except (ValueError, OSError) as e:  # the loaders name the file and what is wrong with it
    raise ConfigError(name, spec, f"cannot load the model: {e}") from None
  import jax.numpy as jnp
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), loaded.params)
  return (loaded.config.replace(**dtype_overrides(cfg)), params,
          tokenizer if tokenizer is not None else loaded.tokenizer)


def load_records(cfg: RunConfig):
  """(train records, eval records) of the configured data (eval cut to --eval_size)."""
  from jaxrl_dense.data import arithmetic, prompts
  task = arith_task(cfg)
  arith = None

  def get(spec, split):
    nonlocal arith
    if spec == "arithmetic":
      if arith is None:
        arith = arithmetic.make_splits(task)
      return arith[0] if split == "train" else arith[1]
    return prompts.load_prompts(spec, **({"system_prompt": cfg.system_prompt} if cfg.system_prompt else {}))

  train = get(cfg.train_data, "train")
  ev = get(cfg.eval_data, "eval") if cfg.eval_data else []
  return train, (ev[:cfg.eval_size] if cfg.eval_size else ev)


def data_fingerprint(cfg: RunConfig) -> dict:
  """{"train_data_sha256": hex digest} when --train_data is a file (else {}): part of the
  checkpoint fingerprint, so a resume refuses a data file whose rows changed under the same path
  (the data-iterator state indexes its rows)."""
  if not os.path.isfile(cfg.train_data):
    return {}
  import hashlib
  h = hashlib.sha256()
  with open(cfg.train_data, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return {"train_data_sha256": h.hexdigest()}


def checkpoint_fingerprint(cfg: RunConfig) -> dict:
  """What a run's checkpoint must agree with to be resumed (`checkpoint.Checkpointer`'s
  fingerprint): the config's `rl.config.fingerprint` and `data_fingerprint`."""
  from jaxrl_dense import checkpoint as ckpt_lib
  from jaxrl_dense.rl import config as config_lib
  return ckpt_lib.make_fingerprint(None, **config_lib.fingerprint(cfg), **data_fingerprint(cfg))


def mesh_devices(cfg: RunConfig) -> int:
  """Devices a mesh spec asks for (-1 or an unparsable size: this host's devices)."""
  import jax
  total = 1
  for item in cfg.mesh.split(","):
    if ":" in item:
      try:
        size = int(item.split(":", 1)[1])
      except ValueError:
        return len(jax.devices())
      if size == -1:
        return len(jax.devices())
      total *= max(size, 1)
  return total


def check_mesh(cfg: RunConfig, num_devices: Optional[int] = None) -> None:
  from jaxrl_dense.parallel import sharding
  import jax
  try:
    sharding.parse_mesh_spec(cfg.mesh, num_devices or len(jax.devices()))
  except Exception as e:  # noqa: BLE001 - re-raised naming the flag
    raise ConfigError("mesh", cfg.mesh, str(e)) from None
  if cfg.rollout_mesh:  # the sampler's mesh: the same devices as --mesh
    try:
      sharding.parse_mesh_spec(cfg.rollout_mesh, num_devices or mesh_devices(cfg))
    except Exception as e:  # noqa: BLE001 - re-raised naming the flag
      raise ConfigError("rollout_mesh", cfg.rollout_mesh, f"{e} (it spans --mesh={cfg.mesh}'s devices)") from None


def _plan_model_config(cfg: RunConfig, problems: list):
  """The policy's ModelConfig without loading weights (config.json / GGUF metadata / preset)."""
  from jaxrl_dense.models import ModelConfig
  spec = cfg.model
  if spec.startswith("random:"):
    shape = random_shape(spec)
    return ModelConfig(model_type="llama", vocab_size=49152, head_dim=shape["hidden_size"] // shape["num_heads"],
                       **shape, **dtype_overrides(cfg)), "random init"
  path = resolve_path(spec)
  try:
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
      from jaxrl_dense.models import hf_io
      return ModelConfig.from_hf_dict(hf_io.read_hf_config(path), source=path, **dtype_overrides(cfg)), path
    if str(path).endswith(".gguf") and os.path.exists(path):
      if "smollm2" not in str(path).lower():
        raise ValueError("cannot plan a GGUF architecture without --arch")
      return ModelConfig.from_hf_dict(ARCH_PRESETS["smollm2-135m"], **dtype_overrides(cfg)), path
  except Exception as e:  # noqa: BLE001
    problems.append(f"--model={spec}: cannot read its config: {e}")
  if cfg.arch:
    if cfg.arch not in ARCH_PRESETS:
      problems.append(f"--arch={cfg.arch}: unknown preset; known: {sorted(ARCH_PRESETS)}")
      return None, None
    return ModelConfig.from_hf_dict(ARCH_PRESETS[cfg.arch], **dtype_overrides(cfg)), f"preset {cfg.arch}"
  return None, None


def plan(cfg: RunConfig):
  """(plan text, problems): the sizes and per-device memory estimate of a run, and every path
  problem (for --dry_run; nothing is loaded)."""
  import jax
  import numpy as np
  from jaxrl_dense import models
  from jaxrl_dense.parallel import sharding
  problems = []
  for name in ("model", "ref_model", "prm_model"):
    try:
      check_model_spec(name, getattr(cfg, name))
    except ConfigError as e:
      problems.append(str(e))
  for name in ("train_data", "eval_data"):
    try:
      check_data_spec(name, getattr(cfg, name), cfg, allow_empty=(name == "eval_data"))
    except ConfigError as e:
      problems.append(str(e))
  for name, check in [(n, check_output_dir) for n in OUTPUT_DIRS] + [("plan_json", check_output_file)]:
    try:
      check(name, getattr(cfg, name))
    except ConfigError as e:
      problems.append(str(e))
  try:
    check_limits(cfg)
  except ConfigError as e:
    problems.append(str(e))
  p, r = cfg.prime, cfg.prime.rollout
  mc, source = _plan_model_config(cfg, problems)
  ndev = mesh_devices(cfg)
  sizes = sharding.parse_mesh_spec(cfg.mesh, ndev)
  shard, dp = sizes["fsdp"] * sizes["tensor"], sizes["data"] * sizes["fsdp"]
  lines = [f"PRIME plan ({p.algo}, reference_impl={p.reference_impl}, prm_update={p.prm.prm_update})",
           f"  mesh {cfg.mesh}: {ndev} device(s) (this host has {len(jax.devices())} "
           f"{jax.devices()[0].platform} device(s))",
           f"  steps {cfg.steps}: {r.prompts_per_step * r.oversample} prompts sampled x n={r.n} = "
           f"{r.sampled_rows} responses, {r.rows} kept per step ({r.rows * cfg.steps} trained responses in total)",
           f"  policy: {r.rows // p.policy_mini} optimizer step(s)/RL step x {p.policy.epochs} epoch(s), "
           f"micro-batch {p.policy.micro_batch_size} ({max(p.policy.micro_batch_size // dp, 1)} per data "
           f"shard); lr {p.policy.lr}"]
  if p.uses_prm:
    lines.append(f"  PRM: {r.rows // p.prm_mini} optimizer step(s)/RL step, micro-batch "
                 f"{p.prm.prm_micro_batch_size}, lr {p.prm.prm_lr}, beta {p.prm.beta}")
  T = r.max_prompt_length + r.max_response_length
  lines.append(f"  sequence {r.max_prompt_length} prompt + {r.max_response_length} response = {T} tokens")
  if mc is not None:
    shapes = jax.eval_shape(lambda k: models.init_params(mc, k), jax.random.PRNGKey(0))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
    pbytes = 4  # float32 master weights (compute in --dtype)
    n_models = 3 if p.uses_prm else (2 if p.needs_ref else 1)
    n_trained = 2 if p.uses_prm else 1
    mom = 6 if p.moments_dtype == "bfloat16" else 8  # AdamW mu (moments_dtype) + nu (float32)
    state = n_params * (n_models * pbytes + n_trained * (pbytes + mom))  # params, grads, moments
    mb = max(p.policy.micro_batch_size // dp, 1)
    act = mb * T * mc.hidden_size * 4 * (mc.num_layers + 8)  # remat: one layer input per layer + work
    head = 2 * min(1024, mb * T) * mc.vocab_size * 4
    # one sampler call (--generate_batch_size prompts x n) on the sampler's mesh (--rollout_mesh)
    rs = sharding.parse_mesh_spec(cfg.rollout_mesh, ndev) if cfg.rollout_mesh else sizes
    kv = (max(r.generate_prompts * r.n // (rs["data"] * rs["fsdp"]), 1) * T * mc.num_layers * 2
          * max(mc.num_kv_heads // rs["tensor"], 1) * mc.head_dim * (2 if cfg.dtype == "bfloat16" else 4))
    per_dev = state / shard + act + head
    lines.append(f"  model ({source}): {n_params / 1e6:.1f}M params, {mc.num_layers} layers, "
                 f"d={mc.hidden_size}, vocab {mc.vocab_size}")
    lines.append(f"  memory per device (estimate): states {state / shard / 2**30:.2f} GiB ({n_models} models, "
                 f"{n_trained} trained, sharded over fsdp*tensor={shard}) + activations {act / 2**30:.2f} GiB "
                 f"+ LM-head chunk {head / 2**30:.2f} GiB = {per_dev / 2**30:.2f} GiB; rollout KV cache "
                 f"{kv / 2**30:.2f} GiB per sampler call")
  else:
    problems.append("cannot build the model config (give a readable --model or --arch)")
  return "\n".join(lines), problems


# Accelerators a memory plan can be checked against. hbm_gib: device memory as the runtime
# reports it; reserve_gib: what runs outside JAX's pool (GPU: CUDA context, cuBLAS/cuDNN
# workspaces, NCCL buffers; TPU: the runtime's own reservation), a stated allowance, not a
# measurement; fraction: whether XLA_PYTHON_CLIENT_MEM_FRACTION applies (GPU) and JAX's default.
PLAN_TARGETS = {
    "h100": {"hbm_gib": 79.6, "reserve_gib": 4.0, "platform": "gpu", "default_fraction": 0.75},
    "h200": {"hbm_gib": 139.8, "reserve_gib": 4.0, "platform": "gpu", "default_fraction": 0.75},
    "v5e": {"hbm_gib": 15.75, "reserve_gib": 0.5, "platform": "tpu", "default_fraction": None},
    "v5p": {"hbm_gib": 95.74, "reserve_gib": 0.5, "platform": "tpu", "default_fraction": None},
}


def target_fit(peak_bytes: int, target: str, memory_fraction: float = 0.0) -> dict:
  """Whether a plan's per-device peak fits `target` (a PLAN_TARGETS name).

  GPU: JAX's pool is memory_fraction x HBM (JAX's default 0.75 when 0); it must hold the peak,
  and the rest must hold the reserve, so the plan fits when
      peak <= f x HBM   and   (1 - f) x HBM >= reserve,
  with `need_fraction` = peak / HBM rounded up to 0.01 and `max_fraction` = 1 - reserve / HBM.
  TPU: the peak must fit HBM - reserve.
  """
  if target not in PLAN_TARGETS:
    raise ConfigError("plan_target", target, f"expected one of {sorted(PLAN_TARGETS)}")
  t = PLAN_TARGETS[target]
  hbm = t["hbm_gib"] * 2**30
  peak_gib = peak_bytes / 2**30
  out = {"target": target, "hbm_gib": t["hbm_gib"], "reserve_gib": t["reserve_gib"],
         "peak_gib": round(peak_gib, 2)}
  if t["platform"] == "gpu":
    need = math.ceil(100 * peak_bytes / hbm) / 100
    max_f = math.floor(100 * (1 - t["reserve_gib"] / t["hbm_gib"])) / 100
    f = memory_fraction or t["default_fraction"]
    out.update(need_fraction=need, max_fraction=max_f, memory_fraction=f,
               pool_gib=round(f * t["hbm_gib"], 2), fits_budget=need <= max_f,
               fits=peak_bytes <= f * hbm and f <= max_f)
  else:
    out.update(budget_gib=round(t["hbm_gib"] - t["reserve_gib"], 2),
               fits=peak_gib <= t["hbm_gib"] - t["reserve_gib"])
    out["fits_budget"] = out["fits"]
  return out


def abstract_update(cfg: RunConfig, mesh) -> tuple:
  """The trainer's one jitted update (`rl.prime.make_prime`, as `Trainer` builds it, LoRA
  included) and abstract arguments for it on `mesh`: ShapeDtypeStructs carrying their
  shardings, no weights read. Returns (update_fn, (state, batch, key), model_config, source);
  `update_fn.lower(*args)` inside `sharding.use_mesh(mesh)` gives the program that runs.
  """
  import jax
  import jax.numpy as jnp
  from jaxrl_dense.parallel import plan as sharding_plan
  from jaxrl_dense.parallel import sharding
  from jaxrl_dense.rl import prime
  from jaxrl_dense.rl.batch import RolloutBatch
  problems: list = []
  mc, source = _plan_model_config(cfg, problems)
  if mc is None:
    raise ConfigError("model", cfg.model, "cannot build the model config for --aot "
                      "(give a readable --model or an --arch preset)")
  p, r = cfg.prime, cfg.prime.rollout
  key = jax.random.PRNGKey(0)
  # The production build (as `Trainer` builds it): its state layout, decided from abstract shapes,
  # is the one the abstract state carries.
  built = prime.make_prime(mc, p, mesh=mesh)
  state = sharding_plan.abstract(prime.abstract_state(mc, p), built.state_shardings)
  rows, P_, R_ = r.rows, r.max_prompt_length, r.max_response_length
  ab = lambda shapes: sharding_plan.abstract_batch(mesh, shapes)
  b = ab({"prompt_tokens": ((rows, P_), jnp.int32), "prompt_mask": ((rows, P_), jnp.int32),
          "response_tokens": ((rows, R_), jnp.int32), "response_mask": ((rows, R_), jnp.float32),
          "outcome": ((rows,), jnp.float32), "sampler_logp": ((rows, R_), jnp.float32),
          "in_band": ((rows,), jnp.float32)})  # rollout.collect always fills both
  if p.process_reward:
    b.update(ab({"process_rewards": ((rows, R_), jnp.float32)}))
  if r.env:  # multi-turn rows (rl/multiturn.py): observations attended, turn ids, turn rewards
    b.update(ab({"observation_mask": ((rows, R_), jnp.float32), "turn_ids": ((rows, R_), jnp.int32)}))
    if p.advantage in ("matchtir", "igpo"):
      b.update(ab({"turn_rewards": ((rows, r.max_turns), jnp.float32)}))
  batch = RolloutBatch(**b)
  rep = sharding.replicated(mesh)
  akey = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
  return built.update_fn, (state, batch, akey), mc, source


# Settings that shape the programs `aot_plan` compiles (recorded in the plan as "flags", so a
# recorded plan can be checked against the flag file it claims to be of).
PLAN_FLAGS = ("arch", "dtype", "remat", "mesh", "rollout_mesh", "algo", "reference_impl", "prm_update",
              "n", "prompts_per_step", "generate_batch_size", "max_prompt_length",
              "max_response_length", "rollout_engine", "mini_batch_size", "micro_batch_size",
              "prm_mini_batch_size", "prm_micro_batch_size", "score_micro_batch_size",
              "recompute_old_logp", "moments_dtype", "lora_rank", "prm_lora_rank")


def aot_plan(cfg: RunConfig, devices=None) -> dict:
  """The compiled memory plan of one RL step (--dry_run --aot).

  Lowers and compiles, from abstract inputs (`jax.ShapeDtypeStruct`s with their shardings; no
  weights are read), the two programs a training step runs on `cfg.mesh`:

    generate   the rollout sampler (`sampling`'s jitted static sampler; one call of
               --generate_batch_size prompts x n samples, max_prompt_length + max_response_length
               tokens, the KV cache in --dtype) on the params exactly as `rl.rollout.collect`
               passes them: the rollout copy of the policy (`sharding.rollout_params`: the
               compute dtype, the decode layout; on --rollout_mesh when set), made once per
               rollout;
    update     `rl.prime.make_prime`'s ONE jitted update (scoring, PRM update, advantages, PPO
               update; donated state), exactly as the trainer builds it (LoRA included).

  and reads per-device bytes from `compiled.memory_analysis()` (`sharding_plan.memory_stats`).
  While the sampler runs, the training state (policy / PRM params and AdamW states, the
  reference) stays resident; `generate_with_state_bytes` adds it, and `peak_bytes_per_device`
  is the larger of that and the update's peak.

  Returns {"mesh", "param_dtype", "compute_dtype", "model", "programs": {name: bytes dict},
  "resident_state_bytes", "generate_with_state_bytes", "peak_bytes_per_device", "lora": ...}.
  """
  from jaxrl_dense.parallel import plan as sharding_plan
  from jaxrl_dense.parallel import sharding
  from jaxrl_dense.rl import config as config_lib
  p, r = cfg.prime, cfg.prime.rollout
  mesh = sharding.make_mesh(cfg.mesh, devices=devices)
  update_fn, (state, batch, akey), mc, source = abstract_update(cfg, mesh)
  lora_any = p.policy_lora is not None or p.prm_lora is not None
  rows, P_, R_ = r.rows, r.max_prompt_length, r.max_response_length
  try:  # = Trainer.rollout_params: the sampler's mesh (--rollout_mesh) and the copy's layout on it
    rmesh, rlayout = sharding.rollout_mesh_layout(mc, mesh, cfg.rollout_mesh)
  except ValueError as e:
    raise ConfigError("rollout_mesh", cfg.rollout_mesh, str(e)) from None
  gen = sharding_plan.rl_step_programs(
      mc, rmesh, batch_size=r.generate_prompts * r.n, prompt_len=P_, response_len=R_,
      micro_batch_size=p.policy.micro_batch_size, num_samples=r.n,
      rollout_layout="inference" if rlayout == "auto" else rlayout,
      rollout_dtype=None if mc.dtype == "float32" else mc.dtype)["generate"]
  out = {"generate": sharding_plan.memory_stats(sharding_plan.compile_program(gen, rmesh))}
  with sharding.use_mesh(mesh):
    out["update"] = sharding_plan.memory_stats(update_fn.lower(state, batch, akey).compile())
  resident = sharding_plan.per_device_bytes(state)
  # generate's params argument is the rollout copy (sharding.rollout_params: compute dtype, decode
  # layout), held beside the resident training state while the rollout runs
  gen_total = out["generate"]["peak_bytes"] + resident
  return {"mesh": dict(mesh.shape), "rollout_mesh": dict(rmesh.shape), "rollout_layout": rlayout,
          "devices": int(mesh.size),
          "platform": mesh.devices.flat[0].platform, "param_dtype": "float32",
          "compute_dtype": mc.dtype, "model": source, "num_layers": mc.num_layers,
          "hidden_size": mc.hidden_size,
          "lora": {"policy": dataclasses.asdict(p.policy_lora) if p.policy_lora else None,
                   "prm": dataclasses.asdict(p.prm_lora) if p.prm_lora else None} if lora_any else None,
          "rows": rows, "sampled_rows": r.sampled_rows, "generate_rows": r.generate_prompts * r.n,
          "prompt_len": P_, "response_len": R_,
          "flags": {k: v for k, v in config_lib.flat(cfg).items() if k in PLAN_FLAGS},
          "programs": out, "resident_state_bytes": resident, "generate_with_state_bytes": gen_total,
          "peak_bytes_per_device": max(gen_total, out["update"]["peak_bytes"])}


def plan_markdown(plan: dict) -> str:
  """A markdown table of an `aot_plan` (GiB per device), as docs/scaling.md shows it."""
  gib = lambda b: f"{b / 2**30:.2f}"
  rows = ["| program | arguments | outputs | temporaries | aliased | peak |",
          "| --- | --- | --- | --- | --- | --- |"]
  for name, m in plan["programs"].items():
    rows.append(f"| {name} | {gib(m['argument_bytes'])} | {gib(m['output_bytes'])} | "
                f"{gib(m['temp_bytes'])} | {gib(m['alias_bytes'])} | {gib(m['peak_bytes'])} |")
  rows.append(f"| resident training state (policy + PRM params and AdamW, reference) | | | | | "
              f"{gib(plan['resident_state_bytes'])} |")
  rows.append(f"| generate + resident state | | | | | {gib(plan['generate_with_state_bytes'])} |")
  rows.append(f"| **peak per device** | | | | | **{gib(plan['peak_bytes_per_device'])}** |")
  return "\n".join(rows)
