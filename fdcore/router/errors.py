"""JSON error bodies: every failure a client sees is a status code plus an explanation."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class ClientError(Exception):
    """A request the router refuses; becomes ``status`` with an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param


def error_body(status: int, message: str, type_: str, param: str | None = None) -> bytes:
    """OpenAI's error shape, which the official clients parse."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": status}}
    )


def error_response(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A JSON error response."""
    return Response(
        error_body(status, message, type_, param), status_code=status,
        media_type="application/json", headers=headers,
    )


def json_response(data: Any, status: int = 200) -> Response:
    """A JSON response serialised with orjson."""
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")
