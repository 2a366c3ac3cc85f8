"""Variants of a training method, written `METHOD[:FIELD=VALUE...]` (`train/compare.py --methods`)."""

import ast

from train import config_checks
from train import methods


def parse_method(spec: str) -> tuple[str, dict]:
  """`"aace_sam:normalize=True:rho=0.05"` -> `("aace_sam", {"normalize": True, "rho": 0.05})`."""
  method, *changes = spec.split(":")
  if method not in methods.METHODS:
    raise config_checks.ConfigError(f"Bad --methods entry {spec!r}: {method!r} is not one of {methods.METHODS}.")
  fields = {}
  for change in changes:
    field, equals, text = change.partition("=")
    if not equals or not field:
      raise config_checks.ConfigError(f"Bad --methods entry {spec!r}: {change!r} is not FIELD=VALUE.")
    try:
      fields[field] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      fields[field] = text
  return method, fields


def method_config(base, spec: str):
  """`base` with the method and the changes of `--methods` entry `spec`."""
  method, fields = parse_method(spec)
  config = base.copy_and_resolve_references()
  config.unlock()
  config.method = method
  for field, value in fields.items():
    if field not in config:
      raise config_checks.ConfigError(f"Bad --methods entry {spec!r}: the config has no field {field!r}.")
    config[field] = value
  return config
