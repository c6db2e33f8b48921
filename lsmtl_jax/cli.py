"""Shared command-line plumbing: config imports from any directory, and flag
errors as one line with exit code 2."""

from __future__ import annotations

import os
import sys

from absl import flags


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
    if "config" in flags.FLAGS:
      # A config file that failed to load surfaces on first attribute access.
      flags.FLAGS.config.get("method", None)
    return rest
  except Exception as e:  # pylint: disable=broad-except  (config files raise anything)
    message = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
    print(f"error: {message or type(e).__name__}", file=sys.stderr)
    sys.exit(2)
