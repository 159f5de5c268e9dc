"""A small generic registry: register by decorator, discover by importing a package, look up loudly.

Used for mechanisms (and later for benchmark tasks and report sections). Nothing is listed by hand:
every module in the discovered package registers itself on import.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import AttnkitError, UnknownMechanism, did_you_mean

log = logging.getLogger(__name__)
T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, filled by the ``register`` decorator when ``package``'s modules are imported."""

    def __init__(self, what: str, package: str, error: type[AttnkitError] = UnknownMechanism):
        self.what = what  # "mechanism": used in error messages
        self.package = package  # modules of this package register entries on import
        self.error = error
        self._entries: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("softmax")`` on a class or function."""

        def deco(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise AttnkitError(f"{self.what} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return deco

    def discover(self) -> None:
        """Import every module of the package once, so that their decorators run."""
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")

    def get(self, name: str) -> T:
        self.discover()
        self._check_name(name)
        try:
            return self._entries[name]
        except KeyError:
            names = sorted(self._entries)
            raise self.error(
                f"unknown {self.what} {name!r}.{did_you_mean(name, names)} Available: {', '.join(names)}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell wildcard (``"linear*"``), sorted."""
        self.discover()
        self._check_name(pattern)
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def _check_name(self, name: object) -> None:
        """A name that is not a string can match nothing: say so, instead of a KeyError or AttributeError."""
        if not isinstance(name, str):
            raise self.error(
                f"{self.what} name must be a string; got {name!r} ({type(name).__name__})."
                f" Available: {', '.join(sorted(self._entries))}"
            )

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
