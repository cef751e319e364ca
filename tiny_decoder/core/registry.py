"""A tiny name -> class registry, one per swappable part (model parts, losses, tasks, pruning methods, ...).

Configs name parts by plain strings (``attention: {name: sdpa}``) so they stay serialisable YAML and a
checkpoint's hyper-parameters rebuild the exact model; each part's registry resolves the name in one place
and turns a typo into an error that lists the valid choices and the config group that sets them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic

from typing_extensions import TypeVar

from tiny_decoder.core.errors import ConfigError

# what a registry holds: any factory by default; a part whose entries are used beyond being called (a class's
# ``check``, a placement's ``uses_norm``) names their type, e.g. ``Registry[type[Placement]]``
F = TypeVar("F", bound=Callable[..., Any], default=Callable[..., Any])


class Registry(Generic[F]):
    """Maps names to factories for one model part (e.g. ``attention``)."""

    def __init__(self, field: str, group: str | None = None, supplied: tuple[str, ...] = ()):
        self.field = field  # dotted config field, e.g. "model.attention.name"
        self.group = group  # Hydra config group that selects it, e.g. "attention"
        self.supplied = supplied  # arguments the model passes itself; not user options
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(factory: F) -> F:
            if name in self._entries:
                raise KeyError(f"{self.field}: '{name}' registered twice")
            self._entries[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return list(self._entries)

    def name_of(self, factory: Callable[..., Any]) -> str:
        """The name ``factory`` is registered under (a subclass of a registered class: its nearest base's)."""
        for name, entry in self._entries.items():
            if entry is factory:
                return name
        bases = [name for name, entry in self._entries.items() if isinstance(factory, type) and isinstance(entry, type)
                 and issubclass(factory, entry)]  # fmt: skip
        if not bases:
            raise KeyError(f"{self.field}: {getattr(factory, '__name__', factory)!r} is not registered")
        return bases[0]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> F:
        if name not in self._entries:
            hint = f" (choose with {self.group}=<name>)" if self.group else ""
            raise ConfigError(f"{self.field}='{name}' is unknown; choose one of: {', '.join(self.names())}{hint}")
        return self._entries[name]

    def check_options(self, name: str, options: Mapping[str, Any]) -> None:
        """Fail if ``options`` holds a keyword the factory for ``name`` does not take."""
        params = inspect.signature(self.get(name)).parameters
        allowed = [p for p in params if p not in self.supplied and p != "self"]
        prefix = self.field.rsplit(".", 1)[0]
        for key in options:
            if key not in allowed:
                raise ConfigError(
                    f"{prefix}.{key} is not an option of {self.field}='{name}'; its options are: "
                    f"{', '.join(allowed) or 'none'}"
                )

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)
