"""What the trainer's commands (`main.py`, `compare.py`) share: the `--config` flag, and bad flags in one line."""

import os
import pathlib
import re
import sys
import traceback

from absl import flags
from ml_collections import config_flags

from train import config_checks

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parent / "configs" / "default.py")


def define_config_flag(help_text: str) -> None:
  """`--config FILE[:ARGUMENT]` with `--config.FIELD=VALUE` overrides; an unknown field ends the process in one line.

  ml_collections applies the overrides of the command line while it defines
  the flag, so a field the config lacks raises here, before any parsing.
  """
  try:
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, help_text, lock_config=True)
  except (KeyError, AttributeError) as unknown_field:
    suggestion = re.search(r"Did you mean \S+ instead of \S+\?", str(unknown_field))
    sys.exit(
      f"error: unknown config field in {' '.join(a for a in sys.argv[1:] if a.startswith('--config'))}"
      f"{'; ' + suggestion.group(0) if suggestion else ''}"
    )


def config_path(argv) -> str:
  """The `--config` file named in `argv` (the default config when none is)."""
  for index, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and index + 1 < len(argv):
      return argv[index + 1]
  return DEFAULT_CONFIG


def parse_flags(argv):
  """absl's flag parsing, with a bad flag, config field (a typo, say) or config file reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as error:
    config_file = os.path.abspath(config_path(argv).split(":", 1)[0])
    if not isinstance(error, flags.Error) and config_file in "".join(traceback.format_tb(error.__traceback__)):
      sys.exit(f"error: {config_checks.config_file_error(error, config_path(argv))}")
    message = str(error).strip().splitlines()
    sys.exit(f"error: {message[-1] if message else type(error).__name__}")
  except Exception as error:  # raised by the config file itself: a syntax error, an exception in get_config
    sys.exit(f"error: {config_checks.config_file_error(error, config_path(argv))}")
