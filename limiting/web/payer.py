"""Who pays with the user's plan: ``@limiter.plan(...)`` and, for reusable blueprints,
``limiting.plan(...)`` — one decorator, named so that it cannot be mistaken for
Flask-Limiter's ``limit("5/minute")`` (a rate; this names a payer).

A view is charged in one of two ways, and says which:

- ``plan(user=lambda: ...)``: the decorator charges ``user()`` before the view runs;
- ``plan(user_from=...)`` (or bare ``plan()``): the view charges itself, after reading its body
  (``current_limiter().acquire(...)`` or ``.reserve(...)``), and declares where its user comes
  from: ``"key"`` (the API key it reads), a JSON body field's name (an anonymous caller's id),
  or both. From that declaration each worker may refuse a caller it has just refused before
  Flask runs (door.py); nothing else needs writing.

Either way the view's edge check rides in its acquire/reserve call (one store call).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

from flask import Flask, Response, current_app
from werkzeug.datastructures import Headers

from ..core.decision import Decision
from ..keys import presented_key
from .door import Early, mark_early, no_key
from .edge import mark_limited
from .operated import EXTENSION_KEY

F = TypeVar("F", bound=Callable[..., Any])
KEY = "key"   # in ``user_from``: the API key's user (any other name: a JSON body field)
UserFrom = str | tuple[str, ...]
KeyReader = Callable[[Headers], str | None]
Render = Callable[[Decision], Response]


class Charges(Protocol):
    """What the decorator uses of a RateLimiter (the extension imports this module)."""

    def acquire(self, user: str) -> Decision: ...


def declare(limiter: Callable[[], Charges], *, user: Callable[[], str] | None = None,
            user_from: UserFrom | None = None, key_setting: str | None = None,
            read_key: KeyReader | None = None, render: Render | None = None
            ) -> Callable[[F], F]:
    """The decorator ``RateLimiter.plan`` and ``plan`` return (``limiter``: the one that
    charges ``user()``); the arguments are checked here, when the module is imported. All
    are keywords: a bare ``@plan`` (no call) fails there too instead of registering a wrapper."""
    if user is not None and user_from is not None:
        raise TypeError("plan(): user= (the decorator charges) or user_from= (the view "
                        "charges itself), not both")
    early = _early(user_from, key_setting, read_key, render)

    def decorator(view: F) -> F:
        target = view
        if user is not None:
            @functools.wraps(view)
            def charged(*args: Any, **kwargs: Any) -> Any:
                limiter().acquire(user())
                return view(*args, **kwargs)

            target = cast(F, charged)
        if early is not None:
            mark_early(target, early)
        return cast(F, mark_limited(target))

    return decorator


def plan(*, user: Callable[[], str] | None = None, user_from: UserFrom | None = None,
         key_setting: str | None = None, read_key: KeyReader | None = None,
         render: Render | None = None) -> Callable[[F], F]:
    """Charge a view to the user's plan (bucket, quotas, LLM units) on the running app's
    limiter — ``@limiter.plan(...)`` for a blueprint that imports no limiter instance.

    ``user``: who pays, called inside the request; the decorator charges them before the view.
    Without it the view charges itself (``current_limiter().acquire``/``.reserve``) and
    ``user_from`` declares where that user comes from: ``"key"`` (the API key the view reads;
    ``read_key(headers)`` says how, default ``Authorization: Bearer`` else ``X-API-Key``), a
    JSON body field's name (an anonymous caller, charged with ``anonymous=True``), or a tuple of
    both. ``key_setting``: the ``app.config`` flag under which the view reads the key at all
    (unset: always). ``render``: the view's response to a refused Decision (default: the
    limiter's JSON 429). With ``user_from`` each worker answers a caller it has just refused
    before Flask runs; a view that picks its user any other way must not declare it.
    """
    return declare(_app_limiter, user=user, user_from=user_from, key_setting=key_setting,
                   read_key=read_key, render=render)


def _app_limiter() -> Charges:
    return cast(Charges, current_app.extensions[EXTENSION_KEY])


def _early(user_from: UserFrom | None, key_setting: str | None, read_key: KeyReader | None,
           render: Render | None) -> Early | None:
    """What the door answers from, built from the declaration (None: nothing declared)."""
    if user_from is None:
        if key_setting is not None or read_key is not None or render is not None:
            raise TypeError("plan(): key_setting, read_key and render describe user_from=")
        return None
    sources = (user_from,) if isinstance(user_from, str) else tuple(user_from)
    fields = [name for name in sources if name != KEY]
    if not sources or len(set(sources)) != len(sources) or len(fields) > 1 \
            or not all(isinstance(name, str) and name for name in sources):
        raise ValueError(f"plan(user_from={user_from!r}): 'key', one body field, or both")
    by_key = KEY in sources
    if not by_key and (key_setting is not None or read_key is not None):
        raise TypeError("plan(): key_setting and read_key need 'key' in user_from")
    return Early(body_user=fields[0] if fields else None,
                 key=(read_key or presented_key) if by_key else no_key,
                 render=render,
                 uses_key=None if key_setting is None else _setting_on(key_setting))


def _setting_on(name: str) -> Callable[[Flask], bool]:
    def on(app: Flask) -> bool:
        return bool(app.config.get(name))
    return on

