"""A model's other names: its ``aliases`` (dated snapshots billed and guarded as it) and its
``fallbacks``, the models served instead when its guard, or a limit counting its tokens or
dollars, would refuse (limiting/executor.py decides; limiting/engine.py charges).

One level: only the asked model's own list is tried, in order; a fallback's own fallbacks
are not followed, so two models may name each other without a loop. A fallback is a model
the policy knows (a name under [models] or an alias), not the model itself, and of the same
provider: a request sent to one provider's API is never answered by another's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from .policy_reader import PolicyError, TableReader

# The built-in model, answered in this process: the demo needs no provider account.
ECHO = "echo"


class Named(Protocol):
    """What these checks read of a model (limiting.core.policy.ModelPolicy)."""

    @property
    def provider(self) -> str: ...
    @property
    def aliases(self) -> tuple[str, ...]: ...
    @property
    def fallbacks(self) -> tuple[str, ...]: ...


def read_fallbacks(r: TableReader) -> tuple[str, ...]:
    """``fallbacks = ["gpt-4o-mini"]``: model names, each once."""
    names = r.get("fallbacks", list, [])
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            r.fail(f"fallbacks[{i}]", f"must be a model name, got {name!r}")
        if name in names[:i]:
            r.fail(f"fallbacks[{i}]", f"{name!r} is listed twice")
    return tuple(names)


def check_fallbacks(source: str, models: Mapping[str, Named],
                    aliases: Mapping[str, str]) -> None:
    """Every fallback names another model the policy knows, of the same provider."""
    for name, model in models.items():
        for i, fallback in enumerate(model.fallbacks):
            where = f'{source}: models."{name}".fallbacks[{i}]'
            target = fallback if fallback in models else aliases.get(fallback)
            if target is None:
                raise PolicyError(f"{where}: {fallback!r} names no model under [models] "
                                  "(a fallback must be priced and guarded like any model)")
            if target == name:
                raise PolicyError(f"{where}: {fallback!r} is this model itself")
            provider = models[target].provider
            if provider != model.provider:
                raise PolicyError(f"{where}: {fallback!r} is served by {provider!r}, this "
                                  f"model by {model.provider!r} (a fallback never leaves the "
                                  "provider)")


def alias_map(source: str, models: Mapping[str, Named]) -> dict[str, str]:
    """alias -> model; an alias naming two things would bill one of them at the other's price."""
    out: dict[str, str] = {}
    for name, model in models.items():
        for i, alias in enumerate(model.aliases):
            where = f'{source}: models."{name}".aliases[{i}]'
            if alias == ECHO:
                raise PolicyError(f"{where}: 'echo' is the built-in model, not an alias")
            if alias in models:
                raise PolicyError(f"{where}: {alias!r} is already a model under [models]")
            if alias in out:
                raise PolicyError(f"{where}: {alias!r} is listed twice "
                                  f'(also under models."{out[alias]}")')
            out[alias] = name
    return out
