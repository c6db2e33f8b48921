"""Every method by name: the built-in records and any registered later.

Adding a method is one module with its `base.Method` record and one entry in
`_BUILTIN` (or, from outside the package, one `register(record)` call).
"""

from __future__ import annotations

from lsmtl_jax.methods import base
from lsmtl_jax.methods import deep_lsmtl
from lsmtl_jax.methods import knn
from lsmtl_jax.methods import linear
from lsmtl_jax.methods import mtl
from lsmtl_jax.methods import semigan

_BUILTIN = (*deep_lsmtl.METHODS, *linear.METHODS, *knn.METHODS, *semigan.METHODS,
            *mtl.METHODS)
_REGISTRY: dict[str, base.Method] = {m.name: m for m in _BUILTIN}
REFERENCE = deep_lsmtl.DEEP_LSMTL.name  # the method the comparisons are made against


class UnknownMethodError(KeyError):
  pass


def register(method: base.Method) -> base.Method:
  """Adds `method`; a name already taken by another record is refused."""
  if _REGISTRY.get(method.name, method) is not method:
    raise ValueError(f"method {method.name!r} is already registered")
  _REGISTRY[method.name] = method
  return method


def unregister(name: str) -> None:
  if any(m.name == name for m in _BUILTIN):
    raise ValueError(f"method {name!r} is built in")
  _REGISTRY.pop(name, None)


def get(name: str) -> base.Method:
  try:
    return _REGISTRY[name]
  except KeyError:
    raise UnknownMethodError(
        f"method must be one of {sorted(_REGISTRY)}, got {name!r}") from None


def names() -> list[str]:
  return list(_REGISTRY)


def network_names() -> list[str]:
  return [name for name, m in _REGISTRY.items() if m.is_network]


def label(name: str) -> str:
  return _REGISTRY[name].label if name in _REGISTRY else name


def sections() -> dict[str, dict]:
  """{section: defaults} of every method that owns a config section."""
  return {m.section: dict(m.defaults) for m in _REGISTRY.values() if m.section}
