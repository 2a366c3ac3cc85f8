"""Shared test configuration.

Tests under `multidevice/` need 8 devices, which JAX only fakes on CPU when
XLA_FLAGS is set before it is imported: `test_multidevice.py` runs them in a
subprocess that sets it, and the main session does not collect them.
"""

import os

collect_ignore = ["multihost_worker.py"]  # a script run by test_multihost.py, not a test module
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  collect_ignore.append("multidevice")
