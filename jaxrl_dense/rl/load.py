"""What a run loads from disk, and the checks that come before any of it: models, tokenizer, prompt
records, the checkpoint fingerprint and the compilation cache. Every failure is a `ConfigError`
naming the flag (field) at fault. (What a run will need, without loading it: `rl.plan`.)

  check_inputs(cfg)                  model specs exist and hold weights, data sources parse (every
                                     row of a .jsonl / .parquet file), output directories can be
                                     written, sizes within their bounds, before any model loads
  load_tokenizer(spec)               'smollm2', 'chars', a HF directory or a .gguf file
  load_model(spec, cfg, tokenizer)   (ModelConfig, params, tokenizer); 'random:K=V,...' = random init
  load_records(cfg)                  (train records, eval records)
  data_fingerprint(cfg)              content hash of a file --train_data (for the checkpoint)
  checkpoint_fingerprint(cfg)        config + data fingerprint a resumed checkpoint must match
  open_checkpointer(cfg)             the run's --checkpoint_dir with that fingerprint (training, or
                                     read_only for the tools that score a finished run)
  configure_compilation_cache(cfg)   JAX's persistent compilation cache under --logdir
"""
from __future__ import annotations

import glob
import os

from jaxrl_dense.rl.config import ConfigError, RunConfig

_RANDOM_KEYS = {"hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads",
                "kv_heads": "num_kv_heads", "mlp": "intermediate_size"}
_RANDOM_DEFAULT = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                   "intermediate_size": 128}


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
  """--compilation_cache_dir resolved: the directory, or '' (off). Unset, JAX's own setting
  ($JAX_COMPILATION_CACHE_DIR, one cache for every run of a machine or a test session) wins over
  the per-run default <logdir>/jax_cache."""
  spec = cfg.compilation_cache_dir
  if spec == "none":
    return ""
  if spec:
    return os.path.expanduser(spec)
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
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
  fields = {**config_lib.fingerprint(cfg), **data_fingerprint(cfg)}
  return ckpt_lib.make_fingerprint(None, **fields)


def open_checkpointer(cfg: RunConfig, *, read_only: bool = False):
  """The run's --checkpoint_dir as a `checkpoint.Checkpointer` whose fingerprint is
  `checkpoint_fingerprint(cfg)`, opened before any model loads: a directory written with other
  settings, or with another --train_data file's content, raises `CheckpointMismatchError` here.
  None without --checkpoint_dir.

  Training (default): saves every --checkpoint_every steps (else only the last), keeps
  --checkpoint_keep, and refuses a directory that already holds checkpoints unless --resume.
  `read_only=True` (experiments/prm_auroc.py, prm_step_credit.py score a finished run's PRM):
  the directory must hold a checkpoint (`CheckpointReadError` naming it otherwise)."""
  from jaxrl_dense import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from jaxrl_dense.rl import config as config_lib  # pylint: disable=import-outside-toplevel
  if not cfg.checkpoint_dir:
    return None
  kwargs = {} if read_only else {"save_every": cfg.checkpoint_every or cfg.steps,
                                 "keep_last": cfg.checkpoint_keep}
  ckpt = ckpt_lib.Checkpointer(cfg.checkpoint_dir, fingerprint=checkpoint_fingerprint(cfg),
                               renamed_keys=config_lib.renamed_settings(), **kwargs)
  latest = ckpt.latest_step()
  if read_only and latest is None:
    ckpt.close()
    raise ckpt_lib.CheckpointReadError(f"--checkpoint_dir={cfg.checkpoint_dir} holds no checkpoint")
  if not read_only and not cfg.resume and latest is not None:
    ckpt.close()
    raise ckpt_lib.CheckpointMismatchError(
        f"--checkpoint_dir={cfg.checkpoint_dir} already holds checkpoints (latest step "
        f"{latest}); pass --resume to continue it, or use another directory.")
  return ckpt
