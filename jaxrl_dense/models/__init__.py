"""Language models of jaxrl_dense: Llama/Qwen2 decoders, exact token log-probs, checkpoint IO."""
from jaxrl_dense.models.config import ModelConfig
from jaxrl_dense.models.convert import hf_state_dict_from_params, params_from_hf_state_dict
from jaxrl_dense.models.logprobs import token_logprobs
from jaxrl_dense.models.transformer import (KVCache, decode_step, forward, hidden_states, init_cache,
                                            init_params, logits_from_hidden, prefill)

try:  # checkpoint IO lives in loading.py (HF safetensors + GGUF); optional at import time.
  from jaxrl_dense.models.loading import LoadedModel, load_pretrained, save_pretrained
except ModuleNotFoundError as _e:  # pragma: no cover - only while the IO modules are absent
  if not (_e.name or "").startswith("jaxrl_dense.models"):
    raise
  _LOADING_IMPORT_ERROR = _e

  def _missing(*args, **kwargs):
    raise ImportError(f"jaxrl_dense.models.loading is unavailable: {_LOADING_IMPORT_ERROR}")

  load_pretrained = save_pretrained = _missing
  LoadedModel = None

from jaxrl_dense.models.prm_head import (DiscriminativePRM, load_discriminative_prm,  # noqa: E402
                                         prm_step_logits, prm_step_rewards, prm_token_logits,
                                         step_positions_from_separator)

__all__ = [
    "ModelConfig", "forward", "hidden_states", "token_logprobs", "params_from_hf_state_dict",
    "hf_state_dict_from_params", "init_params", "init_cache", "prefill", "decode_step", "KVCache",
    "logits_from_hidden", "load_pretrained", "save_pretrained", "LoadedModel",
    "DiscriminativePRM", "load_discriminative_prm", "prm_token_logits", "prm_step_logits",
    "prm_step_rewards", "step_positions_from_separator",
]
