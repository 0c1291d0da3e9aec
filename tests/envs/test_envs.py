"""Environments for multi-turn rollouts: the tool-call format, the calculator, ToolEnv episodes, the
python tool's containment (hang, exception, huge output) in the code sandbox."""
import threading
import time

import pytest

from jaxrl_dense import envs
from jaxrl_dense.envs import tools as envtools
from jaxrl_dense.verifiers import sandbox as vsandbox

BWRAP_OK, BWRAP_WHY = vsandbox.bwrap_available()
# The python tool with bubblewrap (what runs use) and with the explicit "unsafe" mode, as the code
# verifier's tests do: the bwrap variants skip where bubblewrap is unusable, the unsafe ones run anywhere.
SANDBOXES = [pytest.param("auto", id="bwrap", marks=pytest.mark.skipif(
    not BWRAP_OK, reason=f"bubblewrap unusable here ({BWRAP_WHY}); apt-get install bubblewrap")),
             pytest.param("unsafe", id="unsafe")]


def calc(expression):
  return {"name": "calculator", "arguments": {"expression": expression}}


# ----------------------------------------------------------------------------- parsing


def test_parse_formats():
  assert envs.parse_tool_call("<tool>calculator: 12*7</tool>") == calc("12*7")
  # whitespace around the name and the arguments; text around the call
  assert envs.parse_tool_call("First I add. <tool>  calculator :   1 + 2 \n</tool> ok") == calc("1 + 2")
  # several calls: the last one; tool_calls lists all, in order
  text = "<tool>calculator: 1+1</tool> then <tool>python: print(2)</tool> and <tool>calculator: 3</tool>"
  assert envs.parse_tool_call(text) == calc("3")
  assert envs.tool_calls(text) == [calc("1+1"), {"name": "python", "arguments": {"code": "print(2)"}}, calc("3")]
  # unclosed -> None; an unclosed call after a complete one leaves the complete one
  assert envs.parse_tool_call("<tool>calculator: 1+2") is None
  assert envs.parse_tool_call("<tool>calculator: 5</tool> now <tool>calculator: 1+") == calc("5")
  assert envs.tool_calls("no calls here </tool>") == []
  # an opener inside an open call starts a new one: the earlier opener is text
  assert envs.tool_calls("<tool>python: x <tool>calculator: 1</tool>") == [calc("1")]
  # a block without "NAME:" is not a call; the args may contain ':' and '<'
  assert envs.parse_tool_call("<tool>just text</tool>") is None
  assert envs.parse_tool_call("<tool>python: d = {1: 2}; print(1 < 2)</tool>") == {
      "name": "python", "arguments": {"code": "d = {1: 2}; print(1 < 2)"}}
  # multi-line code: leading blank line and common indentation removed, inner indentation kept
  code = envs.parse_tool_call("<tool>python:\n    for i in range(2):\n        print(i)\n</tool>")
  assert code["arguments"]["code"] == "for i in range(2):\n    print(i)"
  # names no tool claims get "input"; arg_names overrides
  assert envs.parse_tool_call("<tool>search: paris</tool>") == {"name": "search", "arguments": {"input": "paris"}}
  assert envs.parse_tool_call("<tool>search: paris</tool>", {"search": "query"})["arguments"] == {"query": "paris"}


# ----------------------------------------------------------------------------- calculator

@pytest.mark.parametrize("expression,expected", [
    ("12*7", "84"), ("1+2*3", "7"), ("(1+2)*3", "9"), ("-3+4*(2-5)", "-15"), ("--4", "4"), ("+5", "5"),
    ("7/2", "3.5"), ("6/3", "2"), ("7//2", "3"), ("-7//2", "-4"), ("7%3", "1"), ("-7%3", "2"),
    ("2**10", "1024"), ("2**-1", "0.5"), ("-2**2", "-4"), ("2**3**2", "512"), ("0.1+0.2", "0.30000000000000004"),
    ("1.5*4", "6"), ("1e3", "1000"), ("1e20", "1e+20"), ("10**20", "100000000000000000000"), ("1_000+1", "1001"),
    ("7.5//2", "3"), ("5.5%2", "1.5"), ("  3 *  4  ", "12"), ("2**0.5", repr(2 ** 0.5)),
    ("123456789*987654321", str(123456789 * 987654321)),
])
def test_calculator_table(expression, expected):
  assert envs.calculator(expression) == expected


@pytest.mark.parametrize("expression,message", [
    ("x + 1", "names are not allowed"), ("__import__('os').system('echo hi')", "function calls are not allowed"),
    ("(1).real", "attributes are not allowed"), ("abs(-1)", "function calls are not allowed"),
    ("().__class__", "attributes are not allowed"), ("'a' * 3", "only numbers"), ("[1][0]", "not allowed"),
    ("lambda: 1", "not allowed"), ("1 < 2", "not allowed"), ("2^3", "use ** for powers"), ("1 << 4", "not allowed"),
    ("True + 1", "only numbers"), ("1j", "complex"), ("1/0", "division by zero"), ("1//0", "division by zero"),
    ("5%0", "division by zero"), ("0**-1", "division by zero"), ("(-8)**(1/3)", "complex"), ("1e308*10", "not finite"),
    ("1 +", "invalid expression"), ("", "empty expression"), ("1" + "+1" * 600, "too long"),
])
def test_calculator_refusals(expression, message):
  out = envs.calculator(expression)
  assert out.startswith("error: ") and message in out, out


@pytest.mark.parametrize("expression", ["9**9**9", "10**10**10", "2**10**100", "(10**1000)**(10**1000)",
                                        "2.0**10**6", "10**1000/3", "-(7**99999)", "(2**4095)**2"])
def test_calculator_huge_powers_refused_quickly(expression):
  t0 = time.perf_counter()
  out = envs.calculator(expression)
  assert time.perf_counter() - t0 < 0.5
  assert out.startswith("error: "), out


def test_calculator_caps_exact_and_sufficient():
  """The int cap is exact at its boundary, and an expression of maximal length built from the
  costliest allowed operations (products and powers of cap-sized ints) still takes well under
  0.5 s: the caps alone bound the calculator's time."""
  cap = envtools.CALC_MAX_INT_BITS
  assert envs.calculator(f"2**{cap - 1}") == str(2 ** (cap - 1))  # bit_length == cap: allowed
  assert "too large" in envs.calculator(f"2**{cap}")
  assert "too large" in envs.calculator(f"2**{cap - 1}*2")
  unit = "(3**2583)//(7**1400)*(11**1100)%(2**4000)+"  # ~4094, 3930, 3805 bits; every step < cap
  expr = unit * (envtools.CALC_MAX_EXPRESSION_CHARS // len(unit)) + "1"
  assert len(expr) <= envtools.CALC_MAX_EXPRESSION_CHARS
  t0 = time.perf_counter()
  out = envs.calculator(expr)
  assert time.perf_counter() - t0 < 0.5
  assert out.lstrip("-").isdigit(), out[:80]


# ----------------------------------------------------------------------------- ToolEnv episodes

def test_three_turn_episode():
  env = envs.ToolEnv(max_turns=4)
  assert isinstance(env, envs.Environment)
  assert env.stop_strings == ("</tool>",)
  assert env.reset(object()) == ""
  r1 = env.step("I need 12 times 7. <tool>calculator: 12*7</tool>")
  assert r1 == envs.StepResult("\n<result>84</result>\n", 0.0, False, r1.info)
  assert r1.info["tool"] == "calculator" and r1.info["call"] == calc("12*7") and r1.info["error"] is None
  assert r1.info["turn"] == 1 and not r1.info["truncated"]
  r2 = env.step("Now divide by zero: <tool>calculator: 84/0</tool>")
  assert r2.observation == "\n<result>error: division by zero</result>\n" and not r2.done
  assert r2.info["error"] == "exception"
  r3 = env.step("The answer is \\boxed{84}.")
  assert r3 == envs.StepResult("", 0.0, True, r3.info) and r3.info["call"] is None
  with pytest.raises(RuntimeError, match="reset"):
    env.step("more")
  assert env.stats["calls"] == 2 and env.stats["turns"] == 3 and env.stats["episodes"] == 1
  assert env.stats["errors"]["exception"] == 1 and env.stats["truncated"] == 0
  # a new episode on the same env starts over
  assert env.reset(None) == "" and env.step("<tool>calculator: 1+1</tool>").observation == "\n<result>2</result>\n"


def test_turn_cap():
  env = envs.ToolEnv(max_turns=2)
  env.reset(None)
  r1 = env.step("<tool>calculator: 2+2</tool>")
  assert r1.observation == "\n<result>4</result>\n" and not r1.done
  r2 = env.step("<tool>calculator: 3+3</tool>")  # turn 2 of 2: parsed, not run, episode over
  assert r2.done and r2.observation == "" and r2.info["capped"] and r2.info["call"] == calc("3+3")
  assert env.stats["calls"] == 1 and env.stats["capped"] == 1
  env1 = envs.ToolEnv(max_turns=1)
  env1.reset(None)
  assert env1.step("<tool>calculator: 1</tool>").done


def test_unknown_tool_and_parse_errors():
  env = envs.ToolEnv(max_turns=8)
  env.reset(None)
  r = env.step("<tool>search: capital of France</tool>")
  assert r.observation.startswith("\n<result>error: unknown tool 'search'; available: calculator")
  assert r.info["error"] == "unknown_tool" and not r.done
  r = env.step("<tool>what is 2+2</tool>")
  assert r.observation.startswith("\n<result>error: could not parse") and r.info["error"] == "parse"
  r = env.step("<tool>Calculator: 2+3</tool>")  # names match exactly, then lower-cased
  assert r.observation == "\n<result>5</result>\n" and r.info["tool"] == "calculator"
  assert env.stats["errors"]["unknown_tool"] == 1 and env.stats["errors"]["parse"] == 1 and env.stats["calls"] == 3


def test_output_truncated_with_marker():
  env = envs.ToolEnv(max_observation_chars=64)
  env.reset(None)
  r = env.step("<tool>calculator: 10**200</tool>")
  body = r.observation[len("\n<result>"):-len("</result>\n")]
  assert len(body) == 64 and body.endswith(envs.TRUNCATION_MARKER) and body.startswith("1000")
  assert r.info["truncated"] and env.stats["truncated"] == 1 and r.info["error"] is None


def test_host_tool_exception_timeout_and_bad_return():
  release = threading.Event()

  def boom(args, timeout_s):
    raise KeyError("secret")

  def hang(args, timeout_s):
    release.wait(30)
    return "late"

  tools = {"boom": envs.Tool(boom), "hang": envs.Tool(hang), "bad": envs.Tool(lambda a, t: 42)}
  env = envs.ToolEnv(tools, max_turns=8, timeout_s=0.2)
  env.reset(None)
  r = env.step("<tool>boom: x</tool>")
  assert r.observation == "\n<result>error: KeyError: 'secret'</result>\n" and r.info["error"] == "exception"
  t0 = time.monotonic()
  r = env.step("<tool>hang: x</tool>")
  elapsed = time.monotonic() - t0
  release.set()
  assert r.info["error"] == "timeout" and "timed out after 0.2 s" in r.observation and not r.done
  assert 0.2 <= elapsed < 1.0
  r = env.step("<tool>bad: x</tool>")
  assert r.info["error"] == "exception" and "returned int" in r.observation
  assert env.stats["errors"]["exception"] == 2 and env.stats["errors"]["timeout"] == 1
  flat = envs.summarize_stats([env.stats, env.stats])
  assert flat["env/calls"] == 6 and flat["env/errors/timeout"] == 2


def test_make_env_and_validation():
  factory = envs.make_env("tool:calculator", max_turns=3)
  a, b = factory(), factory()
  assert a is not b and a.max_turns == 3 and list(a.tools) == ["calculator"]
  a.reset(None)
  a.step("<tool>calculator: 1</tool>")
  assert a.stats["calls"] == 1 and b.stats["calls"] == 0
  for spec in ["calculator", "tool:", "tool:search", "tool:calculator,calculator", "search:calculator", ""]:
    with pytest.raises(ValueError, match=repr(spec).replace("(", r"\(")):
      envs.make_env(spec)
  with pytest.raises(ValueError, match="max_turns"):
    envs.make_env("tool:calculator", max_turns=0)
  for kwargs, flag in [({"max_turns": 0}, "max_turns"), ({"max_observation_chars": 8}, "max_observation_chars"),
                       ({"timeout_s": 0}, "timeout_s"), ({"tools": {}}, "tools"),
                       ({"tools": {"bad name": envs.Tool(lambda a, t: "")}}, "bad name")]:
    with pytest.raises(ValueError, match=flag):
      envs.ToolEnv(**kwargs)
  assert "<tool>NAME: ARGS</tool>" in envs.TOOL_FORMAT_INSTRUCTION
  assert envs.ToolEnv().instruction.startswith(envs.TOOL_FORMAT_INSTRUCTION)


# ----------------------------------------------------------------------------- python tool

def _python_env(sandbox, **kwargs):
  return envs.make_env("tool:calculator,python", sandbox=sandbox, **kwargs)()


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_python_prints_and_errors(sandbox):
  env = _python_env(sandbox, max_turns=8)
  env.reset(None)
  r = env.step("<tool>python:\n```python\nfor i in range(3):\n    print(i * i)\n```\n</tool>")
  assert r.observation == "\n<result>0\n1\n4</result>\n" and r.info["error"] is None
  assert r.info["call"]["arguments"]["code"] == "```python\nfor i in range(3):\n    print(i * i)\n```"
  r = env.step("<tool>python: print('before'); 1/0</tool>")
  assert r.info["error"] == "exception" and not r.done
  assert r.observation.startswith("\n<result>error: ") and "ZeroDivisionError: division by zero" in r.observation
  assert "stdout:\nbefore" in r.observation
  r = env.step("<tool>python: import os; os._exit(3)</tool>")
  assert r.info["error"] == "exception" and "exit status 3" in r.observation
  assert env.stats["errors"]["exception"] == 2


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_python_hang_is_contained(sandbox):
  env = _python_env(sandbox, timeout_s=1.0)
  env.reset(None)
  t0 = time.monotonic()
  r = env.step("<tool>python: while True: pass</tool>")
  elapsed = time.monotonic() - t0
  assert 1.0 <= elapsed < 1.0 + 2.0, elapsed
  assert r.observation == "\n<result>error: timed out after 1 s</result>\n" and r.info["error"] == "timeout"
  assert env.stats["errors"]["timeout"] == 1 and not r.done


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_python_huge_output_truncated(sandbox):
  env = _python_env(sandbox)
  env.reset(None)
  t0 = time.monotonic()
  r = env.step("<tool>python: print('x' * 10**7)</tool>")
  assert time.monotonic() - t0 < 2.0
  body = r.observation[len("\n<result>"):-len("</result>\n")]
  assert body == "x" * (512 - len(envs.TRUNCATION_MARKER)) + envs.TRUNCATION_MARKER
  assert r.info["error"] == "output_limit" and r.info["truncated"]
  assert env.stats["truncated"] == 1 and env.stats["errors"]["output_limit"] == 1
