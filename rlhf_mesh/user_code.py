"""What a spec of user code names: a built-in's name, or `package.module:attribute`."""

from __future__ import annotations

import importlib
from typing import Any


def resolve(spec: str, builtins: dict[str, Any], what: str, form: str) -> Any:
    """The built-in `spec` names, or the attribute of the module it names (None where the module has
    none); `what` and `form` name the spec's kind in the error of a malformed one."""
    if spec in builtins:
        return builtins[spec]
    module, sep, attribute = spec.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"{what} {spec!r}: a built-in ({', '.join(builtins)}) or package.module:{form}")
    return getattr(importlib.import_module(module), attribute, None)
