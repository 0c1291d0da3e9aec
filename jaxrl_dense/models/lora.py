"""LoRA adapters for the decoders of `jaxrl_dense.models` (Hu et al., 2021, arXiv:2106.09685).

A LoRA-adapted linear layer with frozen base weight W [in, out] computes

  y = x W (+ bias) + (alpha / r) * (x A) B,      A [in, r], B [r, out]

with A random (PEFT's default: U(-1/sqrt(in), 1/sqrt(in))) and B = 0 at init, so the adapted
model starts exactly at the base. Only A and B are trained.

Adapters are their own params pytree, mirroring the base tree (layers stacked on axis 0):

  {"layers": {"self_attn": {"q_proj": {"lora_a": [L, D, r], "lora_b": [L, r, H*hd]}, ...},
              "mlp": {"gate_proj": {...}, "up_proj": {...}, "down_proj": {...}}}}

so the optimizer state holds only them (`optimizer.init(adapters)`), and `rules.param_specs`
shards lora_a like the base kernel's input axis and lora_b like its output axis.

Use:
  base, config = freeze_base(params, config)              # one frozen copy, compute dtype
  adapters = init_adapters(config, lora_config, rng)
  logits = transformer.forward(attach(base, adapters, lora_config), config, tokens, mask)
  # (= lora.forward(base, adapters, config, lora_config, tokens, mask))
  ref_logits = transformer.forward(base, config, tokens, mask)   # adapters off = pi_ref
  merged = merge(base, adapters, lora_config)             # plain params, for export / sampling
  save_merged(base, adapters, config, lora_config, tokenizer, "out_dir")

`attach` returns the base params plus a "lora" entry (B pre-scaled by alpha / r; base behind
`stop_gradient`), which every function of `transformer` (forward, hidden_states,
shared-prefix passes, prefill/decode, `sampling.generate`) applies: the trunk's Dense layers add
(x A) B, and the sampler's decode path merges once per `generate` call. With the base frozen,
the reference policy of PRIME/GRPO KL terms is the same base with adapters off: one copy of the
weights serves the policy/PRM and the reference.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxrl_dense.models.config import ModelConfig

Params = dict[str, Any]

# Target name -> (module group, HF/our module name).
TARGETS = {
    "q_proj": ("self_attn", "q_proj"), "k_proj": ("self_attn", "k_proj"),
    "v_proj": ("self_attn", "v_proj"), "o_proj": ("self_attn", "o_proj"),
    "gate_proj": ("mlp", "gate_proj"), "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
}
_SHORT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
          "up": "up_proj", "down": "down_proj"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyperparameters (hashable; one per model, e.g. the policy and the PRM independently).

  Attributes:
    rank: r >= 1, inner width of A [in, r] and B [r, out].
    alpha: scaling numerator; the update is (alpha / rank) * x A B (PEFT's `lora_alpha`).
    target_modules: linear layers to adapt: any of q_proj, k_proj, v_proj, o_proj, gate_proj,
      up_proj, down_proj (short names q, k, v, o, gate, up, down accepted); stored as full names.
    param_dtype: storage dtype of A and B ("float32" recommended: they are trained).
  """
  rank: int = 8
  alpha: float = 16.0
  target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
  param_dtype: str = "float32"

  def __post_init__(self):
    if int(self.rank) != self.rank or self.rank < 1:
      raise ValueError(f"LoraConfig.rank={self.rank!r} must be a positive integer.")
    if not self.alpha > 0:
      raise ValueError(f"LoraConfig.alpha={self.alpha!r} must be > 0.")
    targets = (self.target_modules.split(",") if isinstance(self.target_modules, str)
               else list(self.target_modules))
    full = []
    for t in targets:
      name = _SHORT.get(t.strip(), t.strip())
      if name not in TARGETS:
        raise ValueError(f"LoraConfig.target_modules has unknown module {t!r}; choose from "
                         f"{sorted(TARGETS)} (or {sorted(_SHORT)}).")
      if name not in full:
        full.append(name)
    if not full:
      raise ValueError("LoraConfig.target_modules is empty.")
    object.__setattr__(self, "target_modules", tuple(full))
    if self.param_dtype not in _DTYPES:
      raise ValueError(f"LoraConfig.param_dtype={self.param_dtype!r}; expected one of {sorted(_DTYPES)}.")

  @property
  def scale(self) -> float:
    """alpha / rank, the multiplier of x A B."""
    return float(self.alpha) / float(self.rank)


def _in_out(config: ModelConfig, name: str) -> tuple[int, int]:
  d, i = config.hidden_size, config.intermediate_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
          "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}[name]


def init_adapters(config: ModelConfig, lora_config: LoraConfig, rng: jax.Array) -> Params:
  """Fresh adapters: A ~ U(-1/sqrt(in), 1/sqrt(in)) [L, in, r] (PEFT's kaiming-uniform(a=sqrt 5)),
  B = 0 [L, r, out], for every target module; dtype `lora_config.param_dtype`."""
  dt = _DTYPES[lora_config.param_dtype]
  out: Params = {}
  for k, name in zip(jax.random.split(rng, len(lora_config.target_modules)),
                     lora_config.target_modules):
    group, mod = TARGETS[name]
    fan_in, fan_out = _in_out(config, name)
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(k, (config.num_layers, fan_in, lora_config.rank), jnp.float32,
                           -bound, bound).astype(dt)
    b = jnp.zeros((config.num_layers, lora_config.rank, fan_out), dt)
    out.setdefault("layers", {}).setdefault(group, {})[mod] = {"lora_a": a, "lora_b": b}
  return out


def check_adapters(adapters: Params, config: ModelConfig, lora_config: LoraConfig) -> None:
  """Raises ValueError naming the module when `adapters` do not fit (config, lora_config)."""
  layers = adapters.get("layers", {}) if isinstance(adapters, dict) else {}
  for name in lora_config.target_modules:
    group, mod = TARGETS[name]
    entry = layers.get(group, {}).get(mod)
    if entry is None or set(entry) != {"lora_a", "lora_b"}:
      raise ValueError(f"adapters lack layers/{group}/{mod}/{{lora_a, lora_b}} required by "
                       f"target_modules={lora_config.target_modules}.")
    fan_in, fan_out = _in_out(config, name)
    want_a = (config.num_layers, fan_in, lora_config.rank)
    want_b = (config.num_layers, lora_config.rank, fan_out)
    if tuple(entry["lora_a"].shape) != want_a or tuple(entry["lora_b"].shape) != want_b:
      raise ValueError(f"adapters for {mod} have shapes {tuple(entry['lora_a'].shape)} / "
                       f"{tuple(entry['lora_b'].shape)}; the config expects {want_a} / {want_b}.")
  extra = sorted(f"{g}/{m}" for g, mods in layers.items() for m in mods
                 if TARGETS.get(m, (None,))[0] != g or m not in lora_config.target_modules)
  if extra:
    raise ValueError(f"adapters carry modules {extra} not in target_modules="
                     f"{lora_config.target_modules}.")


def freeze_base(params: Params, config: ModelConfig) -> tuple[Params, ModelConfig]:
  """The frozen base in the compute dtype: (params cast to config.dtype, config with
  param_dtype = dtype). Keep this one copy; it is both the adapted model's base and pi_ref."""
  dt = _DTYPES[config.dtype]
  base = jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(dt), params)
  return base, config.replace(param_dtype=config.dtype)


def attach(base: Params, adapters: Params, lora_config: LoraConfig) -> Params:
  """Base params + a "lora" entry that `transformer` applies: y = x W + (x A)(scale * B).

  Pure; the base goes through `stop_gradient` (frozen: gradients reach only the adapters).
  Shapes of the result depend only on the shapes of the inputs, so jitted callers (forward,
  `sampling.generate`) compile once for all adapter values.
  """
  if "lora" in base:
    raise ValueError("base params already carry attached adapters ('lora'); pass the bare base.")
  scale = lora_config.scale
  scaled = jax.tree_util.tree_map_with_path(
      lambda path, x: x * jnp.asarray(scale, x.dtype) if str(getattr(path[-1], "key", "")) == "lora_b" else x,
      adapters)
  out = dict(jax.tree_util.tree_map(jax.lax.stop_gradient, base))
  out["lora"] = scaled
  return out


def forward(base: Params, adapters: Params, config: ModelConfig, lora_config: LoraConfig,
            tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """float32 logits [B, T, V] of the adapted model: `transformer.forward(attach(base, adapters))`.

  Pure; differentiable in `adapters` only (the base is frozen).
  """
  from jaxrl_dense.models import transformer  # pylint: disable=import-outside-toplevel
  return transformer.forward(attach(base, adapters, lora_config), config, tokens, attention_mask)


def _merge_tree(base: Params, lora: Params, scale: float) -> Params:
  out = jax.tree_util.tree_map(lambda x: x, base)  # shallow-copied structure
  for group, mods in lora.get("layers", {}).items():
    for mod, ab in mods.items():
      w = base["layers"][group][mod]["kernel"]  # [L, in, out]
      delta = jnp.einsum("lir,lro->lio", ab["lora_a"].astype(jnp.float32),
                         ab["lora_b"].astype(jnp.float32))  # [L, in, out]
      merged = (w.astype(jnp.float32) + jnp.float32(scale) * delta).astype(w.dtype)
      out["layers"][group][mod] = dict(out["layers"][group][mod], kernel=merged)
  return out


def merge(base: Params, adapters: Params, lora_config: LoraConfig) -> Params:
  """Plain params with W' = W + (alpha / r) A B (float32 sum, cast back to W's dtype).

  The result has the base's structure and dtypes: every function (and compiled program) that
  takes the base takes it, and `loading.save_pretrained` writes it as an HF checkpoint.
  """
  if "lora" in base:
    raise ValueError("base params already carry attached adapters ('lora'); pass the bare base.")
  return _merge_tree(base, adapters, lora_config.scale)


def merge_attached(params: Params) -> Params:
  """`merge` for the output of `attach` (its "lora" entry is already scaled)."""
  base = {k: v for k, v in params.items() if k != "lora"}
  return _merge_tree(base, params["lora"], 1.0)


def detach(params: Params) -> Params:
  """The bare base of `attach`'s output (adapters off)."""
  return {k: v for k, v in params.items() if k != "lora"}


def save_merged(base: Params, adapters: Params, config: ModelConfig, lora_config: LoraConfig,
                tokenizer: Any, directory, *, dtype: Optional[str] = None, **kwargs):
  """Merges the adapters and writes an HF directory (`loading.save_pretrained`).

  dtype: storage dtype of the written weights (default: the base's param dtype).
  """
  from jaxrl_dense.models import loading  # pylint: disable=import-outside-toplevel
  merged = merge(base, adapters, lora_config)
  if dtype is not None:
    merged = jax.tree_util.tree_map(lambda x: x.astype(_DTYPES[dtype]), merged)
    config = config.replace(param_dtype=dtype)
  return loading.save_pretrained(merged, config, tokenizer, directory, **kwargs)


def num_params(adapters: Params) -> int:
  """Number of trainable adapter parameters."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(adapters)))
