"""Step rewards from a process reward model: segmentation on fixed
strings, token offsets from the sampled ids, placement across two tokenizers (SmolLM2's BPE and
the character tokenizer), and credit (summed, PURE min-form) through the estimators. PURE's own
code is checked in tests/golden/pure_credit.json."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_dense import advantages, ops
from jaxrl_dense.models import prm_head
from jaxrl_dense.rewards import step_rewards as sr
from jaxrl_dense.rl import load


def _texts(text, spans):
  return [text[a:b] for a, b in spans]


# ----------------------------------------------------------------------------- segmentation


def test_segment_by_separator_trims_and_drops_empty_steps():
  text = "Step one.\n\n\n\n  Step two: é ü 中文 \n\n   \n\ntrailing"
  spans = sr.segment_by_separator(text, "\n\n")
  assert _texts(text, spans) == ["Step one.", "Step two: é ü 中文", "trailing"]
  assert sr.segment_by_separator("", "\n\n") == [] and sr.segment_by_separator("  \n\n ") == []
  assert sr.segment(text, "sep:\\n\\n") == spans == sr.segment(text, "paragraphs")
  with pytest.raises(ValueError, match="separator is empty"):
    sr.segment_by_separator(text, "")


def test_segment_by_regex_each_match_starts_a_step():
  text = "Let me think. Step 1: 2+2=4. Step 2: 4*3=12.Step 3: done Step 4:"
  spans = sr.segment_by_regex(text, r"Step \d+:")
  assert _texts(text, spans) == ["Let me think.", "Step 1: 2+2=4.", "Step 2: 4*3=12.", "Step 3: done",
                                 "Step 4:"]
  assert _texts("Step 1: a", sr.segment("Step 1: a", "regex:Step \\d+:")) == ["Step 1: a"]
  assert sr.segment_by_regex("no steps here", r"Step \d+:") == [(0, 13)]


def test_segment_sentences_is_the_chain_arith_format():
  from jaxrl_dense.data import chain_arith as ca
  task = ca.ChainArithTask(min_depth=1, max_depth=5, num_eval=50, num_train=10, num_shots=0)
  for i, p in enumerate(ca.make_problem_splits(task)[1]):
    for sol in ca.step_credit_solutions(p, [0, i]):
      assert sr.segment(sol.text, "chain_arith") == [tuple(s) for s in sol.step_spans], sol.text
  text = "3 + 4 = 7. 7.5 is not a step end. 7 - 2 = 5 and then"
  assert _texts(text, sr.segment_sentences(text)) == ["3 + 4 = 7.", "7.5 is not a step end.",
                                                      "7 - 2 = 5 and then"]
  with pytest.raises(ValueError, match="step segmentation"):
    sr.segment(text, "words")


# ----------------------------------------------------------------------- offsets and placement

# 20 fixed responses with their step segmentation: multi-byte characters, steps that end inside a
# BPE token ("=7." can be one token; "x²" splits a character's bytes), empty steps, trailing text.
STRINGS = [
    ("3 + 4 = 7. 7 + 2 = 9. The answer is 9.", "sentences"),
    ("8 - 3 = 5. 5 + 9 = 14. 14 - 7 = 7. The answer is 7.", "sentences"),
    ("First, x² = 4.\n\nSo x = ±2.\n\nThe answer is 2.", "paragraphs"),
    ("Step 1: café costs 3€. Step 2: two cafés cost 6€. Step 3: answer 6", "regex:Step \\d+:"),
    ("Let's compute 12*12=144.Therefore 144.", "sentences"),
    ("日本語の文。次の文。", "regex:(?<=。)"),
    ("a\n\n\n\nb\n\n", "paragraphs"),
    ("one. two. three", "sentences"),
    ("The result is 1,000,000. Done.", "sentences"),
    ("Σ_{i=1}^{n} i = n(n+1)/2.\n\nWith n=4: 10.", "paragraphs"),
    ("😀 emoji step.\n\nsecond 😀😀 step", "paragraphs"),
    ("x=1.y=2. z=3.", "sentences"),
    ("Step 1:compute.Step 2:check.", "regex:Step \\d+:"),
    ("   leading spaces. trailing spaces.   ", "sentences"),
    ("naïve approach fails. résumé works.", "sentences"),
    ("9 * 9 = 81. 81 - 1 = 80. The answer is 80.", "sentences"),
    ("Ω\n\nΩΩ\n\nΩΩΩ", "paragraphs"),
    ("It's 3. It's 4.", "sentences"),
    ("end without period", "sentences"),
    ("1. 2. 3. 4. 5.", "sentences"),
]


@pytest.fixture(scope="module")
def tokenizers():
  return {name: load.load_tokenizer(name) for name in ("smollm2", "chars")}


def test_offsets_from_ids_equal_the_tokenizers_offsets_on_canonical_text(tokenizers):
  tok = tokenizers["smollm2"]
  for text, _ in STRINGS:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    got_text, spans = sr.token_offsets_from_ids(tok, enc["input_ids"] + [tok.eos_token_id])
    assert got_text == text
    want = [tuple(o) for o in enc["offset_mapping"]]
    # transformers' offsets give a token ending inside a multi-byte character the character's
    # start; ours give it the whole character (it holds part of it): equal where no split.
    for (a, b), (c, d) in zip(spans, want):
      assert a <= c and b >= d and (a, b) != (0, 0), (text, spans, want)
    assert spans[-1] == (len(text), len(text))  # EOS: empty span at the end


def test_offsets_from_ids_use_the_sampled_ids_not_a_reencoding(tokenizers):
  """A non-canonical tokenisation (one character per token) maps character by character."""
  tok = tokenizers["smollm2"]
  text = "7 + 2 = 9."
  ids = [tok.convert_tokens_to_ids(c if c != " " else "Ġ") for c in text]
  got, spans = sr.token_offsets_from_ids(tok, ids)
  assert got == text and spans == [(i, i + 1) for i in range(len(text))]
  assert tok(text, add_special_tokens=False)["input_ids"] != ids  # re-encoding would differ


@pytest.mark.parametrize("mode", sr.PLACEMENT_MODES)
def test_placement_conserves_each_step_score_across_tokenizers(tokenizers, mode):
  """Each step's score sums to itself over the policy's tokens, for both tokenizers; "last" puts it
  on the token holding the step's last character."""
  rng = np.random.default_rng(0)
  for text, spec in STRINGS:
    spans = sr.segment(text, spec)
    scores = rng.normal(size=(1, len(spans))).astype(np.float32)
    per_tok = {}
    for name, tok in tokenizers.items():
      ids = tok(text, add_special_tokens=False)["input_ids"]
      got, offs = sr.token_offsets_from_ids(tok, ids)
      if got != text:  # the character tokenizer has no non-ASCII characters (<unk>)
        assert name == "chars" and any(ord(c) > 127 for c in text), (name, text)
        continue
      w = sr.placement_weights([offs], [spans], mode=mode, text_lengths=[len(text)])
      tokr = np.asarray(sr.place_step_scores(w, scores))
      np.testing.assert_allclose(w.sum(1), np.ones((1, len(spans))), rtol=1e-6, err_msg=text)
      np.testing.assert_allclose(tokr.sum(), scores.sum(), rtol=1e-5, atol=1e-6, err_msg=text)
      if mode == "last":
        for s, (a, e) in enumerate(spans):
          t = int(np.argmax(w[0, :, s]))
          assert offs[t][0] <= e - 1 < offs[t][1], (name, text, s)
      per_tok[name] = (offs, tokr[0])
    if len(per_tok) == 2 and mode == "spread":
      # per character the two placements agree once each token's reward is spread over its
      # characters: total reward of every step's character range is the step score
      for s, (a, e) in enumerate(spans):
        for offs, tokr in per_tok.values():
          inside = sum(r for (c, d), r in zip(offs, tokr) if c >= a and d <= e)
          assert inside == pytest.approx(scores[0, s], abs=1e-5) or any(
              c < a < d or c < e < d for c, d in offs), (text, s)


def test_a_step_ending_inside_a_token_goes_to_the_token_that_completes_it(tokenizers):
  tok = tokenizers["smollm2"]
  text = "x=1.y=2."
  ids = tok(text, add_special_tokens=False)["input_ids"]
  _, offs = sr.token_offsets_from_ids(tok, ids)
  spans = [(0, 3), (3, 8)]  # "x=1" then ".y=2.": the step ends inside "1." if BPE merges it
  w = sr.placement_weights([offs], [spans], mode="last")
  t0 = int(np.argmax(w[0, :, 0]))
  assert offs[t0][0] <= 2 < offs[t0][1]
  with pytest.raises(ValueError, match="outside the text"):
    sr.placement_weights([offs], [[(0, 3), (3, 9)]], text_lengths=[len(text)])
  with pytest.raises(ValueError, match="overlaps"):
    sr.placement_weights([offs], [[(0, 4), (3, 8)]])
  with pytest.raises(ValueError, match="placement mode"):
    sr.placement_weights([offs], [spans], mode="first")


# ----------------------------------------------------------------------------- credit


def test_min_form_values_and_pure_soft_minimum():
  r = jnp.asarray([[0.5, -0.2, 0.9, 0.1], [0.3, 0.8, 0.0, 0.0]], jnp.float32)
  m = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]], jnp.float32)
  np.testing.assert_allclose(sr.min_form_values(r, m), [[-0.2, -0.2, 0.1, 0.1], [0.3, 0.8, 0, 0]])
  # the summed return of the transformed rewards at step 0 tends to the row's min as T -> 0,
  # and to the mean as T -> inf
  for temp, want in ((1e-3, [-0.2, 0.3]), (math.inf, [(0.5 - 0.2 + 0.9 + 0.1) / 4, 0.55])):
    np.testing.assert_allclose(sr.pure_weighted_rewards(r, m, temperature=temp).sum(1), want, atol=1e-4)
  assert np.all(np.asarray(sr.pure_weighted_rewards(r, m))[np.asarray(m) == 0] == 0)
  empty = sr.pure_weighted_rewards(r, jnp.zeros_like(m))
  assert np.all(np.asarray(empty) == 0)
  np.testing.assert_allclose(sr.credit_step_rewards(r, m, mode="sum"), r * m)
  with pytest.raises(ValueError, match="credit mode"):
    sr.credit_step_rewards(r, m, mode="max")
  with pytest.raises(ValueError, match="temperature"):
    sr.pure_weighted_rewards(r, m, temperature=0.0)


def test_prm_logits_to_step_reward():
  logits = jnp.asarray([[[0.0, 0.0], [2.0, -1.0], [-3.0, 3.0]]])
  p1 = 1 / (1 + np.exp(-np.array([0.0, -3.0, 6.0])))
  np.testing.assert_allclose(prm_head.prm_logits_to_step_reward(logits), [2 * p1 - 1], rtol=1e-6)


def test_placed_step_rewards_drive_the_estimators(tokenizers):
  """Placed PURE rewards are ordinary [B, T] token rewards: REINFORCE++ and GAE take them, and the
  min-form credit changes the advantages against the summed form."""
  tok = tokenizers["chars"]
  texts = ["3 + 4 = 7. 7 + 2 = 9. The answer is 9.", "8 - 3 = 5. 5 + 9 = 14."]
  enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  offs = [sr.token_offsets_from_ids(tok, ids)[1] for ids in enc]
  spans = [sr.segment(t, "sentences") for t in texts]
  t_max = max(len(e) for e in enc)
  w = sr.placement_weights(offs, spans, num_cols=t_max)
  mask = jnp.asarray([[1.0] * len(e) + [0.0] * (t_max - len(e)) for e in enc])
  scores = jnp.asarray([[0.9, -0.5, 0.7], [0.2, 0.4, 0.0]], jnp.float32)
  smask = jnp.asarray([[1, 1, 1], [1, 1, 0]], jnp.float32)
  out = {}
  for mode in ("sum", "pure"):
    tok_r = sr.place_step_scores(w, sr.credit_step_rewards(scores, smask, mode=mode))
    np.testing.assert_allclose(ops.masked_sum(tok_r, mask, axis=1),
                               np.asarray(sr.credit_step_rewards(scores, smask, mode=mode)).sum(1), rtol=1e-5)
    adv, _ = advantages.reinforce_pp_advantages(tok_r, mask, gamma=1.0)
    values = jnp.zeros_like(tok_r)
    gae_adv, _ = advantages.gae_advantages(tok_r, values, mask, gamma=1.0, lam=1.0)
    assert adv.shape == gae_adv.shape == mask.shape
    assert np.all(np.isfinite(np.asarray(adv)))
    out[mode] = np.asarray(adv)
  assert not np.allclose(out["sum"], out["pure"])
