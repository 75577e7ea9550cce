"""Non-inference endpoints: registration, registry views, health, models, abort, metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from fdcore.http import (
    APIError,
    error_object,
    error_response,
    json_response,
    parse_json,
    read_body,
)
from fdcore.router.addresses import resolve
from fdcore.router.auth import Keys
from fdcore.router.instances import guarded_changes
from fdcore.router.payload import (
    PayloadError,
    describe,
    instance_url,
    parse_address,
    parse_instance,
)
from fdcore.router.state import RouterState
from fdcore.types import Instance, Role

log = structlog.get_logger("fdcore.router")
_ADMIN_BODY_LIMIT = 1024 * 1024


async def _json_body(request: Request) -> Any:
    return parse_json(await read_body(request.scope, request.receive, _ADMIN_BODY_LIMIT))


def _register_error(error: APIError) -> Response:
    # FastDeploy's shape ({code, msg}) for engines, plus OpenAI's error object.
    body = error_object(error.status, error.message, error.type, error.param, error.code)
    return json_response({"code": error.status, "msg": error.message, **body}, error.status)


async def register(request: Request) -> Response:
    """``POST /register``: add an instance, or refresh it (a heartbeat) if already known."""
    state: RouterState = request.app.state.fdcore
    try:
        instance = parse_instance(await _json_body(request), time.time())
    except APIError as exc:
        return _register_error(exc)
    except PayloadError as exc:
        return _register_error(APIError(400, f"invalid InstanceInfo: {exc}"))
    if state.config.server.splitwise and instance.role is Role.MIXED:
        return _register_error(
            APIError(400, "splitwise mode only supports PREFILL/DECODE instances")
        )
    if not state.config.server.splitwise and instance.role is not Role.MIXED:
        return _register_error(APIError(400, "only MIXED instances are allowed (start the "
                                             "router with --splitwise for prefill/decode)"))
    try:
        addresses = await state.registration.check(instance.host_ip, instance.port)
    except APIError as exc:
        return _register_error(exc)
    known = state.instances.find(instance.url, instance.port, addresses)
    if known is None:
        ok, detail = await state.health.probe(instance)
        if not ok:
            # The probe's detail can carry another server's banner: the log gets it, not the
            # client.
            log.warning("registration refused", instance=instance.url, detail=detail)
            return _register_error(APIError(503, f"service is not healthy: {instance.url}"))
    elif known.healthy and (changed := guarded_changes(known, instance)):
        keys: Keys = request.app.state.auth
        if not keys.is_admin(request.scope["headers"]):
            return _register_error(APIError(
                409, f"{known.url} is registered and healthy: changing {', '.join(changed)} "
                     "needs the admin key (or deregister it first)", "conflict",
            ))
    record, is_new = state.instances.upsert(instance, healthy=True, addresses=addresses)
    if is_new:
        log.info("instance registered", instance=record.url, role=record.role.value)
    elif record.url != instance.url:
        log.debug("alias heartbeat", instance=record.url, alias=instance.url)
    return json_response({"code": 200, "msg": "Register success"})


async def deregister(request: Request) -> Response:
    """``POST /deregister``: forget an instance (engines call it as they stop).

    The body is the register payload, of which ``host_ip`` and ``port`` are read; any alias of
    the instance's host works.
    """
    state: RouterState = request.app.state.fdcore
    try:
        host, port = parse_address(await _json_body(request))
        addresses = await resolve(host)
    except APIError as exc:
        return _register_error(exc)
    except PayloadError as exc:
        return _register_error(APIError(400, f"invalid InstanceInfo: {exc}"))
    url = instance_url(host, port)
    known = state.instances.find(url, port, addresses)
    if known is None:
        return _register_error(APIError(404, f"not registered: {url}", "not_found"))
    state.instances.remove(known.url)
    log.info("instance deregistered", instance=known.url, role=known.role.value)
    return json_response({"code": 200, "msg": "Deregister success"})


async def registered(request: Request) -> Response:
    """``GET /registered``: every instance by role, FastDeploy's shape plus health and load."""
    state: RouterState = request.app.state.fdcore
    result: dict[str, Any] = {"code": 200, "msg": "success"}
    for role in (Role.PREFILL, Role.DECODE, Role.MIXED):
        result[role.value] = [describe(i, state.selector.outliers.status(i.url))
                              for i in state.instances.instances(role)]
    return json_response(result)


async def registered_number(request: Request) -> Response:
    """``GET /registered_number``: how many instances of each role."""
    state: RouterState = request.app.state.fdcore
    return json_response(state.instances.counts())


async def health(request: Request) -> Response:
    """``GET /health``: the router's own state: 200 ``ok`` while serving, 503 ``draining``
    once SIGTERM has started a graceful drain (so load balancers send no more)."""
    state: RouterState = request.app.state.fdcore
    healthy = sum(1 for i in state.instances.instances() if i.healthy)
    draining = state.drain.draining
    return json_response({"status": "draining" if draining else "ok",
                          "instances": len(state.instances), "healthy_instances": healthy},
                         503 if draining else 200)


async def health_generate(request: Request) -> Response:
    """``GET /health_generate``: check every instance now; 200 only if the router can serve."""
    state: RouterState = request.app.state.fdcore
    await state.health.check_all()
    rows = [
        {"url": i.url, "role": i.role.value, "healthy": i.healthy,
         "detail": state.health.detail(i)}
        for i in state.instances.instances()
    ]
    needed = (Role.PREFILL, Role.DECODE) if state.config.server.splitwise else (Role.MIXED,)
    missing = [r.value for r in needed if not state.instances.healthy(r)]
    ok = not missing
    message = "Health check complete" if ok else f"no healthy {' or '.join(missing)} instance"
    return json_response(
        {"code": 200 if ok else 503, "msg": message, "instances": rows}, 200 if ok else 503
    )


async def _fan_out(
    state: RouterState, method: str, path: str, targets: list[Instance], body: Any = None
) -> list[tuple[Instance, int, Any]]:
    session = state.http
    assert session is not None
    timeout = aiohttp.ClientTimeout(total=state.config.manager.health_check_timeout_secs)

    async def one(instance: Instance) -> tuple[Instance, int, Any]:
        try:
            async with session.request(method, instance.url + path, json=body,
                                       timeout=timeout) as resp:
                raw = await resp.read()
                try:
                    return instance, resp.status, orjson.loads(raw)
                except orjson.JSONDecodeError:
                    # Whatever answers there (a proxy's banner, an error page) stays in the log.
                    log.warning("instance answer is not JSON", instance=instance.url, path=path,
                                status=resp.status, body=raw[:200].decode(errors="replace"))
                    return instance, resp.status, "the instance's answer is not JSON"
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("instance call failed", instance=instance.url, path=path,
                        error=f"{type(exc).__name__}: {exc}")
            return instance, 0, "the instance did not answer"

    return list(await asyncio.gather(*(one(i) for i in targets)))


def _models_union(answers: list[Any]) -> dict[str, Any]:
    """Merge instances' ``/v1/models`` answers into one OpenAI list, by model id."""
    seen: dict[str, dict[str, Any]] = {}
    for answer in answers:
        if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
            continue
        for model in answer["data"]:
            if isinstance(model, dict) and isinstance(model.get("id"), str):
                seen.setdefault(model["id"], model)
    return {"object": "list", "data": list(seen.values())}


async def models(request: Request) -> Response:
    """``GET /v1/models``: the union of the healthy instances' models."""
    state: RouterState = request.app.state.fdcore
    targets = [i for i in state.instances.instances() if i.healthy]
    answers = await _fan_out(state, "GET", "/v1/models", targets)
    return json_response(_models_union([body for _, status, body in answers if status == 200]))


async def abort_requests(request: Request) -> Response:
    """``POST /v1/abort_requests``: ``req_ids`` or ``abort_all``, fanned out to the instances.

    Requests the router is proxying go straight to their instance; others go to every healthy
    instance. The answer says what each instance aborted.
    """
    state: RouterState = request.app.state.fdcore
    try:
        payload = await _json_body(request)
    except APIError as exc:
        return exc.response()
    if not isinstance(payload, dict):
        return error_response(400, "request body must be a JSON object")
    abort_all = payload.get("abort_all", False)
    req_ids: list[str] = payload.get("req_ids") or []
    if not isinstance(abort_all, bool):
        return error_response(400, "abort_all: must be a boolean", param="abort_all")
    keys: Keys = request.app.state.auth
    if abort_all and keys.configured and not keys.is_admin(request.scope["headers"]):
        # An API key may abort requests by id; ending every client's requests is an
        # operator's act, even where API keys alone open the admin endpoints.
        return error_response(403, "abort_all needs the admin key (auth.admin-key)",
                              "permission_error", param="abort_all")
    if not abort_all and (
        not isinstance(req_ids, list) or not all(isinstance(r, str) for r in req_ids) or not req_ids
    ):
        return error_response(400, "give req_ids (a non-empty list of strings) or abort_all: true",
                              param="req_ids")
    healthy = [i for i in state.instances.instances() if i.healthy]
    calls: list[tuple[list[Instance], dict[str, Any]]] = []
    alias: dict[str, str] = {}  # the id an instance knows -> the client's
    if abort_all:
        calls.append((healthy, {"abort_all": True}))
    else:
        by_instance: dict[str, list[str]] = {}
        unknown: list[str] = []
        for rid in req_ids:
            leases = state.selector.inflight.get(rid)
            if not leases:
                unknown.append(rid)
            for lease in leases or ():  # a prefill/decode pair: both
                by_instance.setdefault(lease.instance.url, []).append(lease.upstream_id)
                alias[lease.upstream_id] = rid
        for url, ids in by_instance.items():
            instance = state.instances.get(url)
            if instance is not None:
                calls.append(([instance], {"req_ids": ids}))
        if unknown:
            calls.append((healthy, {"req_ids": unknown}))
    results = await asyncio.gather(
        *(_fan_out(state, "POST", "/v1/abort_requests", targets, body) for targets, body in calls)
    )
    aborted: list[Any] = []
    per_instance: dict[str, list[Any]] = {}
    for answers in results:
        for instance, status, body in answers:
            per_instance.setdefault(instance.url, []).append({"status": status, "response": body})
            # fdcore engines answer {"result": {"aborted": [...]}}; others put "aborted" on top.
            result = body.get("result", body) if isinstance(body, dict) else None
            if status == 200 and isinstance(result, dict) and isinstance(
                result.get("aborted"), list
            ):
                aborted.extend(
                    {**item, "instance": instance.url} if isinstance(item, dict)
                    else {"request_id": item, "instance": instance.url}
                    for item in result["aborted"]
                )
    found = {alias.get(a.get("request_id"), a.get("request_id")) for a in aborted}
    not_found = [] if abort_all else [r for r in req_ids if r not in found]
    return json_response({"aborted": aborted, "not_found": not_found, "instances": per_instance})


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text."""
    state: RouterState = request.app.state.fdcore
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
