"""jax's persistent compilation cache: a resumed or repeated run loads its compiled steps.

`enable(config)` turns it on (call it before anything compiles); `events`
counts this process's hits and misses, which the run reports with the time
of its first step.
"""

import collections
import os
from typing import Optional

import jax
import ml_collections

# The persistent compilation cache's hits and misses in this process (jax.monitoring events).
events = collections.Counter()


def _count_event(event: str, **kwargs) -> None:
  del kwargs
  if event in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):
    events[event.rsplit("/", 1)[1]] += 1


jax.monitoring.register_event_listener(_count_event)


def default_dir() -> str:
  """`$XDG_CACHE_HOME/aace_jax/xla`, or `~/.cache/aace_jax/xla`."""
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "aace_jax", "xla")


def enable(config: ml_collections.ConfigDict) -> Optional[str]:
  """Turns the cache on at `config.compilation_cache_dir` (default `default_dir()`).

  Returns the directory, or None when `config.compilation_cache` is off.
  """
  if not config.compilation_cache:
    return None
  path = config.compilation_cache_dir or default_dir()
  jax.config.update("jax_compilation_cache_dir", path)
  # Every program, however quick to compile: a resumed run then compiles nothing.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def first_step_message(seconds: float) -> str:
  return (
    f"first step after {seconds:.1f} s (start, data, init, compile and the step; compilation cache:"
    f" {events['cache_hits']} hits, {events['cache_misses']} misses)"
  )
