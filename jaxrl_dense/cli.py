"""The experiments' command-line entry: `absl.app.run` with the project's exit statuses.

    if __name__ == "__main__":
      cli.run(main)               # instead of app.run(main)

Exit statuses of every experiment script: 2 = a bad input (an unknown or malformed flag, a value
out of range, a path that cannot be used; the message names the flag), 3 = the run stopped on a
non-finite loss, 4 = a checkpoint directory was refused. absl itself exits 1 on a flag it cannot
parse; `parse_flags` keeps absl's message and exits 2, like every other bad input.

`command_line_flags(argv)` names the flags given directly on a command line (not through a
--flagfile), for the checks that treat a flag typed by the user differently from one that a
shared flag file carries (`rl.config.check_applicable`).
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app

EXIT_BAD_INPUT = 2


def parse_flags(argv: Sequence[str]) -> list:
  """`app.parse_flags_with_usage` (absl's own message and hint), exiting 2 instead of 1."""
  try:
    return app.parse_flags_with_usage(list(argv))
  except SystemExit as e:
    if e.code == 1:
      raise SystemExit(EXIT_BAD_INPUT) from None
    raise


def run(main: Callable) -> None:
  """`app.run(main)` whose flag-parse errors and `app.UsageError`s (e.g. positional arguments)
  exit 2."""

  def main_(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      if e.exitcode == 1:
        e.exitcode = EXIT_BAD_INPUT
      raise

  app.run(main_, flags_parser=parse_flags)


def command_line_flags(argv: Sequence[str]) -> set:
  """Names of the flags set directly in `argv` (argv[0] is the program; `--name=v`, `--name v`,
  `-name`, `--noname`; --flagfile contents and everything after `--` are not included). A
  `--noX` form is reported as both `noX` and `X` (absl's negated boolean)."""
  names = set()
  for arg in list(argv)[1:]:
    if arg == "--":
      break
    if not arg.startswith("-") or arg in ("-", "--"):
      continue
    name = arg.lstrip("-").split("=", 1)[0]
    if not name or name == "flagfile":
      continue
    names.add(name)
    if name.startswith("no"):
      names.add(name[2:])
  return names
