"""The package as a user installs it: sdist and wheel build, pass `twine check`, and the wheel works alone.

The wheel goes into a fresh virtual environment with nothing but its declared
runtime dependencies (jax, optax, numpy, from the package index or pip's
cache), where `aace_jax` must import and take an AACE-SAM step, and Flax,
an extra, must be absent.
"""

import pathlib
import subprocess
import sys
import venv
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]

SMOKE = """
import importlib.util, jax, jax.numpy as jnp, optax, aace_jax
assert importlib.util.find_spec("flax") is None, "flax is an extra, not a runtime dependency"
w = jnp.zeros((3, 2))
x, y = jnp.eye(3), jnp.array([0, 1, 1])
loss = lambda w, fn: fn(x @ w, y).mean()
tx = aace_jax.aace_sam(optax.sgd(0.5), rho=0.2)
state = tx.init(w)
for _ in range(20):
  updates, state = tx.update(jax.grad(loss)(w, aace_jax.aace_cross_entropy), state, w,
                             grad_fn=jax.value_and_grad(lambda v: loss(v, aace_jax.cross_entropy)))
  w = optax.apply_updates(w, updates)
assert float(loss(w, aace_jax.cross_entropy)) < 0.5
print(aace_jax.__version__, sorted(aace_jax.__all__)[:2])
"""


def run(command, **kwargs):
  result = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
  assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
  return result


def test_sdist_and_wheel_build_check_and_install_alone(tmp_path):
  dist = tmp_path / "dist"
  # The wheel is built from the sdist, as from a downloaded source: this proves the sdist complete
  # and leaves no build/ folder in the checkout.
  run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)])
  wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
  assert len(wheels) == 1 and len(sdists) == 1
  run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)])

  with zipfile.ZipFile(wheels[0]) as wheel:
    names = wheel.namelist()
    metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
  assert not any(n.startswith(("train/", "tests/", "benchmarks/")) for n in names)  # the library alone
  assert "License-Expression: Apache-2.0" in metadata
  requirements = sorted(
    line.split(":", 1)[1].strip()
    for line in metadata.splitlines()
    if line.startswith("Requires-Dist:") and "extra ==" not in line
  )
  assert requirements == ["jax>=0.7", "numpy", "optax"]

  environment = tmp_path / "venv"
  venv.create(environment, with_pip=True)
  python = environment / "bin" / "python"
  run([str(python), "-m", "pip", "install", "--quiet", str(wheels[0])])
  result = run([str(python), "-c", SMOKE], cwd=tmp_path)  # not the checkout: the installed package
  assert result.stdout.startswith("0.")
