"""Argument checks shared by the losses and the transformations.

Every check runs in Python, at trace time, so a bad value is reported before
XLA compiles anything. Values that are traced (a hyperparameter injected by
`optax.inject_hyperparams` under `jax.jit`, say) cannot be inspected and are
let through.
"""

import numbers

import jax
import numpy as np


def bad_argument(kind: type, owner: str, name: str, message: str) -> Exception:
  """`kind(f"{owner}: {message}")` naming the bad argument in its `argument` attribute.

  A caller that takes its arguments from elsewhere (the trainer, from its
  config) reads the attribute to say which of its own fields was bad.
  """
  error = kind(f"{owner}: {message}")
  error.argument = name
  return error


def is_concrete(value) -> bool:
  """True when `value` can be read on the host without tracing."""
  return not isinstance(value, jax.core.Tracer)


def check_in_range(owner: str, name: str, value, low: float, high: float):
  """Raises `ValueError` unless `low <= value <= high` (when concrete)."""
  if callable(value):
    raise bad_argument(
      TypeError,
      owner,
      name,
      f"{name} must be a number, got the callable {value!r}; wrap the transformation in"
      " optax.inject_hyperparams to schedule it.",
    )
  if not is_concrete(value):
    return
  array = np.asarray(value)
  if array.shape != ():
    raise bad_argument(ValueError, owner, name, f"{name} must be a scalar, got shape {array.shape}.")
  if not (isinstance(value, numbers.Real) or np.issubdtype(array.dtype, np.number)):
    raise bad_argument(TypeError, owner, name, f"{name} must be a real number, got {value!r}.")
  if not low <= float(array) <= high:
    raise bad_argument(ValueError, owner, name, f"{name} must lie in [{low}, {high}], got {value!r}.")


def check_bool(owner: str, name: str, value, *, allow_none: bool = False) -> None:
  """Raises `TypeError` unless `value` is a Python bool (or None, when allowed)."""
  if not (isinstance(value, bool) or (allow_none and value is None)):
    raise bad_argument(
      TypeError, owner, name, f"{name} must be {'None or ' if allow_none else ''}a bool, got {value!r}."
    )


def check_positive_int(owner: str, name: str, value) -> None:
  """Raises `ValueError` unless `value` is a Python int >= 1 (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise bad_argument(ValueError, owner, name, f"{name} must be a positive int, got {value!r}.")


def check_fraction(owner: str, name: str, value) -> None:
  """Raises `ValueError` unless `value` is a Python number in (0, 1]."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
    raise bad_argument(ValueError, owner, name, f"{name} must be a number in (0, 1], got {value!r}.")


def check_optional_str(owner: str, name: str, value) -> None:
  """Raises `TypeError` unless `value` is a str or None."""
  if value is not None and not isinstance(value, str):
    raise bad_argument(TypeError, owner, name, f"{name} must be a str or None, got {value!r}.")
