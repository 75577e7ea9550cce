"""schemathesis over HTTP: the cases for one operation of a server's published document, and
the checks every answer must pass."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from schemathesis import BaseSchema, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette
from starlette.routing import Route

# Per operation: a dozen positive and negative cases each; two servers' dozen-odd operations
# then take a few seconds of the folder's budget.
OPENAPI_SETTINGS = settings(max_examples=24, deadline=None, derandomize=True,
                            suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.filter_too_much])


def operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    """Every ``(METHOD, path)`` an OpenAPI document lists."""
    return sorted((method.upper(), path) for path, item in document["paths"].items()
                  for method in item)


def app_operations(app: Starlette) -> list[tuple[str, str]]:
    """Every ``(METHOD, path)`` a Starlette app routes (HEAD, which GET implies, aside)."""
    return sorted((method, route.path) for route in app.routes if isinstance(route, Route)
                  for method in route.methods or () if method != "HEAD")


def openapi_cases(schema: BaseSchema, method: str, path: str) -> SearchStrategy[schemathesis.Case]:
    """Positive and negative schemathesis cases for one operation."""
    operation = schema[path][method]
    return st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                     operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))


# Under 500, and the status, content type and body as the server's own document says.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def call_and_check(case: schemathesis.Case) -> None:
    """Send a schemathesis case: it must be answered (a dropped connection raises), pass
    :data:`CHECKS`, and a 4xx must carry a JSON error body."""
    response = case.call(timeout=30)
    case.validate_response(response, checks=CHECKS)
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], response.text[:500]


def fuzz_operation(schema: BaseSchema, method: str, path: str) -> None:
    """Run :data:`OPENAPI_SETTINGS`' cases of one operation through :func:`call_and_check`."""
    sent = []

    @given(case=openapi_cases(schema, method, path))
    @OPENAPI_SETTINGS
    def run(case: schemathesis.Case) -> None:
        sent.append(case)
        call_and_check(case)

    run()
    assert sent
