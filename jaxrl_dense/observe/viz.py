"""Token-level views of dense rewards: a self-contained HTML page and a static PNG.

Dense rewards live on tokens; this module shows them there. For a few prompt groups (the n samples
of a prompt, side by side) every response token is coloured by one per-token series, and a
control switches the series. Host-side (numpy + the standard library; matplotlib for the PNG).

Series
------
Any ``{name: [B, T] array}`` can be shown; the usual ones (keys of :data:`SERIES`):
``process_reward`` (β·q_t, the implicit PRM token reward), ``advantage``, ``return``,
``entropy`` (of the policy's next-token distribution), ``log_ratio_ref`` (log π_θ − log π_ref)
and ``kl`` (a per-token KL estimate, e.g. k3). A series whose values are all ≥ 0 is drawn with a
white→purple scale from 0 to its maximum; any other with a blue–white–red scale centred at 0,
from −S to +S with S the largest |value| of that series on the page. Non-finite values are grey.

Steps (boundaries drawn as a dark bar after the token; rule of :func:`step_ends`)
--------------------------------------------------------------------------------
Token t ends a step when (a) its text contains a newline, or (b) its text, trailing spaces
removed, ends with ``.``, ``!`` or ``?`` and the next token's text is empty or starts with
whitespace other than a newline, or the token itself ends with a space (so "3.5" does not split,
"Done. Next" does, and in "done.\n" the step ends at the newline), or (c) t is the last token.

The page (:func:`render_html` / :func:`write_html`)
---------------------------------------------------
One HTML file with inline CSS and JS and the data as inline JSON: no network request, no asset.
Per group: a collapsible prompt, then the n responses side by side, each headed by its verifier
label (correct/wrong), its outcome reward and the sum of the shown series. Hovering a token shows
its text and the values of every series. The series is chosen with the drop-down, or by the URL:
``page.html#series=advantage`` (or ``?series=advantage``); the drop-down keeps the hash in sync,
and ``<body data-series=...>`` names the series shown (for tests and scripts). Without JS the
page still shows the first (default) series.

Group selection (:func:`pick_groups`): the best group (highest mean outcome), the worst (lowest),
and the one where the PRM and the outcome disagree most (definition in its docstring).

Trainer entry point (:func:`write_sample_page`): decode, pick groups, write
``<dir>/step_NNNNN.html`` (and optionally ``.png``) in one call.
"""
from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import pathlib
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from jaxrl_dense._deprecation import renamed_kwargs

__all__ = ["SERIES", "Response", "Group", "step_ends", "step_ids_from_texts", "StepTable",
           "step_ids_from_tokens", "token_texts",
           "groups_from_batch", "pick_groups", "render_html", "write_html", "iframe", "render_png",
           "write_sample_page", "series_scale", "screenshot", "find_chromium", "CHROMIUM_FLAGS"]

# name -> human label. Other names are allowed; they are shown with their name as label.
SERIES = {
    "process_reward": "process reward β·q_t",
    "advantage": "advantage",
    "return": "return",
    "entropy": "entropy (nats)",
    "log_ratio_ref": "log π_θ − log π_ref",
    "kl": "KL to reference (per token)",
}

# Colour stops (RGB), shared by the Python (initial colours, PNG) and the JS (switching) code.
_NEG = (59, 76, 192)      # blue, at −S
_POS = (180, 4, 38)       # red, at +S
_SEQ = (118, 42, 131)     # purple, at the maximum of a non-negative series
_NAN = (200, 200, 200)    # grey, non-finite values
_SENTENCE_END = (".", "!", "?")


# ----------------------------------------------------------------------------- data model


@dataclasses.dataclass(frozen=True)
class Response:
  """One sampled response: its token texts and per-token series (all of length ``len(tokens)``).

  label: verifier label (1 correct, 0 wrong; fractional allowed) or None if unknown.
  observation: per-token flags of a multi-turn response: True on the environment's observation
    tokens (shown grey and italic, their series NaN: they are context, never trained).
  outcome_reward: the outcome reward used in training (defaults to the label when built by
    :func:`groups_from_batch`); None if unknown.
  """
  tokens: tuple
  values: Mapping[str, tuple]
  label: Optional[float] = None
  outcome_reward: Optional[float] = None
  observation: tuple = ()  # per token: True on an environment's observation (multi-turn), or ()

  def __post_init__(self):
    object.__setattr__(self, "tokens", tuple(str(t) for t in self.tokens))
    obs = tuple(bool(x) for x in self.observation)
    if obs and len(obs) != len(self.tokens):
      raise ValueError(f"Response: {len(obs)} observation flags for {len(self.tokens)} tokens")
    object.__setattr__(self, "observation", obs)
    vals = {}
    for name, v in self.values.items():
      if not isinstance(name, str) or not name:
        raise ValueError(f"Response: series names must be non-empty strings, got {name!r}")
      v = tuple(float(x) for x in np.asarray(v, np.float64).reshape(-1))
      if len(v) != len(self.tokens):
        raise ValueError(f"Response: series {name!r} has {len(v)} values for "
                         f"{len(self.tokens)} tokens")
      vals[name] = v
    object.__setattr__(self, "values", vals)

  @property
  def step_ends(self) -> tuple:
    return tuple(step_ends(self.tokens))


@dataclasses.dataclass(frozen=True)
class Group:
  """The n responses of one prompt (shown side by side) and why the group was picked."""
  prompt: str
  responses: tuple
  title: str = ""

  def __post_init__(self):
    object.__setattr__(self, "responses", tuple(self.responses))
    if not self.responses:
      raise ValueError("Group: needs at least one response")
    names = [tuple(sorted(r.values)) for r in self.responses]
    if len(set(names)) != 1:
      raise ValueError(f"Group: responses carry different series {sorted(set(names))}")


# ----------------------------------------------------------------------------- steps and tokens


def _starts_blank(text: str) -> bool:
  # Whitespace other than a newline (a newline ends the step on its own token instead).
  return text[:1].isspace() and text[:1] != "\n"


def step_ends(texts: Sequence[str]) -> list:
  """``ends[t]`` is True when token t closes a step (rule in the module docstring)."""
  texts = [str(t) for t in texts]
  out = []
  for t, s in enumerate(texts):
    last = t == len(texts) - 1
    nxt = "" if last else texts[t + 1]
    sentence = s.rstrip(" ").endswith(_SENTENCE_END) and (s.endswith(" ") or nxt == ""
                                                           or _starts_blank(nxt))
    out.append("\n" in s or sentence or last)
  return out


def step_ids_from_texts(rows: Sequence[Sequence[str]], num_cols: Optional[int] = None) -> np.ndarray:
  """Step index of every token (:func:`step_ends` rule), int32 ``[B, T]`` with −1 on padding.

  ``rows[i]`` are the token texts of response i's valid tokens (right-padded layout); ``num_cols``
  is T (default: the longest row). Feeds ``prm_health.last_step_share``.
  """
  t = max((len(r) for r in rows), default=0) if num_cols is None else int(num_cols)
  out = np.full((len(rows), t), -1, np.int32)
  for i, r in enumerate(rows):
    if len(r) > t:
      raise ValueError(f"step_ids_from_texts: row {i} has {len(r)} tokens > num_cols={t}")
    ends = np.asarray(step_ends(r), bool)
    out[i, :len(r)] = np.cumsum(ends) - ends
  return out


@dataclasses.dataclass(frozen=True)
class StepTable:
  """Per-vocabulary flags that apply the :func:`step_ends` rule to token ids without decoding rows.

  Built once per tokenizer (:meth:`from_tokenizer`, one ``decode([id])`` per vocabulary entry);
  :func:`step_ids_from_tokens` then segments a whole ``[B, T]`` batch with numpy indexing. All
  arrays are bool ``[V]``: ``newline`` (text contains "\n"), ``sentence_end`` (text without
  trailing spaces ends with . ! ?), ``ends_space`` (text ends with " "), ``starts_space`` (first
  character is whitespace other than a newline), ``empty`` (decodes to "").
  """
  newline: np.ndarray
  sentence_end: np.ndarray
  ends_space: np.ndarray
  starts_space: np.ndarray
  empty: np.ndarray

  @classmethod
  def from_texts(cls, texts: Sequence[str]) -> "StepTable":
    """The table of a vocabulary given as the text of each id."""
    texts = [str(t) for t in texts]
    flag = lambda f: np.asarray([bool(f(t)) for t in texts], bool)
    return cls(newline=flag(lambda t: "\n" in t),
               sentence_end=flag(lambda t: t.rstrip(" ").endswith(_SENTENCE_END)),
               ends_space=flag(lambda t: t.endswith(" ")),
               starts_space=flag(_starts_blank),
               empty=flag(lambda t: t == ""))

  @classmethod
  def from_tokenizer(cls, tokenizer: Any, vocab_size: Optional[int] = None) -> "StepTable":
    """Decodes every id in ``[0, vocab_size)`` (default ``len(tokenizer)`` or
    ``tokenizer.get_vocab_size()``); ids the model may emit beyond it count as plain text."""
    if vocab_size is None:
      vocab_size = (tokenizer.get_vocab_size() if hasattr(tokenizer, "get_vocab_size")
                    else len(tokenizer))
    return cls.from_texts([tokenizer.decode([i]) for i in range(int(vocab_size))])


def step_ids_from_tokens(tokens: Any, mask: Any, table: StepTable) -> np.ndarray:
  """:func:`step_ids_from_texts` from token ids: int32 ``[B, T]``, −1 on padding (host-side numpy).

  Token t ends a step when ``newline[x_t]``, or ``sentence_end[x_t]`` and (``ends_space[x_t]`` or
  ``starts_space[x_{t+1}]`` or ``empty[x_{t+1}]``), or t is the row's last valid token: the
  :func:`step_ends` rule applied to per-token decodes (identical for tokens that decode to whole
  characters, which includes every token holding "\n", ".", "!", "?" or a leading space). Ids
  outside the table are treated as plain text.
  """
  tok = np.asarray(tokens)
  m = np.asarray(mask) != 0
  if tok.ndim != 2 or tok.shape != m.shape:
    raise ValueError(f"step_ids_from_tokens: `tokens` {tok.shape} and `mask` {m.shape} must be "
                     "the same [B, T] shape")
  v = table.newline.shape[0]
  inside = (tok >= 0) & (tok < v)
  safe = np.where(inside, tok, 0)
  look = lambda arr: arr[safe] & inside                               # [B, T]
  nxt_ws = np.zeros_like(m)
  nxt_ws[:, :-1] = (look(table.starts_space) | look(table.empty))[:, 1:]
  last = np.zeros_like(m)
  lengths = m.sum(1)
  rows = np.flatnonzero(lengths > 0)
  last[rows, lengths[rows] - 1] = True
  ends = m & (look(table.newline) | (look(table.sentence_end) & (look(table.ends_space) | nxt_ws))
              | last)
  return np.where(m, np.cumsum(ends, axis=1) - ends, -1).astype(np.int32)


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list:
  """Text of each token of ``ids`` such that ``"".join(result) == tokenizer.decode(ids)``.

  Token t gets the new text of ``decode(ids[:t+1])`` over the text already given out, where a
  prefix that ends inside a multi-byte character (decoded as trailing U+FFFD replacement
  characters) gives out only the text before them: the byte-level BPE pieces of one character show
  as "" and the character appears on the token that completes it (a per-token ``decode([id])``
  would show replacement characters). If a prefix decode does not extend the text given out
  (tokenizers that clean up spaces), the token falls back to ``decode([id])``. O(T²) decoding;
  ``tokenizer`` is anything with ``decode(list_of_ids) -> str``.
  """
  ids = [int(i) for i in ids]
  out, done = [], ""
  for t in range(len(ids)):
    cur = tokenizer.decode(ids[:t + 1])
    if t < len(ids) - 1:
      cur = cur.rstrip("\ufffd")
    if cur.startswith(done):
      out.append(cur[len(done):])
      done = cur
    else:
      out.append(tokenizer.decode([ids[t]]))
      done = cur
  return out


@renamed_kwargs(acc="outcome")
def groups_from_batch(prompts: Sequence[str], texts: Sequence[Sequence[str]],
                      series: Mapping[str, Any], mask: Any, outcome: Any, *, n: int,
                      outcome_reward: Any = None, group_indices: Optional[Sequence[int]] = None,
                      titles: Optional[Sequence[str]] = None, observation_mask: Any = None) -> list:
  """Builds :class:`Group` s from a ``[B, T]`` batch (B = P·n rows, groups contiguous).

  Args:
    prompts: P prompt texts (one per group).
    texts: B lists of token texts, each of the row's valid-token count (``mask[i].sum()``; e.g.
      from :func:`token_texts`).
    series: ``{name: [B, T]}`` per-token values (masked positions are dropped).
    mask: ``[B, T]`` response mask (right-padded). outcome: ``[B]`` verifier labels.
    n: samples per prompt. outcome_reward: ``[B]`` (default: ``outcome``).
    group_indices: which groups to build, in order (default: all). titles: one per built group.
    observation_mask: ``[B, T]`` 1 on a multi-turn row's observation tokens (shown between the
      model's turns; ``texts`` then cover ``mask | observation_mask``), or None.
  """
  m = np.asarray(mask) != 0
  obs = np.zeros_like(m) if observation_mask is None else np.asarray(observation_mask) != 0
  if m.ndim != 2:
    raise ValueError(f"groups_from_batch: `mask` must be [B, T], got shape {m.shape}")
  b, t = m.shape
  if n < 1 or b % n:
    raise ValueError(f"groups_from_batch: B = {b} rows must split into groups of n = {n}")
  if len(prompts) != b // n:
    raise ValueError(f"groups_from_batch: {len(prompts)} prompts for {b // n} groups")
  if len(texts) != b:
    raise ValueError(f"groups_from_batch: {len(texts)} token-text rows for B = {b}")
  vals = {}
  for name, v in series.items():
    v = np.asarray(v, np.float64)
    if v.shape != (b, t):
      raise ValueError(f"groups_from_batch: series {name!r} has shape {v.shape}, mask {(b, t)}")
    vals[name] = v
  outcome = np.asarray(outcome, np.float64).reshape(-1)
  rew = outcome if outcome_reward is None else np.asarray(outcome_reward, np.float64).reshape(-1)
  if outcome.shape != (b,) or rew.shape != (b,):
    raise ValueError(f"groups_from_batch: `outcome` {outcome.shape} and `outcome_reward` {rew.shape} "
                     f"must be [B={b}]")
  idx = list(range(b // n)) if group_indices is None else [int(g) for g in group_indices]
  if titles is not None and len(titles) != len(idx):
    raise ValueError(f"groups_from_batch: {len(titles)} titles for {len(idx)} groups")
  groups = []
  for k, g in enumerate(idx):
    if not 0 <= g < b // n:
      raise ValueError(f"groups_from_batch: group index {g} out of range [0, {b // n})")
    responses = []
    for i in range(g * n, (g + 1) * n):
      keep = m[i] | obs[i]
      if len(texts[i]) != int(keep.sum()):
        raise ValueError(f"groups_from_batch: row {i} has {len(texts[i])} token texts but "
                         f"{int(keep.sum())} valid tokens")
      o = obs[i][keep]
      responses.append(Response(tokens=tuple(texts[i]),
                                values={name: np.where(o, np.nan, v[i][keep]) for name, v in vals.items()},
                                label=float(outcome[i]), outcome_reward=float(rew[i]),
                                observation=tuple(o) if o.any() else ()))
    groups.append(Group(prompt=str(prompts[g]), responses=tuple(responses),
                        title="" if titles is None else str(titles[k])))
  return groups


# ----------------------------------------------------------------------------- group selection


@renamed_kwargs(acc="outcome")
def pick_groups(outcome: Any, process_return: Any, *, n: int, num_best: int = 1, num_worst: int = 1,
                num_disagree: int = 1) -> list:
  """Chooses which prompt groups to show: ``[(group_index, reason), ...]``, no group twice.

  With ``ā_g`` the group's mean outcome and ``Ḡ_g`` its mean process return (B = P·n rows):

  * ``"best"``: largest ``ā_g`` (ties: larger ``Ḡ_g``, then lower index);
  * ``"worst"``: smallest ``ā_g`` (ties: smaller ``Ḡ_g``, then lower index);
  * ``"disagree"``: largest ``D_g = Σ_{i,j∈g: a_i > a_j} (a_i − a_j)·max(0, G_j − G_i)``, the
    outcome-weighted margin by which the PRM ranks a worse response above a better one
    (``D_g = 0``: the PRM agrees with every outcome ordering, and no such group is picked).

  Picks are made in the order best, worst, disagree; a group already picked is skipped and the
  next candidate taken. Args: ``outcome [B]``, ``process_return [B]`` (e.g. Σ_t of the process
  reward), ``n`` samples per prompt.
  """
  a = np.asarray(outcome, np.float64).reshape(-1)
  g = np.asarray(process_return, np.float64).reshape(-1)
  if a.shape != g.shape:
    raise ValueError(f"pick_groups: `outcome` {a.shape} and `process_return` {g.shape} differ")
  if n < 1 or a.size % n:
    raise ValueError(f"pick_groups: B = {a.size} rows must split into groups of n = {n}")
  for name, k in (("num_best", num_best), ("num_worst", num_worst), ("num_disagree", num_disagree)):
    if k < 0:
      raise ValueError(f"pick_groups: {name} must be >= 0, got {k}")
  ag, gg = a.reshape(-1, n), np.nan_to_num(g.reshape(-1, n), nan=0.0)
  p = ag.shape[0]
  am, gm = ag.mean(1), gg.mean(1)
  da = ag[:, :, None] - ag[:, None, :]                              # [P, n, n] a_i − a_j
  dg = gg[:, None, :] - gg[:, :, None]                              # [P, n, n] G_j − G_i
  dis = np.sum(np.where(da > 0, da * np.maximum(dg, 0.0), 0.0), axis=(1, 2))  # [P]
  idx = np.arange(p)
  orders = [
      ("best", np.lexsort((idx, -gm, -am)), None),
      ("worst", np.lexsort((idx, gm, am)), None),
      ("disagree", np.lexsort((idx, -dis)), dis > 0),
  ]
  picked, out = set(), []
  for (reason, order, ok), k in zip(orders, (num_best, num_worst, num_disagree)):
    taken = 0
    for gi in order:
      if taken >= k:
        break
      if gi in picked or (ok is not None and not ok[gi]):
        continue
      picked.add(int(gi))
      out.append((int(gi), reason))
      taken += 1
  return out


# ----------------------------------------------------------------------------- colours


def series_scale(groups: Sequence[Group], name: str) -> tuple:
  """``(kind, S)``: kind "sequential" if every finite value ≥ 0 else "diverging"; S = max |value|.

  S is 1.0 when the series is all zero / non-finite (so zeros render white).
  """
  vals = np.concatenate([np.asarray(r.values[name], np.float64) for g in groups for r in g.responses]
                        or [np.zeros(0)])
  fin = vals[np.isfinite(vals)]
  kind = "sequential" if fin.size == 0 or fin.min() >= 0 else "diverging"
  s = float(np.max(np.abs(fin))) if fin.size else 0.0
  return kind, (s if s > 0 else 1.0)


def _mix(c, t):
  return tuple(int(round(255 + (ci - 255) * t)) for ci in c)


def _colour(v: float, kind: str, scale: float) -> tuple:
  """RGB of value v (same formula as the page's JS ``colour``)."""
  if not math.isfinite(v):
    return _NAN
  t = max(-1.0, min(1.0, v / scale))
  if kind == "sequential":
    return _mix(_SEQ, max(t, 0.0))
  return _mix(_POS, t) if t >= 0 else _mix(_NEG, -t)


def _ink(rgb) -> str:
  # Dark text on light backgrounds, white on dark (relative luminance).
  lum = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
  return "#000" if lum > 140 else "#fff"


# ----------------------------------------------------------------------------- HTML


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 8px}
.bar{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #ddd;z-index:2;
 display:flex;gap:16px;align-items:center;flex-wrap:wrap}
.legend{display:flex;align-items:center;gap:6px;font-size:12px}
.ramp{width:180px;height:12px;border:1px solid #999}
.meta{font-size:12px;color:#555;margin:6px 0}
.group{margin:18px 0;border-top:2px solid #444;padding-top:8px}
.group h2{font-size:16px;margin:4px 0}
details{margin:4px 0 8px}
summary{cursor:pointer;color:#333;font-size:13px}
pre.prompt{white-space:pre-wrap;background:#f6f6f6;border:1px solid #ddd;padding:8px;font-size:12px;
 max-height:300px;overflow:auto}
.samples{display:grid;gap:10px;overflow-x:auto}
.card{border:1px solid #ccc;border-radius:4px;min-width:260px}
.head{font-size:12px;padding:4px 6px;border-bottom:1px solid #ccc;background:#fafafa;display:flex;
 gap:10px;flex-wrap:wrap}
.ok{color:#18794e;font-weight:bold}.bad{color:#c0392b;font-weight:bold}.unk{color:#777}
.text{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px;
 line-height:1.7;white-space:pre-wrap;word-break:break-word;padding:6px}
.tok{border-radius:2px}
.obs{background:#ececec;color:#555;font-style:italic;border-bottom:1px dashed #999}
.sb{display:inline-block;width:2px;height:1.1em;background:#111;margin:0 1px;vertical-align:middle}
#tip{position:fixed;display:none;background:#222;color:#fff;font-size:12px;padding:6px 8px;
 border-radius:4px;pointer-events:none;z-index:5;max-width:360px;white-space:pre}
"""

_JS = r"""
(function(){
var D=JSON.parse(document.getElementById('viz-data').textContent);
var NEG=D.colours.neg,POS=D.colours.pos,SEQ=D.colours.seq,NAN=D.colours.nan;
function mix(c,t){return [0,1,2].map(function(i){return Math.round(255+(c[i]-255)*t);});}
function colour(v,kind,s){
 if(v===null||!isFinite(v))return NAN;
 var t=Math.max(-1,Math.min(1,v/s));
 if(kind==='sequential')return mix(SEQ,Math.max(t,0));
 return t>=0?mix(POS,t):mix(NEG,-t);}
function rgb(c){return 'rgb('+c[0]+','+c[1]+','+c[2]+')';}
function ink(c){return (0.2126*c[0]+0.7152*c[1]+0.0722*c[2])>140?'#000':'#fff';}
function fmt(v){return (v===null||!isFinite(v))?'n/a':(Math.abs(v)>=1e4||(Math.abs(v)<1e-3&&v!==0)?v.toExponential(3):v.toFixed(4));}
var byName={};D.series.forEach(function(s){byName[s.name]=s;});
function wanted(){
 var m=/[#&?]series=([^&]+)/.exec(location.hash)||/[?&]series=([^&]+)/.exec(location.search);
 var n=m?decodeURIComponent(m[1]):D.default;return byName[n]?n:D.default;}
function show(name){
 var s=byName[name];
 document.querySelectorAll('span.tok').forEach(function(el){
  var r=D.responses[+el.dataset.r],v=r.values[name][+el.dataset.t],c=colour(v,s.kind,s.scale);
  el.style.background=rgb(c);el.style.color=ink(c);});
 document.querySelectorAll('.sum').forEach(function(el){
  var vs=D.responses[+el.dataset.r].values[name],tot=0;
  vs.forEach(function(v){if(v!==null&&isFinite(v))tot+=v;});el.textContent='Σ '+fmt(tot);});
 document.getElementById('series').value=name;
 document.getElementById('series-label').textContent=s.label;
 var lo=s.kind==='sequential'?0:-s.scale;
 document.getElementById('lo').textContent=fmt(lo);document.getElementById('hi').textContent=fmt(s.scale);
 document.getElementById('ramp').style.background=s.kind==='sequential'?
  'linear-gradient(to right,#fff,'+rgb(SEQ)+')':'linear-gradient(to right,'+rgb(NEG)+',#fff,'+rgb(POS)+')';
 document.body.dataset.series=name;}
document.getElementById('series').addEventListener('change',function(e){
 history.replaceState(null,'','#series='+encodeURIComponent(e.target.value));show(e.target.value);});
window.addEventListener('hashchange',function(){show(wanted());});
var tip=document.getElementById('tip');
document.addEventListener('mouseover',function(e){
 var el=e.target.closest?e.target.closest('span.tok'):null;if(!el){tip.style.display='none';return;}
 var r=D.responses[+el.dataset.r],t=+el.dataset.t,lines=['token '+t+' (step '+r.steps[t]+'): '+JSON.stringify(r.tokens[t])];
 D.series.forEach(function(s){lines.push(s.label+': '+fmt(r.values[s.name][t]));});
 tip.textContent=lines.join('\n');tip.style.display='block';});
document.addEventListener('mousemove',function(e){tip.style.left=(e.clientX+12)+'px';tip.style.top=(e.clientY+12)+'px';});
show(wanted());
})();
"""


def _json_number(v: float):
  if not math.isfinite(v):
    return None
  return float(f"{v:.5g}")


def _label_html(label: Optional[float]) -> str:
  if label is None or not math.isfinite(label):
    return '<span class="unk">label ?</span>'
  if label > 0.5:
    return f'<span class="ok">&#10003; correct ({label:g})</span>'
  return f'<span class="bad">&#10007; wrong ({label:g})</span>'


def render_html(groups: Sequence[Group], *, title: str = "Dense rewards per token",
                default_series: Optional[str] = None, meta: Optional[Mapping[str, Any]] = None) -> str:
  """The self-contained HTML page (a string) for ``groups``; see the module docstring.

  Args:
    groups: the groups to show (all responses must carry the same series).
    title: page heading. meta: small key/value table under the heading (e.g. run name, step).
    default_series: series shown first (default: ``process_reward`` if present, else the first).
  """
  groups = list(groups)
  if not groups:
    raise ValueError("render_html: no groups to show")
  names = sorted(groups[0].responses[0].values,
                 key=lambda s: (list(SERIES).index(s) if s in SERIES else len(SERIES), s))
  for g in groups:
    if sorted(g.responses[0].values) != sorted(names):
      raise ValueError(f"render_html: groups carry different series ({sorted(names)} vs "
                       f"{sorted(g.responses[0].values)})")
  if not names:
    raise ValueError("render_html: responses carry no series")
  if default_series is None:
    default_series = "process_reward" if "process_reward" in names else names[0]
  if default_series not in names:
    raise ValueError(f"render_html: default_series {default_series!r} is not one of {names}")
  scales = {name: series_scale(groups, name) for name in names}
  data = {
      "default": default_series,
      "colours": {"neg": _NEG, "pos": _POS, "seq": _SEQ, "nan": _NAN},
      "series": [{"name": s, "label": SERIES.get(s, s), "kind": scales[s][0],
                  "scale": scales[s][1]} for s in names],
      "responses": [],
  }
  kind0, scale0 = scales[default_series]
  parts = []
  ridx = 0
  for gi, g in enumerate(groups):
    head = f"Group {gi + 1}" + (f" — {html.escape(g.title)}" if g.title else "")
    parts.append(f'<section class="group"><h2>{head}</h2>')
    parts.append(f'<details><summary>Prompt ({len(g.prompt)} characters)</summary>'
                 f'<pre class="prompt">{html.escape(g.prompt)}</pre></details>')
    parts.append(f'<div class="samples" style="grid-template-columns:repeat({len(g.responses)},'
                 f'minmax(260px,1fr))">')
    for si, r in enumerate(g.responses):
      ends = r.step_ends
      steps = (np.cumsum(ends) - np.asarray(ends, int)).tolist() if r.tokens else []
      data["responses"].append({
          "tokens": list(r.tokens), "steps": steps,
          "values": {s: [_json_number(v) for v in r.values[s]] for s in names}})
      tot = sum(v for v in r.values[default_series] if math.isfinite(v))
      reward = ("" if r.outcome_reward is None else f"<span>R = {r.outcome_reward:.4g}</span>")
      parts.append(f'<div class="card"><div class="head"><span>sample {si + 1}</span>'
                   f'{_label_html(r.label)}{reward}<span>{len(r.tokens)} tokens</span>'
                   f'<span class="sum" data-r="{ridx}">Σ {tot:.4f}</span></div><div class="text">')
      for ti, (tok, end) in enumerate(zip(r.tokens, ends)):
        c = _colour(r.values[default_series][ti], kind0, scale0)
        body, nl = tok.rstrip("\n"), tok[len(tok.rstrip("\n")):]
        sb = '<span class="sb"></span>' if end else ""
        if r.observation and r.observation[ti]:  # context from the environment, not trained
          parts.append(f'<span class="obs" title="observation (not trained)">{html.escape(body)}'
                       f'{html.escape(nl)}</span>')
          continue
        parts.append(f'<span class="tok" data-r="{ridx}" data-t="{ti}" style="background:'
                     f'rgb{c};color:{_ink(c)}">{html.escape(body)}{sb}{html.escape(nl)}</span>')
      parts.append("</div></div>")
      ridx += 1
    parts.append("</div></section>")
  options = "".join(f'<option value="{html.escape(s)}"{" selected" if s == default_series else ""}>'
                    f'{html.escape(SERIES.get(s, s))}</option>' for s in names)
  meta_html = ""
  if meta:
    meta_html = '<div class="meta">' + " · ".join(
        f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in meta.items()) + "</div>"
  payload = json.dumps(data, ensure_ascii=True, allow_nan=False).replace("</", "<\\/")
  return (
      "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
      f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
      f'<body data-series="{html.escape(default_series)}"><h1>{html.escape(title)}</h1>{meta_html}'
      '<div class="bar"><label>Colour tokens by <select id="series">'
      f'{options}</select></label><span class="legend"><span id="lo">{-scale0 if kind0 == "diverging" else 0:.4g}</span>'
      '<span class="ramp" id="ramp"></span>'
      f'<span id="hi">{scale0:.4g}</span> <b id="series-label">{html.escape(SERIES.get(default_series, default_series))}</b>'
      '</span><span class="meta">dark bar = step boundary · hover a token for its values</span></div>'
      + "".join(parts) +
      f'<div id="tip"></div><script type="application/json" id="viz-data">{payload}</script>'
      f"<script>{_JS}</script></body></html>\n")


def iframe(page: str, *, height: int = 640) -> str:
  """The page as an ``<iframe srcdoc=...>`` string, for notebooks (``IPython.display.HTML``).

  The iframe keeps the page's CSS and JS away from the notebook's own page.
  """
  return (f'<div><iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;'
          f'height:{int(height)}px;border:1px solid #ccc"></iframe></div>')


def write_html(path: str | os.PathLike, groups: Sequence[Group], **kwargs) -> pathlib.Path:
  """Writes :func:`render_html` to ``path`` (parents created, atomic replace); returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(render_html(groups, **kwargs), encoding="utf-8")
  os.replace(tmp, path)
  return path


# ----------------------------------------------------------------------------- PNG


def _layout(tokens: Sequence[str], wrap: int) -> list:
  """Monospace layout: [(token index, line, column, text)] chunks, wrapping at ``wrap`` columns."""
  out, line, col = [], 0, 0
  for ti, tok in enumerate(tokens):
    tok = tok.replace("\t", "    ")
    pieces = tok.split("\n")
    for pi, piece in enumerate(pieces):
      while piece:
        room = wrap - col
        if room <= 0:
          line, col = line + 1, 0
          continue
        chunk, piece = piece[:room], piece[room:]
        out.append((ti, line, col, chunk))
        col += len(chunk)
      if pi < len(pieces) - 1:
        out.append((ti, line, col, ""))  # the newline itself: an empty chunk keeps the step bar
        line, col = line + 1, 0
  return out


def render_png(path: str | os.PathLike, groups: Sequence[Group], *, series: Optional[str] = None,
               wrap: int = 48, max_tokens: int = 160, font_size: float = 7.0,
               dpi: int = 150) -> pathlib.Path:
  """The same view as a static PNG (matplotlib, Agg): one panel per response, groups as rows.

  Tokens are laid out on a monospace grid of ``wrap`` columns with their background coloured by
  ``series`` (default as in :func:`render_html`; same colour scale), step boundaries as dark bars,
  and each panel titled with the verifier label, outcome reward and the series sum. Responses
  longer than ``max_tokens`` tokens are cut (marked "…").
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import Rectangle  # pylint: disable=import-outside-toplevel
  groups = list(groups)
  if not groups:
    raise ValueError("render_png: no groups to show")
  names = list(groups[0].responses[0].values)
  if series is None:
    series = "process_reward" if "process_reward" in names else names[0]
  if series not in names:
    raise ValueError(f"render_png: series {series!r} is not one of {names}")
  kind, scale = series_scale(groups, series)
  layouts = [[_layout(r.tokens[:max_tokens], wrap) for r in g.responses] for g in groups]
  lines = [max([max((c[1] for c in lay), default=0) + 1 for lay in row] + [1]) for row in layouts]
  cols = max(len(g.responses) for g in groups)
  cw = font_size * 0.6021 / 72.0             # DejaVu Sans Mono advance, inches per column
  lh = font_size * 1.55 / 72.0               # inches per line
  panel_w, gap, title_h, margin = wrap * cw, 0.25, 0.5, 0.3
  fig_w = 2 * margin + cols * panel_w + (cols - 1) * gap
  row_h = [n_lines * lh + title_h for n_lines in lines]
  bar_h = 0.55
  fig_h = 2 * margin + sum(row_h) + 0.15 * (len(groups) - 1) + bar_h
  fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
  y_top = fig_h - margin
  for gi, (g, row) in enumerate(zip(groups, layouts)):
    for si, (r, lay) in enumerate(zip(g.responses, row)):
      x0 = margin + si * (panel_w + gap)
      h = lines[gi] * lh
      ax = fig.add_axes([x0 / fig_w, (y_top - title_h - h) / fig_h, panel_w / fig_w, h / fig_h])
      ax.set_xlim(0, wrap)
      ax.set_ylim(lines[gi], 0)
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_color("#999")
      ends = r.step_ends
      vals = r.values[series]
      for ti, line, col, text in lay:
        c = _colour(vals[ti], kind, scale)
        if text:
          ax.add_patch(Rectangle((col, line + 0.08), len(text), 0.84, color=np.asarray(c) / 255.0,
                                 linewidth=0))
          ax.text(col, line + 0.5, text, family="DejaVu Sans Mono", fontsize=font_size,
                  va="center", ha="left", color=_ink(c))
      last_chunk = {}
      for ti, line, col, text in lay:
        last_chunk[ti] = (line, col + len(text))
      for ti, (line, end_col) in last_chunk.items():
        if ends[ti] and ti < len(r.tokens[:max_tokens]):
          ax.plot([end_col, end_col], [line + 0.05, line + 0.95], color="#111", linewidth=1.2)
      lab = ("label ?" if r.label is None else ("correct" if r.label > 0.5 else "wrong"))
      rew = "" if r.outcome_reward is None else f"  R={r.outcome_reward:.3g}"
      tot = sum(v for v in vals if math.isfinite(v))
      cut = " …" if len(r.tokens) > max_tokens else ""
      head = f"sample {si + 1}: {lab}{rew}  Σ={tot:.3g}{cut}"
      ax.set_title(head, fontsize=font_size + 1, loc="left", pad=3,
                   color={"correct": "#18794e", "wrong": "#c0392b"}.get(lab, "#555"))
    fig.text(margin / fig_w, (y_top - 0.02) / fig_h, f"Group {gi + 1}" + (f": {g.title}" if g.title else ""),
             fontsize=font_size + 2, fontweight="bold", va="top", ha="left")
    y_top -= row_h[gi] + 0.15
  cax = fig.add_axes([margin / fig_w, (margin + 0.1) / fig_h, min(3.0, fig_w - 2 * margin) / fig_w,
                      0.12 / fig_h])
  ramp = np.linspace(0 if kind == "sequential" else -scale, scale, 256)
  cax.imshow(np.asarray([[_colour(v, kind, scale) for v in ramp]], np.uint8), aspect="auto",
             extent=(ramp[0], ramp[-1], 0, 1))
  cax.set_yticks([])
  cax.tick_params(labelsize=font_size)
  cax.set_xlabel(SERIES.get(series, series) + "  (dark bar = step boundary)", fontsize=font_size)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- browser screenshot

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--disable-default-apps", "--mute-audio",
                  "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                  "--virtual-time-budget=3000")


def find_chromium() -> Optional[str]:
  """``$JAXRL_DENSE_CHROMIUM``, else the first of chromium / chromium-browser / google-chrome on PATH."""
  import shutil  # pylint: disable=import-outside-toplevel
  env = os.environ.get("JAXRL_DENSE_CHROMIUM")
  if env:
    return env
  for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
    found = shutil.which(name)
    if found:
      return found
  return None


def screenshot(page: str | os.PathLike, out_png: str | os.PathLike, *, series: Optional[str] = None,
               size: tuple = (1400, 900), chromium: Optional[str] = None,
               timeout_s: float = 120.0) -> pathlib.Path:
  """PNG of a page as headless Chromium renders it (e.g. for the README), optionally with ``series``.

  Runs ``chromium --headless --screenshot`` with :data:`CHROMIUM_FLAGS` (no sandbox, background
  networking off, all traffic sent to an unreachable proxy) on ``file://<page>#series=<series>``,
  with a throw-away profile. Raises FileNotFoundError without Chromium (``apt-get install
  chromium``), RuntimeError if it fails.
  """
  import subprocess  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  binary = chromium or find_chromium()
  if binary is None:
    raise FileNotFoundError("no Chromium found (apt-get install -y chromium, or set $JAXRL_DENSE_CHROMIUM)")
  url = pathlib.Path(page).resolve().as_uri() + (f"#series={series}" if series else "")
  out_png = pathlib.Path(out_png).resolve()
  out_png.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as profile:
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out_png}",
           f"--window-size={int(size[0])},{int(size[1])}", url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
  if res.returncode != 0 or not out_png.is_file():
    raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr[-2000:]}")
  return out_png


# ----------------------------------------------------------------------------- trainer entry point


@renamed_kwargs(acc="outcome")
def write_sample_page(out_dir: str | os.PathLike, step: int, *, prompts: Sequence[str],
                      response_tokens: Any, mask: Any, outcome: Any, series: Mapping[str, Any], n: int,
                      tokenizer: Any = None, texts: Optional[Sequence[Sequence[str]]] = None,
                      outcome_reward: Any = None, process_return: Any = None,
                      num_best: int = 1, num_worst: int = 1, num_disagree: int = 1,
                      png: bool = False, tag: str = "step", meta: Optional[Mapping[str, Any]] = None,
                      decode: Optional[Callable[[Any, Sequence[int]], list]] = None,
                      observation_mask: Any = None) -> dict:
  """One call per sampling step: picks groups, decodes them, writes ``<out_dir>/<tag>_NNNNN.html``.

  Args:
    out_dir: e.g. ``<logdir>/samples``. step: the step number (file name ``{tag}_{step:05d}``).
    prompts: P prompt texts (one per group of n rows). response_tokens, mask: ``[B, T]``.
    outcome: ``[B]`` verifier labels. series: ``{name: [B, T]}`` (see :data:`SERIES`).
    n: samples per prompt. tokenizer: used by :func:`token_texts` for the picked rows only
      (or pass ``texts``: token texts of every row). outcome_reward: ``[B]`` (default outcome).
    process_return: ``[B]`` for :func:`pick_groups` (default: the row sum Σ_t of
      ``series["process_reward"]``, or of the first series when that one is absent).
    png: also write ``<tag>_NNNNN.png`` (:func:`render_png`). meta: shown under the title.
    observation_mask: ``[B, T]`` a multi-turn batch's observation tokens (shown grey between the
      model's turns), or None.
  Returns:
    ``{"html": path, "png": path or None, "groups": [(group_index, reason)], "page": [Group]}``.
  """
  m = np.asarray(mask) != 0
  b = m.shape[0]
  if process_return is None:
    key = "process_reward" if "process_reward" in series else next(iter(series))
    process_return = np.where(m, np.asarray(series[key], np.float64), 0.0).sum(1)
  picks = pick_groups(outcome, process_return, n=n, num_best=num_best, num_worst=num_worst,
                      num_disagree=num_disagree)
  if texts is None:
    if tokenizer is None:
      raise ValueError("write_sample_page: pass `tokenizer` or `texts`")
    dec = decode or token_texts
    tok = np.asarray(response_tokens)
    shown = m if observation_mask is None else m | (np.asarray(observation_mask) != 0)
    rows = {i for gi, _ in picks for i in range(gi * n, (gi + 1) * n)}
    texts = [dec(tokenizer, tok[i][shown[i]].tolist()) if i in rows else [""] * int(shown[i].sum())
             for i in range(b)]
  groups = groups_from_batch(prompts, texts, series, m, outcome, n=n, outcome_reward=outcome_reward,
                             group_indices=[gi for gi, _ in picks],
                             titles=[f"{reason} (prompt {gi})" for gi, reason in picks],
                             observation_mask=observation_mask)
  out_dir = pathlib.Path(out_dir)
  stem = f"{tag}_{int(step):05d}"
  info = {"step": int(step)}
  info.update(meta or {})
  html_path = write_html(out_dir / f"{stem}.html", groups, title=f"Samples at {tag} {int(step)}",
                         meta=info)
  png_path = render_png(out_dir / f"{stem}.png", groups) if png else None
  return {"html": html_path, "png": png_path, "groups": picks, "page": groups}
