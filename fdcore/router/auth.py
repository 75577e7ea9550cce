"""Who may call what: client API keys on the inference endpoints, the admin key on the rest.

A path needs one of two kinds of access:

* ``CLIENT`` (inference): any API key, or the admin key, once API keys are configured;
* ``ADMIN`` (registration, registry views, abort): the admin key once one is configured; with
  only API keys configured, any API key (so no key setting leaves them anonymous).

Keys travel as ``Authorization: Bearer <key>`` (what OpenAI clients and engines send); the
admin key may instead come in ``X-Admin-Key``. Paths without a rule (``/health``,
``/metrics``) stay open for probes and Prometheus.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Iterable, Mapping

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from fdcore.config import AuthConfig
from fdcore.http import error_response

log = structlog.get_logger("fdcore.router")
Headers = Iterable[tuple[bytes, bytes]]
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class Access(enum.Enum):
    """What a path needs."""

    CLIENT = "client"
    ADMIN = "admin"


def _matches(token: bytes, keys: tuple[bytes, ...]) -> bool:
    # Every key is compared, so the time taken says nothing about which one nearly matched.
    hit = False
    for key in keys:
        hit |= hmac.compare_digest(token, key)
    return hit


def _tokens(headers: Headers) -> list[bytes]:
    found = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                found.append(token.strip())
        elif name == b"x-admin-key" and value.strip():
            found.append(value.strip())
    return found


class Keys:
    """The configured keys and the check of a request's headers against them."""

    def __init__(self, config: AuthConfig) -> None:
        self.api = tuple(key.encode() for key in config.api_keys)
        self.admin = (config.admin_key.encode(),) if config.admin_key else ()
        self._accepted = {
            Access.CLIENT: self.api + self.admin if self.api else (),
            Access.ADMIN: self.admin or self.api,
        }

    @property
    def configured(self) -> bool:
        """Whether any key is set (otherwise every endpoint is open)."""
        return bool(self.api or self.admin)

    def required(self, access: Access) -> bool:
        """Whether paths of ``access`` need a key at all."""
        return bool(self._accepted[access])

    def allows(self, access: Access, headers: Headers) -> bool:
        """Whether a request with ``headers`` may use a path of ``access``."""
        accepted = self._accepted[access]
        return not accepted or any(_matches(t, accepted) for t in _tokens(headers))

    def is_admin(self, headers: Headers) -> bool:
        """Whether ``headers`` carry the configured admin key (False when none is set)."""
        return bool(self.admin) and any(_matches(t, self.admin) for t in _tokens(headers))

    def warn_if_open(self) -> None:
        """Log at start-up that a router without keys belongs on a trusted network."""
        if not self.configured:
            log.warning("no API or admin key configured: run only on a trusted network")

    def denial(self, access: Access, headers: Headers) -> tuple[int, str, str]:
        """``(status, message, type)`` for a request :meth:`allows` refused."""
        tokens = _tokens(headers)
        if access is Access.ADMIN and self.admin and any(_matches(t, self.api) for t in tokens):
            return 403, "this endpoint needs the admin key", "permission_error"
        what = "the admin key" if access is Access.ADMIN and self.admin else "an API key"
        if tokens:
            message = f"invalid key: this endpoint needs {what}"
        else:
            message = f"missing key: send {what} as Authorization: Bearer <key>"
        return 401, message, "authentication_error"


class Guard:
    """ASGI middleware: a request to a path in ``rules`` needs the key of its access, or it
    gets a 401 (403 for an API key on an admin path) in OpenAI's error shape."""

    def __init__(self, app: ASGIApp, keys: Keys, rules: Mapping[str, Access]) -> None:
        self.app = app
        self.keys = keys
        self.rules = {path: access for path, access in rules.items() if keys.required(access)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            access = self.rules.get(scope["path"])
            if access is not None and not self.keys.allows(access, scope["headers"]):
                status, message, type_ = self.keys.denial(access, scope["headers"])
                response = error_response(
                    status, message, type_, headers=_CHALLENGE if status == 401 else None
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
