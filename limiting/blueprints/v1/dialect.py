"""What differs between /v1's provider APIs, as one interface :func:`serve` asks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flask import Response
from werkzeug.datastructures import Headers

from limiting.core.decision import Decision
from limiting.providers import LLMRequest, ProviderAPI
from limiting.providers.llm_calls import Tally, UpstreamStream
from limiting.web.errors import json_response

from .problems import ApiProblem, refused


class Dialect(ABC):
    """How one provider's HTTP API names things: where the key is, which fields a body has,
    how errors and rate-limit headers look, how its stream is relayed. The flow (key → body →
    reservation → upstream → settle) is :func:`serve`'s and the same for every dialect."""

    #: The upstream calls, usage reader and echo of this wire format.
    api: ProviderAPI

    @abstractmethod
    def api_key(self, headers: Headers) -> str | None:
        """The key the request presents, where this API's clients send it."""

    @abstractmethod
    def parse(self, body: Mapping[str, Any], default_max: Callable[[], int]) -> LLMRequest:
        """The body checked (an :class:`ApiProblem` when it is wrong) and read as the neutral
        request; ``default_max`` gives the plan's output limit for a body without one."""

    def end_user(self, body: Mapping[str, Any]) -> tuple[str, Any]:
        """(the field's name, its value as sent) where this API's clients name the end user
        a call is made for (limiting/core/end_users.py); asked only when the key holder's
        plan limits end users. ("", None): the API has no such field."""
        return "", None

    @abstractmethod
    def error_body(self, problem: ApiProblem) -> dict[str, Any]:
        """The problem in this API's JSON error shape."""

    @abstractmethod
    def error_event(self, problem: ApiProblem) -> str:
        """The problem as the SSE event that ends a stream already under way."""

    @abstractmethod
    def provider_headers(self, decision: Decision) -> dict[str, str]:
        """The provider's own rate-limit headers, from our decision."""

    @abstractmethod
    def relay(self, upstream: UpstreamStream, tally: Tally, call: LLMRequest) -> Iterator[str]:
        """The upstream's events as this API's SSE text, reporting usage to ``tally`` and
        marking it complete or failed before the last event goes out."""

    def render(self, problem: ApiProblem) -> Response:
        """The problem as a JSON response with its status and headers."""
        return json_response(problem.status, self.error_body(problem), problem.headers,
                             problem.retry_after)

    def refusal(self, decision: Decision) -> Response:
        """A refused decision as this API's 429 (the door answers with it too: it needs no
        request context)."""
        return self.render(refused(decision, self.provider_headers))
