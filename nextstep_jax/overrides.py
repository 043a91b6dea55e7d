"""Command-line overrides and config loading.

``apply_overrides`` sets dotted keys on a (locked) config, rejecting unknown ones with the closest valid
keys (``unknown_key_message``, shared with the entry points' error path in ``nextstep_jax/cli.py``);
``load_config`` builds ``get_config(arg)`` of a config file or module, applies overrides and validates it
(``python -m nextstep_jax.export --qwen2 --config=...``, benchmarks and tests use it; the training CLIs
use ml_collections.config_flags, then ``config.validate``).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from nextstep_jax.config import ConfigError, get_dotted, has_dotted, validate


def _parse_value(raw: str, current: Any) -> Any:
  """Parses a command-line value by the type of the field it replaces."""
  if isinstance(current, bool):
    low = raw.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a bool, got {raw!r}")
  if isinstance(current, str):
    return raw
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def _split_override(item: str) -> tuple[str, str]:
  if "=" not in item:
    raise ConfigError(f"override {item!r} must look like key.sub=value")
  key, raw = item.split("=", 1)
  key = key.strip()
  if key.startswith("--"):
    key = key[2:]
  if key.startswith("config."):
    key = key[len("config."):]
  return key, raw


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | Sequence[str]) -> ml_collections.ConfigDict:
  """Sets dotted keys on `config` in place; returns it.

  `overrides` is {"optim.lr": 1e-3} (values used as given) or ["optim.lr=1e-3", ...] (values
  parsed by the field's type: literals for numbers/tuples, raw text for strings). Every key is
  checked before any is set; an unknown key or a value of the wrong type raises ConfigError
  naming the key.
  """
  if isinstance(overrides, Mapping):
    items = [(k, v, False) for k, v in overrides.items()]
  else:
    items = [(*_split_override(s), True) for s in overrides]
  unknown = []
  for key, _, _ in items:
    if not has_dotted(config, key):
      unknown.append(f"{key!r} ({_unknown_key_hint(config, key, sep='; ')})")
  if unknown:
    raise ConfigError("unknown config keys: " + "; ".join(unknown))
  for key, value, is_text in items:
    parent, _, leaf = key.rpartition(".")
    node = get_dotted(config, parent) if parent else config
    try:
      if is_text:
        value = _parse_value(value, node[leaf])
      node[leaf] = value
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise ConfigError(f"cannot set {key}={value!r}: {e}") from e
  return config


def dotted_keys(config: Any, prefix: str = "") -> list[str]:
  """Every dotted key of `config`: sections and their fields, at every depth ("optim", "optim.lr")."""
  out = []
  for k, v in config.items():
    out.append(prefix + str(k))
    if isinstance(v, (Mapping, ml_collections.ConfigDict)):
      out += dotted_keys(v, f"{prefix}{k}.")
  return out


def _unknown_key_hint(config: Any, key: str, sep: str) -> str:
  """'closest: a.b, a.c<sep>known under a: b, c, d' for a dotted `key` that `config` lacks."""
  parts = key.split(".")
  depth = 0  # the first part of `key` that is missing
  node = config
  while depth < len(parts) and isinstance(node, (Mapping, ml_collections.ConfigDict)) and parts[depth] in node:
    node = node[parts[depth]]
    depth += 1
  parent = ".".join(parts[:depth])
  if not isinstance(node, (Mapping, ml_collections.ConfigDict)):
    return f"{parent} is a value ({type(node).__name__}), not a section"
  ancestors = {".".join(parts[:i]) for i in range(1, depth + 1)}
  close = difflib.get_close_matches(key, [k for k in dotted_keys(config) if k not in ancestors], n=3,
                                    cutoff=0.6)
  if not close:  # a misspelt leaf with a long section name: compare the leaves of its section
    close = [f"{parent}.{k}" if parent else k
             for k in difflib.get_close_matches(parts[depth], [str(k) for k in node.keys()], n=3, cutoff=0.5)]
  known = ", ".join(sorted(str(k) for k in node.keys()))
  return (f"closest: {', '.join(close)}{sep}" if close else "") + f"known under {parent or 'the top level'}: {known}"


def unknown_key_message(config: Any, key: str) -> str:
  """'unknown config key optim.foo; closest: optim.eps, optim.lr (known under optim: b1, ...)': the
  message of an override naming a key `config` lacks (``apply_overrides`` and ``nextstep_jax/cli.py``)."""
  hint = _unknown_key_hint(config, key, sep=" (")
  return f"unknown config key {key}; " + hint + (")" if " (known under" in hint else "")


def _load_module(target: str | types.ModuleType) -> types.ModuleType:
  if isinstance(target, types.ModuleType):
    return target
  if target.endswith(".py") or os.sep in target or "/" in target:
    if not os.path.isfile(target):
      raise ConfigError(f"config file {target!r} does not exist")
    name = "_nextstep_config_" + os.path.splitext(os.path.basename(target))[0]
    spec = importlib.util.spec_from_file_location(name, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  return importlib.import_module(target)


def load_config(path_or_module: str | types.ModuleType, overrides: Sequence[str] | Mapping[str, Any] = (),
                num_devices: int | None = None, check: bool = True) -> ml_collections.ConfigDict:
  """Builds ``get_config()`` of a config file/module, applies overrides, validates.

  `path_or_module`: "configs/demo.py", "configs.demo", a module, or any of these with
  ":arg" appended (passed to ``get_config(arg)`` as ml_collections.config_flags does).
  """
  arg = None
  if isinstance(path_or_module, str) and ":" in path_or_module:
    path_or_module, arg = path_or_module.split(":", 1)
  module = _load_module(path_or_module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{getattr(module, '__file__', module)} has no get_config()")
  config = module.get_config() if arg is None else module.get_config(arg)
  apply_overrides(config, overrides)
  if check:  # a loaded config is checked as a config; its input paths are checked when a run starts
    validate(config, num_devices=num_devices, paths=False)
  return config
