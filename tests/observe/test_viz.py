"""jaxrl_dense.observe.viz: step boundaries, token texts, group picking, the self-contained page, the PNG."""
import html as html_lib
import json
import re

import numpy as np
import pytest

from jaxrl_dense.observe import viz


def _byte_tokenizer():
  """A byte-level BPE with no merges (one token per UTF-8 byte), built in milliseconds."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from jaxrl_dense.models.tokenizer import bytes_to_unicode
  b2u = bytes_to_unicode()
  tok = Tokenizer(models.BPE({b2u[b]: b for b in range(256)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return tok


def example_groups(n=3, seed=0):
  """A tiny deterministic batch: 3 prompts x n samples with several series (also used by test_browser)."""
  rng = np.random.default_rng(seed)
  words = ["The", " sum", " is", " 3", ".5", ".", " Then", "\n", "We", " add", " 4", ".", " The",
           " answer", " is", " <b>7</b>", ".", "<|im_end|>"]
  p, t = 3, len(words)
  lengths = rng.integers(8, t + 1, p * n)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  texts = [words[:l] for l in lengths]
  series = {name: rng.normal(size=(p * n, t)) for name in ("process_reward", "advantage", "return")}
  series["entropy"] = np.abs(rng.normal(size=(p * n, t)))
  acc = np.array([1, 1, 0, 0, 0, 0, 1, 0, 1][:p * n], np.float32)
  prompts = [f"What is {i} + {i}? <script>alert(1)</script>" for i in range(p)]
  return prompts, texts, series, mask, acc


# ----------------------------------------------------------------------------- steps, tokens


@pytest.mark.parametrize("texts,ends", [
    (["The", " sum", " is", " 3", ".", "5", "."], [0, 0, 0, 0, 0, 0, 1]),         # 3.5 is no step end
    (["Done", ".", " Next", " one", "!\n", "Ok"], [0, 1, 0, 0, 1, 1]),
    (["a", "?", "b"], [0, 0, 1]),                                                 # '?b': no space
    (["a", ". ", "b", "\n\n", "c"], [0, 1, 0, 1, 1]),
    (["Why", "?", ""], [0, 1, 1]),                                                # next token empty
    (["add", ".", "\n", "Step"], [0, 0, 1, 1]),                                   # ends at the newline
    ([], []),
])
def test_step_ends(texts, ends):
  assert viz.step_ends(texts) == [bool(e) for e in ends]


def test_step_ids_from_texts():
  ids = viz.step_ids_from_texts([["a", ".", " b", "\n", "c"], ["x"]], 6)
  np.testing.assert_array_equal(ids, [[0, 0, 1, 1, 2, -1], [0, -1, -1, -1, -1, -1]])
  assert ids.dtype == np.int32
  with pytest.raises(ValueError, match="row 0"):
    viz.step_ids_from_texts([["a", "b"]], 1)


def test_step_ids_from_tokens_match_the_text_rule():
  from jaxrl_dense.models.tokenizer import char_chat_tokenizer
  for tok in (_byte_tokenizer(), char_chat_tokenizer()):
    table = viz.StepTable.from_tokenizer(tok)
    enc = (lambda s: tok.encode(s).ids) if hasattr(tok, "get_vocab_size") else (lambda s: tok(s)["input_ids"])
    rows = ["The sum is 3.5. Then\nwe add 4. Done!", "a? b", "x.\n\ny", "Why?", "1 + 1 = 2.  Next",
            "Step 1: add.\nStep 2: done! ok"]
    ids = [enc(r) for r in rows]
    t = max(map(len, ids)) + 2
    tokens = np.full((len(rows), t), 3, np.int64)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(ids):
      tokens[i, :len(r)], mask[i, :len(r)] = r, 1
    want = viz.step_ids_from_texts([viz.token_texts(tok, r) for r in ids], t)
    got = viz.step_ids_from_tokens(tokens, mask, table)
    np.testing.assert_array_equal(got, want)
    assert got[0].max() >= 3  # ". " , "\n", ". " and the end split the first row
  with pytest.raises(ValueError, match="same"):
    viz.step_ids_from_tokens(np.zeros((2, 3)), np.zeros((2, 4)), table)


def test_step_table_flags():
  table = viz.StepTable.from_texts(["a", ".", " b", "\n", "", "! "])
  np.testing.assert_array_equal(table.newline, [0, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(table.sentence_end, [0, 1, 0, 0, 0, 1])
  np.testing.assert_array_equal(table.ends_space, [0, 0, 0, 0, 0, 1])
  np.testing.assert_array_equal(table.starts_space, [0, 0, 1, 0, 0, 0])  # "\n" is not a blank
  np.testing.assert_array_equal(table.empty, [0, 0, 0, 0, 1, 0])
  # ids 0 . 2 | 0 5 | 0 (5 = "! " ends a step by its own trailing space); id 9 is outside the table.
  ids = viz.step_ids_from_tokens(np.array([[0, 1, 2, 0, 5, 0, 9]]), np.ones((1, 7)), table)
  np.testing.assert_array_equal(ids, [[0, 0, 1, 1, 1, 2, 2]])


def test_token_texts_rebuild_multibyte_characters():
  tok = _byte_tokenizer()
  s = "café 日本 🙂 3.5.\n"
  ids = tok.encode(s).ids
  texts = viz.token_texts(tok, ids)
  assert len(texts) == len(ids) == len(s.encode("utf-8"))
  assert "".join(texts) == s
  assert "\ufffd" not in "".join(texts)
  # 日 is 3 bytes: two empty pieces, then the character on the token that completes it.
  i = texts.index("日")
  assert texts[i - 2:i] == ["", ""]
  # A per-token decode would show replacement characters instead.
  assert "\ufffd" in tok.decode([ids[i]])


def test_token_texts_char_tokenizer():
  from jaxrl_dense.models.tokenizer import char_chat_tokenizer
  tok = char_chat_tokenizer()
  ids = tok("ab c.\n")["input_ids"]
  assert viz.token_texts(tok, ids) == ["a", "b", " ", "c", ".", "\n"]


# ----------------------------------------------------------------------------- groups


def test_groups_from_batch_drops_padding():
  prompts, texts, series, mask, acc = example_groups()
  groups = viz.groups_from_batch(prompts, texts, series, mask, acc, n=3, outcome_reward=acc * 2,
                                 group_indices=[2, 0], titles=["x", "y"])
  assert [g.title for g in groups] == ["x", "y"] and groups[0].prompt == prompts[2]
  r = groups[0].responses[1]  # row 7
  length = int(mask[7].sum())
  assert r.tokens == tuple(texts[7]) and len(r.values["advantage"]) == length
  np.testing.assert_allclose(r.values["advantage"], series["advantage"][7, :length])
  assert r.label == acc[7] and r.outcome_reward == 2 * acc[7]


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(n=4), "groups of n = 4"),
    (lambda a: a.update(prompts=a["prompts"][:2]), "2 prompts for 3 groups"),
    (lambda a: a.update(texts=a["texts"][:-1] + [a["texts"][-1] + ["x"]]), "row 8 has"),
    (lambda a: a.update(series={"s": np.zeros((9, 2))}), "series 's' has shape"),
    (lambda a: a.update(outcome=np.zeros(8)), "outcome"),
    (lambda a: a.update(group_indices=[3]), "out of range"),
])
def test_groups_from_batch_errors(change, match):
  prompts, texts, series, mask, acc = example_groups()
  args = dict(prompts=prompts, texts=texts, series=series, mask=mask, outcome=acc, n=3)
  change(args)
  with pytest.raises(ValueError, match=match):
    viz.groups_from_batch(args.pop("prompts"), args.pop("texts"), args.pop("series"), args.pop("mask"),
                          args.pop("outcome"), **args)


def test_response_checks_lengths():
  with pytest.raises(ValueError, match="2 values for 3 tokens"):
    viz.Response(tokens=("a", "b", "c"), values={"s": [1.0, 2.0]})


def test_pick_groups_hand_case():
  # 4 groups of n = 2: mean acc (1, .5, 0, .5), mean process return per group (0, 1, 0, 0).
  acc = np.array([1, 1, 1, 0, 0, 0, 0, 1], np.float32)
  ret = np.array([0.5, -0.5, 0.0, 2.0, 0.0, 0.0, 0.3, 0.1])
  # D_g: group 1: correct row 2 (G 0) vs wrong row 3 (G 2): 1 * max(0, 2 - 0) = 2.
  #      group 3: correct row 7 (G .1) vs wrong row 6 (G .3): 0.2.
  assert viz.pick_groups(acc, ret, n=2) == [(0, "best"), (2, "worst"), (1, "disagree")]
  assert viz.pick_groups(acc, ret, n=2, num_best=2, num_worst=0, num_disagree=2) == [
      (0, "best"), (1, "best"), (3, "disagree")]  # group 1 already taken; no third D > 0
  # Ties on mean acc are broken by the process return.
  assert viz.pick_groups(np.zeros(4), [0.0, 0.0, 1.0, 1.0], n=2, num_disagree=0) == [
      (1, "best"), (0, "worst")]
  with pytest.raises(ValueError, match="groups of n"):
    viz.pick_groups(acc, ret, n=3)


# ----------------------------------------------------------------------------- page


def _page():
  prompts, texts, series, mask, acc = example_groups()
  groups = viz.groups_from_batch(prompts, texts, series, mask, acc, n=3)
  return groups, viz.render_html(groups, title="t", meta={"step": 3})


def test_page_is_self_contained():
  _, page = _page()
  lower = page.lower()
  for needle in ("http://", "https://", " src=", " href=", "@import", "url(", "//cdn", "<link"):
    assert needle not in lower, needle
  assert lower.count("<script") == 2  # the JSON data and the inline code


def test_page_escapes_text_and_embeds_data():
  groups, page = _page()
  assert "<script>alert(1)</script>" not in page
  assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
  assert "&lt;b&gt;7&lt;/b&gt;" in page
  m = re.search(r'<script type="application/json" id="viz-data">(.*?)</script>', page, re.S)
  data = json.loads(m.group(1))
  assert data["default"] == "process_reward"
  assert [s["name"] for s in data["series"]] == ["process_reward", "advantage", "return", "entropy"]
  kinds = {s["name"]: s["kind"] for s in data["series"]}
  assert kinds["entropy"] == "sequential" and kinds["advantage"] == "diverging"
  flat = [r for g in groups for r in g.responses]
  assert len(data["responses"]) == len(flat)
  for d, r in zip(data["responses"], flat):
    assert d["tokens"] == list(r.tokens)
    np.testing.assert_allclose(d["values"]["return"], r.values["return"], rtol=1e-4)
  scale = max(abs(v) for r in flat for v in r.values["process_reward"])
  assert data["series"][0]["scale"] == pytest.approx(scale)
  # One span per token, each with its initial colour; a select option per series.
  assert page.count('class="tok"') == sum(len(r.tokens) for r in flat)
  assert page.count("<option") == 4
  # Step bars: one per step end.
  assert page.count('class="sb"') == sum(sum(r.step_ends) for r in flat)


def test_initial_colours_follow_the_scale():
  r = viz.Response(tokens=("a", "b", "c", "d"), values={"s": [-2.0, 0.0, 2.0, float("nan")]}, label=1.0)
  page = viz.render_html([viz.Group("p", [r])])
  colours = re.findall(r'class="tok"[^>]*style="background:rgb\((\d+), (\d+), (\d+)\)', page)
  assert [tuple(map(int, c)) for c in colours] == [viz._NEG, (255, 255, 255), viz._POS, viz._NAN]
  assert viz.series_scale([viz.Group("p", [r])], "s") == ("diverging", 2.0)
  zero = viz.Response(tokens=("a",), values={"s": [0.0]})
  assert viz.series_scale([viz.Group("p", [zero])], "s") == ("sequential", 1.0)


def test_render_errors():
  groups, _ = _page()
  with pytest.raises(ValueError, match="default_series"):
    viz.render_html(groups, default_series="nope")
  with pytest.raises(ValueError, match="no groups"):
    viz.render_html([])
  other = viz.Group("p", [viz.Response(tokens=("a",), values={"x": [1.0]})])
  with pytest.raises(ValueError, match="different series"):
    viz.render_html(groups + [other])


def test_iframe_escapes_the_page():
  _, page = _page()
  frame = viz.iframe(page, height=300)
  assert frame.startswith('<div><iframe srcdoc="') and "height:300px" in frame
  inner = re.match(r'<div><iframe srcdoc="(.*?)" style', frame, re.S).group(1)
  assert '"' not in inner and html_lib.unescape(inner) == page


def test_png_is_written_and_not_blank(tmp_path):
  import matplotlib.image as mpimg
  groups, _ = _page()
  path = viz.render_png(tmp_path / "a.png", groups, series="advantage", wrap=30)
  img = mpimg.imread(path)
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
  assert img[..., :3].std() > 0.05  # coloured tokens and text, not a blank canvas
  with pytest.raises(ValueError, match="series 'nope'"):
    viz.render_png(tmp_path / "b.png", groups, series="nope")


def test_write_sample_page(tmp_path):
  prompts, texts, series, mask, acc = example_groups()
  out = viz.write_sample_page(tmp_path / "samples", 12, prompts=prompts,
                              response_tokens=np.zeros_like(mask), mask=mask, outcome=acc, series=series,
                              n=3, texts=texts, png=True, meta={"run": "test"})
  assert out["html"] == tmp_path / "samples" / "step_00012.html" and out["html"].is_file()
  assert out["png"].is_file()
  page = out["html"].read_text()
  assert "run: test" in page and "Samples at step 12" in page
  assert [g for g, _ in out["groups"]] == [int(t.split("prompt ")[1].rstrip(")")) for t in
                                          (g.title for g in out["page"])]


def test_write_sample_page_decodes_only_picked_rows(tmp_path):
  tok = _byte_tokenizer()
  rows = ["1 + 1 = 2.", "It is 3.", "x", "y\nz", "é!", "ok"]
  ids = [tok.encode(r).ids for r in rows]
  t = max(map(len, ids))
  tokens = np.zeros((6, t), np.int32)
  mask = np.zeros((6, t), np.int32)
  for i, r in enumerate(ids):
    tokens[i, :len(r)], mask[i, :len(r)] = r, 1
  series = {"process_reward": np.where(mask > 0, 0.1, 0.0)}
  out = viz.write_sample_page(tmp_path, 1, prompts=["p0", "p1", "p2"], response_tokens=tokens,
                              mask=mask, outcome=np.array([1, 0, 0, 0, 1, 1]), series=series, n=2,
                              tokenizer=tok, num_disagree=0, tag="eval")
  assert out["groups"] == [(2, "best"), (1, "worst")]
  assert out["html"].name == "eval_00001.html"
  shown = ["".join(r.tokens) for g in out["page"] for r in g.responses]
  assert shown == ["é!", "ok", "x", "y\nz"]
