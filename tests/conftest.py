"""Shared test configuration.

Tests under `multidevice/` need 8 devices, which JAX only fakes on CPU when
XLA_FLAGS is set before it is imported: `test_multidevice.py` runs them in a
subprocess that sets it, and the main session does not collect them.
"""

import os

import jax

from tests.helpers import XLA_CACHE

collect_ignore = ["multihost_worker.py"]  # a script run by test_multihost.py, not a test module
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  collect_ignore.append("multidevice")

# The runs these tests train in this process compile the same steps again and again: jax's persistent cache,
# in a folder made for the session, loads them instead (the same programs, so the same numbers). Programs that
# compile in under 0.3 s are left out, so that the library's many small ones are not written.
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
