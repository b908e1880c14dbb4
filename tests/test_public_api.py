"""The public API: a short list in ``limiting.__all__``, each name documented, and one decorator,
``plan``, whose declaration is all the door (limiting/web/door.py) needs to know."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask
from werkzeug.datastructures import Headers

import limiting
from limiting.web.context import LIMITED_ROUTE
from limiting.web.door import early_of


def test_the_public_names_are_few_and_each_says_what_it_is_for() -> None:
    assert len(limiting.__all__) <= 20
    assert set(limiting.__all__) == set(limiting._EXPORTS)
    for name in limiting.__all__:
        doc = getattr(limiting, name).__doc__ or ""
        # A dataclass without one gets its signature as __doc__: that says nothing.
        assert doc.strip() and not doc.startswith(f"{name}("), name


def test_a_name_not_advertised_is_imported_from_its_module() -> None:
    for gone in ("Early", "limited", "limited_route", "KeyRecord", "Plan"):
        with pytest.raises(AttributeError):
            getattr(limiting, gone)
    from limiting.core.policy import Plan
    from limiting.keys import KeyRecord
    assert Plan.__module__ == "limiting.core.policy" and KeyRecord.__module__ == "limiting.keys"


def _view() -> str:
    return "ok"


KEYED = Headers({"Authorization": "Bearer sk-1", "X-API-Key": "sk-2"})


def test_a_view_that_charges_itself_declares_where_its_user_comes_from() -> None:
    by_body = early_of(limiting.plan(user_from="user_id")(_copy()))
    assert by_body is not None and by_body.body_user == "user_id"
    assert by_body.key(KEYED) is None            # a body user's view never reads a key
    by_key = early_of(limiting.plan(user_from="key")(_copy()))
    assert by_key is not None and by_key.body_user is None and by_key.key(KEYED) == "sk-1"
    both = early_of(limiting.plan(user_from=("key", "user_id"),
                                  key_setting="REQUIRE_API_KEY")(_copy()))
    assert both is not None and both.body_user == "user_id" and both.uses_key is not None
    app = Flask(__name__)
    assert not both.uses_key(app)
    app.config["REQUIRE_API_KEY"] = True
    assert both.uses_key(app)
    own = early_of(limiting.plan(user_from="key", read_key=lambda h: h.get("X-API-Key"))
                   (_copy()))
    assert own is not None and own.key(KEYED) == "sk-2"


def test_a_view_without_a_declaration_gets_no_early_refusal() -> None:
    bare = limiting.plan()(_copy())
    assert getattr(bare, LIMITED_ROUTE) and early_of(bare) is None
    charged = limiting.plan(user=lambda: "ann")(_copy())
    assert getattr(charged, LIMITED_ROUTE) and early_of(charged) is None


@pytest.mark.parametrize("kwargs, error", [
    ({"user": lambda: "ann", "user_from": "key"}, TypeError),
    ({"render": lambda decision: None}, TypeError),
    ({"key_setting": "REQUIRE_API_KEY"}, TypeError),
    ({"user_from": "user_id", "read_key": lambda h: None}, TypeError),
    ({"user_from": ("user_id", "name")}, ValueError),
    ({"user_from": ("key", "key")}, ValueError),
    ({"user_from": ""}, ValueError),
    ({"user_from": ()}, ValueError),
])
def test_a_declaration_that_cannot_be_meant_fails_at_import(kwargs: dict[str, object],
                                                           error: type[Exception]) -> None:
    with pytest.raises(error):
        limiting.plan(**kwargs)  # type: ignore[arg-type]


def test_a_bare_plan_is_refused_rather_than_registering_its_wrapper() -> None:
    with pytest.raises(TypeError):
        limiting.plan(_copy())  # type: ignore[call-arg]   # @plan without the call


def _copy() -> Callable[[], str]:
    """A fresh view function each time (the decorator marks what it is given)."""
    def view() -> str:
        return _view()
    return view
