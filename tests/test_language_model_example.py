"""examples/language_model.py: a causal transformer trained with AACE-SAM over tokens, sharded over 8 CPU devices."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import load_script

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "language_model.py"


def load_example():
  return load_script(EXAMPLE, "language_model")


def test_the_loss_falls_with_the_state_sharded_over_8_devices():
  env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  result = subprocess.run(
    [sys.executable, str(EXAMPLE), "--host_devices", "8", "--steps", "40"],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.splitlines()[-1])
  assert summary["devices"] == 8
  # Every parameter is split over the 8 devices: each holds an eighth of the largest one.
  assert summary["sharded_parameter_leaves"] == summary["parameter_leaves"] > 0
  assert summary["largest_parameter_shard_fraction"] == 1 / 8
  # From about log2(256) = 8 bits per byte (a uniform guess) to well below it, on lines never trained on.
  assert summary["held_out_bits_per_byte_before"] > 7
  assert summary["held_out_bits_per_byte_after"] < summary["held_out_bits_per_byte_before"] - 2
  assert summary["last_loss"] < summary["first_loss"] - 2


def test_padding_is_marked_by_the_lengths(tmp_path):
  text = tmp_path / "text.txt"
  text.write_text("abc\n\nx\nhello world\n")
  tokens, lengths = load_example().text_sequences(str(text), length=4)
  assert lengths.tolist() == [3, 5]  # "x" (one byte, nothing to predict) is dropped; "hello world" is cut to 5
  assert tokens.tolist() == [[97, 98, 99, 0, 0], [104, 101, 108, 108, 111]]


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--width", "66", "--heads", "4"], "--width 66 must be a multiple of --heads 4"),
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--host_devices", "0"], "--host_devices must be positive, got 0"),
  ],
)
def test_bad_arguments_are_named(argv, message, capsys):
  with pytest.raises(SystemExit):
    load_example().parse_args(argv)
  assert message in capsys.readouterr().err
