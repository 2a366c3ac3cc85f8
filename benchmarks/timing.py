"""What the step benchmarks share: steps timed round-robin, and the peak memory of a run alone in a child process."""

import argparse
import json
import subprocess
import sys
import time
import warnings
from typing import Callable
from typing import Optional


def round_robin(steps: dict[str, Callable[[int], None]], rounds: int) -> dict[str, list[float]]:
  """Seconds of each of `rounds` calls of every ``steps[name](round_index)``, one call of each per round.

  Each callable runs one step and waits for it. Interleaving them step by
  step makes slow drifts of the machine (other load, clocks) fall on all of
  them alike.
  """
  times = {name: [] for name in steps}
  for round_index in range(rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      step(round_index)
      times[name].append(time.perf_counter() - start)
  return times


def time_cycles(runs: dict, rounds: int) -> tuple[dict[str, list[float]], dict]:
  """`(seconds of each round, final states)` of every ``runs[name] = (cycle of steps, state, batch)``.

  Each run takes two warm-up steps (compiling what is not compiled yet), then
  the runs are timed round-robin (`round_robin`), each round running the
  next step of the run's cycle and waiting for it.
  """
  import jax

  states = {}
  for name, (cycle, state, batch) in runs.items():
    for step in (cycle * 2)[:2]:
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    states[name] = state

  def one_step(name):
    cycle, _, batch = runs[name]

    def run(round_index):
      # A cycle's steps in order from its start: the warm-up took one or two.
      states[name], metrics = cycle[(round_index + 2) % len(cycle)](states[name], batch)
      jax.block_until_ready((states[name], metrics))

    return run

  return round_robin({name: one_step(name) for name in runs}, rounds), states


def child_peak_bytes(script: str, arguments: list[str]) -> tuple[Optional[int], str]:
  """`(peak bytes or None, stderr)` of `python script arguments...`, whose last line is ``{"peak_bytes": ...}``.

  A run alone in its own process: the peak is not mixed with the other
  runs' memory. None when the child failed (its stderr says why).
  """
  result = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True)
  if result.returncode != 0:
    return None, result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"], result.stderr


METHODS = ("sgd", "sam", "aace_sam", "asam")


def add_method_argument(parser, default: str) -> None:
  """`--method` (the trainer's training method); `--optimizer`, its old name, still taken with a warning."""
  parser.add_argument("--method", default=default, choices=METHODS, help="the trainer's method (config.method)")
  parser.add_argument("--optimizer", dest="old_method", choices=METHODS, help=argparse.SUPPRESS)


def take_old_method(args) -> None:
  """Moves a value given as `--optimizer` into `args.method`, with a FutureWarning naming the new flag."""
  if args.old_method is not None:
    warnings.warn(
      f"--optimizer is deprecated and will be removed: it is now --method (--method {args.old_method}).",
      FutureWarning,
      stacklevel=2,
    )
    args.method = args.old_method
  del args.old_method
