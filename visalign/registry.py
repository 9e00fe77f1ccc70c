"""Generic registries: a decorator, a lazy built-in table and errors that list what exists.

Scorers, generator families, objectives, reward transforms and aggregations all use this one pattern
(docs/extending.md#registries). A built-in entry is a ``"module:Object"`` string that is imported only when its id is
first looked up, so ``import visalign`` loads nothing heavy and built-ins never depend on import order.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def import_object(path: str) -> object:
    """Import ``"package.module:Name"`` (or ``"package.module.Name"``) and return the object.

    Raises:
        ImportError: naming the path when the module or the attribute does not exist.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"{path!r} is not an import path; write it as 'package.module:Name'.")
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"Module {module_name!r} has no attribute {attr!r} (from {path!r}).")
        obj = getattr(obj, part)
    return obj


def is_import_path(name: str) -> bool:
    """True for ``"pkg.mod:Name"`` strings, the form accepted everywhere an id is."""
    module_name, sep, attr = name.partition(":")
    return bool(sep and module_name and attr and " " not in name)


class UnknownIdError(KeyError):
    """Raised for an id no registry knows; its text lists close matches and every known id."""

    def __str__(self) -> str:  # KeyError would repr() the message and show it in quotes
        return str(self.args[0]) if self.args else ""


def unknown_id_message(kind: str, name: str, known: Iterable[str], extra: str = "") -> str:
    """One error text for every registry: close matches, every known id, the other accepted forms."""
    known = sorted(known)
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return f"Unknown {kind} {name!r}.{hint} Known: {', '.join(known) or '(none)'}.{extra}"


class Registry(Generic[T]):
    """An id → object table with lazily imported built-ins.

    Args:
        kind: what the entries are, used in error messages ("scorer", "objective", ...).
        builtin: id → ``"module:Object"``; imported on first lookup.
    """

    def __init__(self, kind: str, builtin: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._builtin: dict[str, str] = dict(builtin or {})
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: bind ``name`` to the decorated object. Rebinding to a different object raises."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        current = self._entries.get(name)
        if current is not None and current is not obj and _qualname(current) != _qualname(obj):
            raise ValueError(f"{self.kind} id {name!r} is already bound to {_qualname(current)}; pick another id.")
        if current is None and name in self._builtin and self._builtin[name] != _qualname(obj):
            raise ValueError(f"{self.kind} id {name!r} is a built-in ({self._builtin[name]}); pick another id.")
        self._entries[name] = obj

    def add_builtin(self, name: str, path: str) -> None:
        if name in self._builtin and self._builtin[name] != path:
            raise ValueError(f"{self.kind} id {name!r} is already bound to {self._builtin[name]}.")
        self._builtin[name] = path

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._builtin

    def list(self) -> list[str]:
        """All ids, built-in and registered, sorted."""
        return sorted(set(self._entries) | set(self._builtin))

    def get(self, name: str) -> T:
        """Look up by id or by ``"module:Name"`` import path."""
        if name in self._entries:
            return self._entries[name]
        if name in self._builtin:
            obj = import_object(self._builtin[name])
            self._entries[name] = obj  # type: ignore[assignment]
            return obj  # type: ignore[return-value]
        if is_import_path(name):
            return import_object(name)  # type: ignore[return-value]
        extra = " Or pass an import path 'pkg.module:Name'."
        raise UnknownIdError(unknown_id_message(self.kind, name, self.list(), extra))

    def build(self, spec: Any, base: type, default: type) -> Any:
        """An instance from a recipe entry: an id (``"rank"``), a mapping ``{kind: id, **params}``, an instance of
        ``base`` (returned as is) or None (``default()``). Bad parameters raise ``ValueError`` naming the kind."""
        if spec is None:
            return default()
        if isinstance(spec, base):
            return spec
        if isinstance(spec, str):
            kind, params = spec, {}
        elif isinstance(spec, dict):
            params = dict(spec)
            kind = params.pop("kind", None)
            if not isinstance(kind, str):
                raise ValueError(f"A {self.kind} mapping needs a 'kind' (one of {self.list()}); got {spec!r}.")
        else:
            raise TypeError(f"Cannot build a {self.kind} from {spec!r}: pass an id, a mapping or a {base.__name__}.")
        cls = self.get(kind)
        try:
            return cls(**params)  # type: ignore[operator]
        except TypeError as err:
            raise ValueError(f"Bad parameters {params} for {self.kind} {kind!r}: {err}") from None


def _qualname(obj: object) -> str:
    module = getattr(obj, "__module__", type(obj).__module__)
    name = getattr(obj, "__qualname__", type(obj).__qualname__)
    return f"{module}:{name}"
