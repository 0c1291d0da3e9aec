"""The README's notebook snippet runs as written (keeps the documented API honest)."""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_prime_snippet_runs():
  text = _README.read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  snippet = next(b for b in blocks if "implicit_token_rewards" in b)
  b, t, n = 8, 6, 4
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  lengths = np.array([6, 3, 1, 5, 6, 2, 4, 6])
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  env = dict(
      prm_logp=-jax.random.uniform(keys[0], (b, t)), ref_logp=-jax.random.uniform(keys[1], (b, t)),
      new_logp=-jax.random.uniform(keys[2], (b, t)), old_logp=-jax.random.uniform(keys[3], (b, t)),
      mask=jnp.asarray(mask), outcome=jnp.array([1., 0., 0., 1., 1., 1., 0., 0.]))
  exec(compile(snippet, "README.md", "exec"), env)  # pylint: disable=exec-used
  assert env["adv"].shape == (b, t)
  assert np.isfinite(float(env["prm_loss"])) and np.isfinite(float(env["out"].loss))
  assert np.all(np.asarray(env["adv"])[mask == 0] == 0)


def test_readme_prime_step_is_the_tested_architecture_snippet():
  """The README's whole-step block is the one tests/rl/test_update.py runs from docs/architecture.md."""
  pick = lambda text: next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "make_prime" in b)
  arch = (_README.parent / "docs" / "architecture.md").read_text()
  assert pick(_README.read_text()) == pick(arch)
