"""Who may do what: API keys on inference, the admin key on registration and the admin views."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from fdcore.config import AuthConfig, load_router_config
from fdcore.errors import StartupError
from fdcore.router.app import create_app
from fdcore.router.auth import Access, Guard, Keys
from fdcore.testing.cluster import BackendFactory
from tests.router.conftest import Router, RouterFactory, wait_until

COMPLETION = {"model": "test-model", "prompt": "hi"}
ADMIN_CALLS: list[tuple[str, str, Any]] = [
    ("GET", "/registered", None),
    ("GET", "/registered_number", None),
    ("GET", "/health_generate", None),
    ("POST", "/v1/abort_requests", {"abort_all": True}),
    ("POST", "/v1/abort_requests", {"req_ids": ["nobody"]}),
    ("POST", "/deregister", {"host_ip": "127.0.0.1", "port": 1}),
]


async def call(
    r: Router, method: str, path: str, body: Any = None, key: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """One request with an optional Bearer key; status, decoded JSON (or text) and headers."""
    sent = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    async with aiohttp.ClientSession() as s, s.request(
        method, r.url + path, json=body, headers=sent, allow_redirects=False
    ) as resp:
        json_body = resp.content_type == "application/json"
        decoded = await resp.json() if json_body else await resp.text()
        return resp.status, decoded, {k.lower(): v for k, v in resp.headers.items()}


def assert_denied(answer: tuple[int, Any, dict[str, str]], status: int = 401) -> None:
    """An OpenAI-shaped refusal; a 401 names the Bearer scheme."""
    got, body, headers = answer
    assert got == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("authentication_error" if status == 401 else "permission_error")
    assert error["code"] == str(status)  # a string code, as OpenAI sends (issue 9)
    if status == 401:
        assert headers["www-authenticate"] == "Bearer"


async def test_without_keys_everything_is_open_and_the_start_up_warns(
    backends: BackendFactory, router: RouterFactory
) -> None:
    (backend,) = backends(1)
    r = router()
    assert (await call(r, "POST", "/register", backend.payload()))[0] == 200
    assert (await call(r, "POST", "/v1/completions", COMPLETION))[0] == 200
    assert (await call(r, "GET", "/registered"))[0] == 200
    assert "no API or admin key configured: run only on a trusted network" in r.proc.output()


async def test_api_keys_guard_inference_and_open_the_admin_endpoints_without_an_admin_key(
    backends: BackendFactory, router: RouterFactory
) -> None:
    (backend,) = backends(1)
    r = router([backend], auth={"api-keys": ["key-one", "key-two"]})
    await _wait_registered(r, "key-one")
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_denied(await call(r, "POST", path, COMPLETION))
        assert_denied(await call(r, "POST", path, COMPLETION, key="key-three"))
    assert_denied(await call(r, "GET", "/v1/models"))
    assert_denied(await call(r, "POST", "/v1/completions", COMPLETION,
                             headers={"Authorization": "Basic key-one"}))
    assert (await call(r, "POST", "/v1/completions", COMPLETION, key="key-two"))[0] == 200
    assert (await call(r, "GET", "/v1/models", key="key-one"))[0] == 200
    # Without an admin key the API keys guard the admin endpoints too: none is anonymous.
    for method, path, body in ADMIN_CALLS:
        assert_denied(await call(r, method, path, body))
    assert_denied(await call(r, "POST", "/register", backend.payload()))
    assert (await call(r, "POST", "/register", backend.payload(), key="key-one"))[0] == 200
    # Abort by id is a client's; abort-all needs the admin key, which is not configured here.
    status, body = (await call(r, "POST", "/v1/abort_requests", {"req_ids": ["x"]},
                               key="key-one"))[:2]
    assert status == 200, body
    status, body = (await call(r, "POST", "/v1/abort_requests", {"abort_all": True},
                               key="key-one"))[:2]
    assert status == 403 and "admin key" in body["error"]["message"], body
    # Probes and Prometheus stay open.
    assert (await call(r, "GET", "/health"))[0] == 200
    assert (await call(r, "GET", "/metrics"))[0] == 200
    assert "no API or admin key configured" not in r.proc.output()


async def test_the_openai_client_sends_its_api_key(backends: BackendFactory, router: RouterFactory) -> None:
    (backend,) = backends(1)
    r = router([backend], auth={"api-keys": ["sk-test"]})
    await _wait_registered(r, "sk-test")
    client = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="sk-test", max_retries=0)
    wrong = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="sk-wrong", max_retries=0)
    try:
        completion = await client.completions.create(model="test-model", prompt="Say hello")
        assert completion.choices[0].text == "hello from b0"
        stream = await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert [c.choices[0].delta.content async for c in stream] == ["b0-0 ", "b0-1 ", "b0-2 "]
        assert "test-model" in [m.id for m in (await client.models.list()).data]
        with pytest.raises(openai.AuthenticationError, match="invalid key"):
            await wrong.completions.create(model="test-model", prompt="Say hello")
    finally:
        await client.close()
        await wrong.close()
    # The router's key stays with the router: no instance ever sees it.
    seen = (await backend.state())["requests"]
    assert seen and all("authorization" not in r["headers"] for r in seen.values())


async def test_the_admin_key_guards_admin_endpoints_and_inference_stays_open(
    backends: BackendFactory, router: RouterFactory
) -> None:
    a, b = backends(2)
    r = router([a], auth={"admin-key": "admin-secret"})
    await _wait_registered(r, "admin-secret")
    assert (await call(r, "POST", "/v1/completions", COMPLETION))[0] == 200
    assert (await call(r, "GET", "/v1/models"))[0] == 200
    for method, path, body in ADMIN_CALLS:
        assert_denied(await call(r, method, path, body))
        assert_denied(await call(r, method, path, body, key="not-the-admin-key"))
        assert (await call(r, method, path, body, key="admin-secret"))[0] in (200, 404, 503)
    assert_denied(await call(r, "POST", "/register", b.payload()))
    assert (await call(r, "POST", "/register", b.payload(), key="admin-secret"))[0] == 200
    # X-Admin-Key is the other documented place for the admin key.
    assert (await call(r, "GET", "/registered_number",
                       headers={"X-Admin-Key": "admin-secret"}))[1] == {
        "mixed": 2, "prefill": 0, "decode": 0}
    assert (await call(r, "GET", "/health"))[0] == 200
    assert (await call(r, "GET", "/metrics"))[0] == 200


async def test_an_api_key_is_not_the_admin_key(backends: BackendFactory, router: RouterFactory) -> None:
    (backend,) = backends(1)
    r = router([backend], auth={"api-keys": ["client"], "admin-key": "admin"})
    await _wait_registered(r, "admin")
    assert_denied(await call(r, "POST", "/v1/abort_requests", {"abort_all": True}, key="client"),
                  403)
    assert_denied(await call(r, "POST", "/register", backend.payload(), key="client"), 403)
    # The admin key is also good for inference.
    assert (await call(r, "POST", "/v1/completions", COMPLETION, key="admin"))[0] == 200


async def test_keys_from_environment_variables_are_taken_verbatim(
    backends: BackendFactory, router: RouterFactory
) -> None:
    (backend,) = backends(1)
    r = router([backend], env={"FDCORE_AUTH_API_KEYS": "k1,0123",
                               "FDCORE_AUTH_ADMIN_KEY": "0x1F"})
    await _wait_registered(r, "0x1F")
    assert (await call(r, "POST", "/v1/completions", COMPLETION, key="0123"))[0] == 200
    assert_denied(await call(r, "POST", "/v1/completions", COMPLETION, key="83"))
    assert (await call(r, "GET", "/registered", key="0x1F"))[0] == 200


def test_keys_from_env_references_and_bad_keys(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("auth:\n  api-keys: [$env:CLIENT_KEY]\n  admin-key: $env:ADMIN_KEY\n")
    monkeypatch.setenv("CLIENT_KEY", "from-env")
    monkeypatch.setenv("ADMIN_KEY", "admin-from-env")
    auth = load_router_config(path, environ={}).auth
    assert (auth.api_keys, auth.admin_key) == (["from-env"], "admin-from-env")
    path.write_text("auth:\n  api-keys: ['two words', '']\n  admin-kee: x\n")
    with pytest.raises(StartupError) as exc:
        load_router_config(path, environ={})
    lines = str(exc.value).splitlines()
    assert f"{path}: auth.api-keys.0: a key cannot contain spaces" in lines
    assert any(line.startswith(f"{path}: auth.api-keys.1: ") for line in lines)
    assert f"{path}: auth.admin-kee: unknown key" in lines


def test_every_configured_key_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = Keys(AuthConfig(api_keys=["first", "second", "third"], admin_key="admin"))
    assert keys.allows(Access.CLIENT, [(b"authorization", b"Bearer first")])
    # A match on the first key still compares the rest: the time does not tell which matched.
    assert compared == [b"first", b"second", b"third", b"admin"]


def test_without_api_keys_the_fast_path_is_not_wrapped() -> None:
    app = create_app(load_router_config(None, environ={}))
    assert not any(isinstance(endpoint, Guard) for endpoint in app.fast.values())
    admin_only = create_app(load_router_config(None, environ={"FDCORE_AUTH_ADMIN_KEY": "k"}))
    assert not any(isinstance(endpoint, Guard) for endpoint in admin_only.fast.values())
    guarded = create_app(load_router_config(None, environ={"FDCORE_AUTH_API_KEYS": "k"}))
    assert all(isinstance(endpoint, Guard) for endpoint in guarded.fast.values())


async def _wait_registered(r: Router, key: str) -> None:
    async def healthy() -> bool:
        _, body, _ = await call(r, "GET", "/registered", key=key)
        return any(w["healthy"] for role in ("mixed", "prefill", "decode") for w in body[role])

    await wait_until(healthy)
