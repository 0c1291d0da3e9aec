"""Tests for jaxrl_dense.data: arithmetic task, prompt readers, batching, iterator."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxrl_dense.data import arithmetic, batching, iterator, prompts
from jaxrl_dense.models.tokenizer import char_chat_tokenizer as tiny_chat_tokenizer


# ------------------------------------------------------------------------------ arithmetic
SMALL = arithmetic.ArithmeticTask(ops=("+", "-", "*"), max_digits=1, num_eval=20, seed=3)


def test_arithmetic_answers_are_correct():
  train, ev = arithmetic.make_problem_splits(SMALL)
  for p in train + ev:
    assert p.answer == eval(f"{p.a} {p.op} {p.b}")  # noqa: S307 - ints and one operator
  rec = arithmetic.to_record(arithmetic.ArithmeticProblem(12, "*", 7))
  assert rec.gold == "84"
  assert rec.data_source == "arithmetic"


def test_arithmetic_splits_disjoint_and_complete():
  train, ev = arithmetic.make_problem_splits(SMALL)
  assert len(ev) == 20
  eval_keys = {p.key for p in ev}
  assert len(eval_keys) == 20  # distinct problems
  assert not eval_keys & {p.key for p in train}  # disjoint by problem (commutativity included)
  shot_keys = {p.key for p in arithmetic.FEW_SHOT_EXAMPLES}
  assert not eval_keys & shot_keys
  # 1-digit: + and * have 100 ordered pairs each, nonnegative - has 55.
  assert len(train) + sum(1 + (p.op != "-" and p.a != p.b) for p in ev) == 100 + 55 + 100
  for p in train:
    if p.op == "-":
      assert p.a >= p.b


def test_arithmetic_deterministic_and_seed_dependent():
  t1, e1 = arithmetic.make_splits(SMALL)
  t2, e2 = arithmetic.make_splits(SMALL)
  assert [r.uid for r in e1] == [r.uid for r in e2]
  assert [r.uid for r in t1] == [r.uid for r in t2]
  other = arithmetic.ArithmeticTask(ops=("+", "-", "*"), max_digits=1, num_eval=20, seed=4)
  assert [r.uid for r in arithmetic.make_splits(other)[1]] != [r.uid for r in e1]
  assert len({r.uid for r in t1}) == len(t1)


def test_arithmetic_prompt_format():
  msgs = arithmetic.build_messages(arithmetic.ArithmeticProblem(31, "-", 4), num_shots=3)
  assert [m["role"] for m in msgs] == ["user", "assistant"] * 3 + ["user"]
  for m in msgs[1:-1:2]:
    assert m["content"].endswith(f"The answer is {arithmetic.extract_answer(m['content'])}.")
  assert msgs[-1]["content"] == "What is 31 - 4?"
  assert len(arithmetic.build_messages(arithmetic.ArithmeticProblem(1, "+", 2), 0)) == 1
  assert arithmetic.extract_answer("so 3 + 4 = 7. The answer is 7.") == 7
  assert arithmetic.extract_answer("The answer is -12.") == -12
  assert arithmetic.extract_answer("The answer is 1,024.") == 1024
  assert arithmetic.extract_answer("no idea") is None


@pytest.mark.parametrize("kw, match", [
    (dict(ops=("/",)), "ops"), (dict(min_digits=3, max_digits=2), "digits"),
    (dict(num_eval=0), "num_eval"), (dict(num_shots=9), "num_shots"),
])
def test_arithmetic_bad_config(kw, match):
  with pytest.raises(ValueError, match=match):
    arithmetic.ArithmeticTask(**kw)


def test_arithmetic_num_eval_too_large():
  with pytest.raises(ValueError, match="no training problems"):
    arithmetic.make_splits(arithmetic.ArithmeticTask(ops=("+",), max_digits=1, num_eval=10_000))


# ------------------------------------------------------------------------------ readers
def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_load_plain_jsonl(tmp_path):
  p = tmp_path / "mine.jsonl"
  _write_jsonl(p, [{"problem": "1+1?", "answer": "2"}, {"question": "2*3?", "answer": 6},
                   {"question": "x?", "answer": 27.0, "id": 9}])
  recs = prompts.load_prompts(p, instruction="Box it.", system_prompt="Be brief.")
  assert [r.gold for r in recs] == ["2", "6", "27.0"]
  assert recs[0].prompt_messages == ({"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "1+1?\n\nBox it."})
  assert recs[0].data_source == "mine" and recs[0].uid == "mine:0"
  assert recs[2].uid == "mine:9"
  assert recs[1].question == "2*3?\n\nBox it."


def test_load_verl_parquet(tmp_path):
  rows = [
      {"data_source": "numina_olympiads",
       "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Q1"}],
       "ability": "math", "reward_model": {"style": "rule", "ground_truth": "\\frac{1}{2}"},
       "extra_info": {"split": "train", "index": 11}},
      {"data_source": "numina_amc",
       "prompt": [{"role": "user", "content": "Q2"}],
       "ability": "math", "reward_model": {"style": "rule", "ground_truth": "7"},
       "extra_info": {"split": "train", "index": 12}},
  ]
  path = tmp_path / "train.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  recs = prompts.load_prompts(path)
  assert len(recs) == 2
  assert recs[0].prompt_messages == ({"role": "system", "content": "sys"},
                                     {"role": "user", "content": "Q1"})
  assert recs[0].gold == "\\frac{1}{2}" and recs[0].data_source == "numina_olympiads"
  assert recs[1].uid == "numina_amc:12"
  # instruction / system_prompt are not applied to already formatted chat prompts
  assert prompts.load_prompts(path, instruction="X")[1].prompt_messages[-1]["content"] == "Q2"
  assert len(prompts.load_prompts(path, limit=1)) == 1


def test_verl_jsonl_roundtrip(tmp_path):
  task = arithmetic.ArithmeticTask(ops=("+",), max_digits=1, num_eval=5)
  _, ev = arithmetic.make_splits(task)
  p = tmp_path / "arith.jsonl"
  prompts.write_jsonl(ev, p)
  back = prompts.load_prompts(p)
  assert back == ev


@pytest.mark.parametrize("bad, match", [
    ('{"problem": "1+1?"', "line 2: invalid JSON"),
    ({"problem": "1+1?"}, "line 2: missing 'answer'"),
    ({"answer": "3"}, "line 2: no prompt found"),
    ({"problem": "1+1?", "answer": None}, "line 2.*answer"),
    ({"prompt": [{"role": "user", "content": "Q"}]}, "line 2: veRL-style row"),
    ({"prompt": [{"role": "robot", "content": "Q"}], "answer": "1"}, "line 2: prompt message 0"),
    ({"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
      "answer": "1"}, "line 2: the last prompt message"),
    ([1, 2], "line 2: expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, match):
  p = tmp_path / "bad.jsonl"
  _write_jsonl(p, [{"problem": "ok", "answer": "1"}, bad])
  with pytest.raises(prompts.PromptDataError, match=match) as e:
    prompts.load_prompts(p)
  assert str(p) in str(e.value)


def test_malformed_parquet_names_row(tmp_path):
  rows = [{"prompt": [{"role": "user", "content": "Q"}], "reward_model": {"ground_truth": "1"}},
          {"prompt": [{"role": "user", "content": "Q"}], "reward_model": {"style": "rule"}}]
  # second row has no ground truth and no answer
  path = tmp_path / "bad.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  with pytest.raises(prompts.PromptDataError, match=r"bad.parquet row 1.*ground_truth"):
    prompts.load_prompts(path)


def test_unknown_source_and_missing_file(tmp_path):
  with pytest.raises(ValueError, match="expected a .jsonl"):
    prompts.load_prompts(tmp_path / "x.csv")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    prompts.load_prompts(tmp_path / "nope.jsonl")


def test_shipped_sets_load_as_records():
  from jaxrl_dense.verifiers import datasets as vdatasets
  assert set(prompts.SHIPPED_DATASETS) == set(vdatasets.DATASETS)
  recs = prompts.load_prompts("gsm8k_test", limit=3)
  assert len(recs) == 3 and recs[0].gold == "18" and recs[0].data_source == "gsm8k_test"
  assert recs[0].prompt_messages[-1]["content"].endswith(prompts.BOXED_INSTRUCTION)
  assert recs[0].prompt_messages[-1]["content"].startswith("Janet")
  m5 = prompts.load_prompts("math500_test", instruction="", limit=2)
  assert m5[0].data_source == "math500" and "\\boxed" not in m5[0].prompt_messages[-1]["content"]
  assert len({r.uid for r in prompts.load_prompts("aime24")}) == 30


# ------------------------------------------------------------------------------ batching
@pytest.fixture(scope="module")
def tok():
  return tiny_chat_tokenizer()


def test_bucket_length():
  assert batching.bucket_length(1, 32, 256) == 32
  assert batching.bucket_length(32, 32, 256) == 32
  assert batching.bucket_length(33, 32, 256) == 64
  assert batching.bucket_length(250, 32, 100) == 100
  with pytest.raises(ValueError, match="bucket_multiple"):
    batching.bucket_length(3, 0, 10)


def test_encode_uses_chat_template_and_left_pads(tok):
  recs = [prompts.PromptRecord(({"role": "user", "content": "hi"},), "1", "t", "a"),
          prompts.PromptRecord(({"role": "user", "content": "a longer question"},), "2", "t", "b")]
  enc = batching.PromptEncoder(tok, max_prompt_length=128, bucket_multiple=32)
  pb = enc.batch(recs)
  assert pb.tokens.shape == (2, 64) and pb.tokens.dtype == np.int32
  text = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                 add_generation_prompt=True, tokenize=False)
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert text.endswith("<|im_start|>assistant\n")
  np.testing.assert_array_equal(pb.tokens[0, -len(ids):], ids)
  assert pb.mask[0].sum() == len(ids) == pb.lengths[0]
  assert (pb.mask[:, -1] == 1).all()  # left padding: last column is always a real token
  assert (pb.tokens[0, :64 - len(ids)] == tok.pad_token_id).all()
  assert pb.mask[0, :64 - len(ids)].sum() == 0
  assert not pb.truncated.any() and pb.valid.all()
  assert pb.uids == ["a", "b"]
  # fixed width and row padding (copies of the last prompt, flagged invalid)
  pb2 = enc.batch(recs, pad_to=128, num_rows=4)
  assert pb2.tokens.shape == (4, 128)
  np.testing.assert_array_equal(pb2.tokens[3], pb2.tokens[1])
  assert pb2.valid.tolist() == [True, True, False, False]


def test_encode_many_matches_encode(tok):
  msgs = [({"role": "user", "content": f"q{i} " * i},) for i in range(1, 6)]
  msgs.append(msgs[0])  # duplicates are fine
  enc = batching.PromptEncoder(tok, max_prompt_length=128)
  batched = enc.encode_many(msgs)
  single = [batching.PromptEncoder(tok, max_prompt_length=128).encode(m) for m in msgs]
  assert batched == single
  assert batched[0] == tok(batching.render_chat(tok, msgs[0]), add_special_tokens=False)["input_ids"]


def test_overlong_prompts(tok):
  long = prompts.PromptRecord(({"role": "user", "content": "x" * 100},), "1", "t", "long")
  short = prompts.PromptRecord(({"role": "user", "content": "y"},), "1", "t", "short")
  enc = batching.PromptEncoder(tok, max_prompt_length=40, bucket_multiple=16)
  with pytest.raises(ValueError, match="'long' has 1.. tokens > max_prompt_length=40"):
    enc.batch([short, long])
  kept, dropped = enc.filter_overlong([short, long])
  assert kept == [short] and dropped == ["long"]
  enc_t = batching.PromptEncoder(tok, max_prompt_length=40, bucket_multiple=16,
                                 overflow="truncate")
  pb = enc_t.batch([short, long])
  assert pb.truncated.tolist() == [False, True]
  assert pb.tokens.shape == (2, 40) and pb.lengths[1] == 40
  full = enc_t.encode(long.prompt_messages)
  np.testing.assert_array_equal(pb.tokens[1], full[-40:])  # keeps the end (generation prompt)
  with pytest.raises(ValueError, match="overflow"):
    batching.PromptEncoder(tok, max_prompt_length=40, overflow="drop")
  with pytest.raises(ValueError, match="pad_to"):
    enc.batch([short], pad_to=41)


def test_tokenizer_without_template():
  class NoTemplate:
    pass

  with pytest.raises(TypeError, match="apply_chat_template"):
    batching.render_chat(NoTemplate(), [{"role": "user", "content": "q"}])


# ------------------------------------------------------------------------------ iterator
def test_iterator_epochs_are_permutations_and_reshuffled():
  it = iterator.PromptIterator(list(range(10)), seed=0)
  e0, e1 = it.next_batch(10), it.next_batch(10)
  assert sorted(e0) == sorted(e1) == list(range(10))
  assert e0 != e1 and e0 != list(range(10))
  assert it.epoch == 2 and it.position == 20


def test_iterator_resume_is_exact_and_json():
  a = iterator.PromptIterator(list("abcdefg"), seed=5)
  a.next_batch(9)
  state = json.loads(json.dumps(a.get_state()))
  b = iterator.PromptIterator(list("abcdefg"), seed=5)
  b.set_state(state)
  assert b.next_batch(12) == a.next_batch(12)
  c = iterator.PromptIterator(list("abcdefg"), seed=6)
  with pytest.raises(ValueError, match="seed"):
    c.set_state(state)
  d = iterator.PromptIterator(list("abcdef"), seed=5)
  with pytest.raises(ValueError, match="num_records"):
    d.set_state(state)


def test_iterator_seeds_differ_and_finite_epochs():
  x = iterator.PromptIterator(list(range(20)), seed=1).next_batch(20)
  y = iterator.PromptIterator(list(range(20)), seed=2).next_batch(20)
  assert x != y
  fin = iterator.PromptIterator(list(range(5)), seed=0, num_epochs=1)
  assert len(fin.next_batch(3)) == 3 and len(fin.next_batch(3)) == 2
  with pytest.raises(StopIteration):
    fin.next_batch(1)
  unshuffled = iterator.PromptIterator(list(range(4)), seed=0, shuffle=False)
  assert unshuffled.next_batch(6) == [0, 1, 2, 3, 0, 1]
  with pytest.raises(ValueError, match="empty"):
    iterator.PromptIterator([], seed=0)
