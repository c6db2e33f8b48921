"""Shared command-line plumbing: config imports from any directory, and flag
errors as one line with exit code 2."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Iterator

from absl import flags


def refuse(message: str, code: int = 2):
  """Prints `error: <message>`, the one line on stderr, and exits at once. A
  refused command has written nothing, and leaving without the interpreter's
  shutdown keeps late callbacks of background I/O threads (Orbax's reads after
  a failed restore) from printing tracebacks after that line."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access


class Interrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM arrived: raised in the main thread so that every
  `finally` and `except BaseException` on the way out cleans up what it wrote."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum, self.name = signum, signal.Signals(signum).name


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
  """SIGINT and SIGTERM raise Interrupted (once: a second signal during the
  cleanup is ignored, so the cleanup finishes) for the block."""
  raised = []

  def handle(signum, frame):  # pylint: disable=unused-argument
    if not raised:
      raised.append(signum)
      raise Interrupted(signum)

  previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def add_config_root(argv: list[str]) -> None:
  """Config files import siblings (`from configs import default`): put the folder
  that holds `configs/` on sys.path, so --config works from any directory."""
  for arg in argv:
    if arg.startswith("--config="):
      path = os.path.abspath(arg.split("=", 1)[1].split(":", 1)[0])
      parts = path.split(os.sep)
      if "configs" in parts:
        root = os.sep.join(parts[:len(parts) - 1 - parts[::-1].index("configs")]) or os.sep
        if root not in sys.path:
          sys.path.insert(0, root)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flags_parser: a bad flag, override or config file exits 2 with one line."""
  add_config_root(argv)
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      # A config file that failed to load surfaces on first attribute access.
      config = flags.FLAGS.config
      if config is not None:
        config.get("method", None)
    return rest
  except Exception as e:  # pylint: disable=broad-except  (config files raise anything)
    print(f"error: {_message(e, argv)}", file=sys.stderr)
    sys.exit(2)


def _message(e: Exception, argv: list[str]) -> str:
  """One line; a misspelled --config.FIELD override (ml_collections' KeyError)
  names the flag and the field instead of a quoted repr."""
  if e.args and isinstance(e.args[0], KeyError):  # a nested field: AttributeError(KeyError)
    e = e.args[0]
  if isinstance(e, KeyError) and e.args:
    lines = str(e.args[0]).splitlines()
    key = lines[0].strip("'\"")
    hint = " ".join(" ".join(lines[1:]).split())
    flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
                 and key in a.split("=", 1)[0][len("--config."):].split(".")), None)
    text = f"{flag + ': ' if flag else ''}no config field {key!r}"
    return text + (f"; {hint[0].lower()}{hint[1:]}" if hint else "")
  return " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split()) or type(e).__name__
