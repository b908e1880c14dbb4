"""Request bodies checked before any limit is charged: bad input costs the caller nothing."""

from __future__ import annotations

import json
from typing import Any

from flask import request
from werkzeug.exceptions import BadRequest

from limiting.core.naming import MAX_USER_ID_LENGTH


def json_object() -> dict[str, Any]:
    """The body as a JSON object, whatever Content-Type claims; else 400."""
    data = request.get_data(cache=True)
    if not data:
        raise BadRequest("The request body must be a JSON object.")
    try:
        # NaN and Infinity are not JSON (RFC 8259); Python reads them, and the SDKs would
        # then fail to send the body on, after the call was reserved.
        body = json.loads(data, parse_constant=_not_json)
    except (ValueError, RecursionError):   # RecursionError: nesting deeper than Python parses
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def string_field(body: dict[str, Any], name: str, *, required: bool = False,
                 max_length: int | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required.")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string, got {_json_type(value)}.")
    if required and not value.strip():
        raise BadRequest(f"'{name}' must not be empty.")
    if max_length is not None and len(value) > max_length:
        raise BadRequest(f"'{name}' is longer than {max_length} characters.")
    return value


def user_id_field(body: dict[str, Any]) -> str:
    value = string_field(body, "user_id", required=True, max_length=MAX_USER_ID_LENGTH)
    assert value is not None
    return value


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)
