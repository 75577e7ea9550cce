"""Every failure of a hand-off ends with a clean answer (or error) for the client within its
deadline, and every block back to its baseline on both engines (read from their metrics)."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest

from fdcore.testing.distributions import plugin_site, pythonpath
from tests.engine.conftest import Engine, wait_until
from tests.engine.disagg.conftest import FIRST_CONTACT_SECS, HOLD_SECS, write_profile
from tests.engine.disagg.pd_client import Answer, at_baseline, held_blocks, info, pd_complete

FLAGS = ("--block-size", "16", "--num-gpu-blocks", "64")
# Long enough for any deadline of the pair to pass (quarantine is 3 holds) plus a sweep.
RECLAIM_SECS = FIRST_CONTACT_SECS + 4 * HOLD_SECS + 5
PROMPT = "a prompt long enough that its prefill takes a while on the slow engine. " * 3

StartPD = Callable[..., tuple[Engine, Engine]]


@pytest.fixture(scope="module")
def slow_prefill(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """P's prefill of PROMPT takes about 4 s: time for a test to act in the middle."""
    return write_profile(tmp_path_factory.mktemp("pd") / "slow.yaml",
                         prefill_seconds_per_token=4.0 / len(PROMPT))


@pytest.fixture
def pool() -> Any:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def _body(**fields: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **fields}


def _pd_error(answer: Answer) -> str:
    assert answer.status in (502, 503, 504), answer
    message = str(answer.body["error"]["message"])
    assert message.startswith("PD Error"), message
    return message


def _reclaimed(*engines: Engine) -> None:
    try:
        wait_until(lambda: all(at_baseline(e) for e in engines), timeout=RECLAIM_SECS)
    except AssertionError:
        state: list[Any] = []
        for e in engines:
            try:
                state.append((e.port, held_blocks(e), {k: v for k, v in e.metrics().items()
                                                       if "block" in k or "running" in k}))
            except OSError as exc:  # say what the engine was doing, not only that it hung up
                state.append((e.port, repr(exc), e.proc.output()[-4000:]))
        raise AssertionError(f"blocks not back within {RECLAIM_SECS} s: {state}") from None


def test_d_rejects_when_it_has_no_room(start_pd: StartPD, tmp_path: Path) -> None:
    """D's cache is taken by a long request of its own: the hand-off is refused, both
    clients hear why, and nothing stays held."""
    slow_decode = write_profile(tmp_path / "slow-decode.yaml", decode_seconds_per_step=0.2)
    p, d = start_pd("ipc,tcp", "--block-size", "16", "--num-gpu-blocks", "16",
                    d_profile=slow_decode)
    # 200 prompt tokens + 40 to generate: 15 of D's 16 blocks, for about 8 s.
    with ThreadPoolExecutor(1) as executor:
        hog = executor.submit(d.request, "POST", "/v1/completions",
                              {"prompt": "x" * 200, "max_tokens": 40, "ignore_eos": True,
                               "request_id": "hog"})
        wait_until(lambda: d.metric("fastdeploy:available_gpu_block_num") <= 2)
        d_answer, p_answer = pd_complete(p, d, _body(prompt="y" * 100))
        assert "no_room" in _pd_error(d_answer)
        assert "no_room" in _pd_error(p_answer)
        assert held_blocks(d) == 0 and held_blocks(p) == 0
        d.request("POST", "/v1/abort_requests", {"req_ids": ["hog"]})
        hog.result(timeout=30)
    _reclaimed(p, d)


def test_incompatible_layouts_are_refused(start_pd: StartPD) -> None:
    p, d = start_pd("tcp", p_flags=("--block-size", "16", "--num-gpu-blocks", "64"),
                    d_flags=("--block-size", "32", "--num-gpu-blocks", "32"))
    d_answer, p_answer = pd_complete(p, d, _body(), "tcp")
    assert "incompatible_layout" in _pd_error(d_answer)
    assert "incompatible_layout" in _pd_error(p_answer)
    _reclaimed(p, d)


def test_p_dead_before_it_could_send(start_pd: StartPD) -> None:
    """P is gone when the request comes: D answers once its first-contact deadline passes."""
    p, d = start_pd("ipc,tcp", *FLAGS)
    p.proc.kill()
    d_answer, p_answer = pd_complete(p, d, _body())
    assert p_answer.error  # P's connection was refused
    assert "no prefill arrived" in _pd_error(d_answer)
    _reclaimed(d)


@pytest.mark.parametrize("protocol", ["ipc", "tcp"])
def test_p_killed_after_cache_sync(start_pd: StartPD, slow_prefill: Path, pool: Any,
                                   protocol: str) -> None:
    p, d = start_pd("ipc,tcp", *FLAGS, p_profile=slow_prefill)
    answer: Future[tuple[Answer, Answer]] = pool.submit(pd_complete, p, d, _body(), protocol)
    wait_until(lambda: held_blocks(d) > 0)  # D reserved and sent cache_sync; P prefills
    p.proc.kill()
    d_answer, p_answer = answer.result(timeout=RECLAIM_SECS)
    assert p_answer.error
    assert "stopped answering" in _pd_error(d_answer)
    _reclaimed(d)


@pytest.mark.parametrize("protocol", ["ipc", "tcp"])
def test_d_killed_mid_transfer(start_pd: StartPD, slow_prefill: Path, pool: Any,
                               protocol: str) -> None:
    p, d = start_pd("ipc,tcp", *FLAGS, p_profile=slow_prefill)
    answer: Future[tuple[Answer, Answer]] = pool.submit(pd_complete, p, d, _body(), protocol)
    wait_until(lambda: held_blocks(d) > 0)
    d.proc.kill()
    d_answer, p_answer = answer.result(timeout=RECLAIM_SECS)
    assert d_answer.error  # the client's connection to D broke
    # P either could not write (its answer says why) or wrote into the dead engine's memory.
    assert p_answer.status == 200 or "PD Error" in p_answer.body["error"]["message"]
    _reclaimed(p)


def test_p_stopped_with_sigstop(start_pd: StartPD, slow_prefill: Path, pool: Any) -> None:
    """A frozen P: D gives up at its deadline; P, thawed, writes nothing late."""
    p, d = start_pd("ipc,tcp", *FLAGS, p_profile=slow_prefill)
    answer: Future[tuple[Answer, Answer]] = pool.submit(pd_complete, p, d, _body(), "ipc")
    wait_until(lambda: held_blocks(d) > 0)
    assert p.proc.proc is not None
    os.kill(p.proc.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: held_blocks(d) == 0, timeout=RECLAIM_SECS)  # quarantine over
    finally:
        os.kill(p.proc.proc.pid, signal.SIGCONT)
    d_answer, p_answer = answer.result(timeout=RECLAIM_SECS)
    assert "stopped answering" in _pd_error(d_answer)
    _pd_error(p_answer)  # P's reservation lapsed while it was stopped: no late write
    _reclaimed(p, d)


def test_client_leaves_d(start_pd: StartPD, slow_prefill: Path) -> None:
    """The client hangs up on D while P prefills: both ends stop and free everything."""
    p, d = start_pd("ipc,tcp", *FLAGS, p_profile=slow_prefill)
    body = {**_body(stream=True), "request_id": "leaver", "disaggregate_info": info(p, d, "ipc")}
    with ThreadPoolExecutor(1) as executor:
        p_answer = executor.submit(_post_raw, p, body)
        with socket.create_connection(("127.0.0.1", d.port), timeout=30) as conn:
            payload = orjson.dumps(body)
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                         b"application/json\r\ncontent-length: " + str(len(payload)).encode()
                         + b"\r\n\r\n" + payload)
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            wait_until(lambda: held_blocks(d) > 0)
        # P's client is told the hand-off was aborted.
        assert "PD Error" in p_answer.result(timeout=RECLAIM_SECS)
    _reclaimed(p, d)


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_abort_by_id(start_pd: StartPD, slow_prefill: Path, pool: Any, side: str) -> None:
    p, d = start_pd("ipc,tcp", *FLAGS, p_profile=slow_prefill)
    answer: Future[tuple[Answer, Answer]] = pool.submit(
        pd_complete, p, d, _body(request_id=f"abort-{side}"), "tcp")
    wait_until(lambda: held_blocks(d) > 0)
    target = p if side == "prefill" else d
    status, result = target.request("POST", "/v1/abort_requests",
                                    {"req_ids": [f"abort-{side}"]})
    assert status == 200 and result["result"]["aborted"], result
    d_answer, p_answer = answer.result(timeout=RECLAIM_SECS)
    assert d_answer.status != 200 or d_answer.body["choices"][0]["finish_reason"] == "abort"
    assert p_answer.status != 200 or p_answer.body["choices"][0]["finish_reason"] == "abort"
    _reclaimed(p, d)


FLAKY = '''
import os, random

import fdcore
from fdcore_plugins.transports import tcp

_rng = random.Random(int(os.environ.get("FLAKY_SEED", "0")))
_p = float(os.environ.get("FLAKY_PROBABILITY", "0.2"))


class FlakyLink:
    def __init__(self, link):
        self.link = link

    async def write(self, src, dst, layers=None, *, transfer_id=""):
        if _rng.random() < _p:
            raise OSError("injected transport failure")
        return await self.link.write(src, dst, layers, transfer_id=transfer_id)

    async def close(self):
        await self.link.close()


class FlakyTcp(tcp.TcpTransport):
    async def connect(self, handle):
        return FlakyLink(await super().connect(handle))


@fdcore.hookimpl
def fdcore_register_transports(register):
    register.add_transport(FlakyTcp)
'''


def test_random_transport_failures(start_pd: StartPD, tmp_path: Path) -> None:
    """P's tcp writes fail at random (20%) over 200 requests: each client gets the text or a
    PD Error, and both engines end with every block back."""
    site = plugin_site(tmp_path / "site", "fdcore-flaky-tcp", {"flaky_tcp": "flaky_tcp"},
                       {"flaky_tcp": FLAKY})
    env = {"PYTHONPATH": pythonpath(site), "FLAKY_SEED": "7", "FLAKY_PROBABILITY": "0.2"}
    p, d = start_pd("tcp", *FLAGS, p_flags=("--plugins", "default,flaky_tcp",
                                            "--block-plugins", "tcp"), p_env=env)
    outcomes: dict[str, int] = {"ok": 0, "failed": 0}
    with ThreadPoolExecutor(8) as executor:
        answers = list(executor.map(
            lambda i: pd_complete(p, d, _body(prompt=f"request {i} " * 8, max_tokens=4), "tcp"),
            range(200)))
    for d_answer, _ in answers:
        if d_answer.status == 200:
            assert len(d_answer.text) == 4
            outcomes["ok"] += 1
        else:
            assert "PD Error" in _pd_error(d_answer)
            outcomes["failed"] += 1
    assert outcomes["ok"] > 100 and outcomes["failed"] > 10, outcomes
    _reclaimed(p, d)


def _post_raw(engine: Engine, body: dict[str, Any]) -> str:
    _, answer = engine.request("POST", "/v1/completions", body)
    return orjson.dumps(answer).decode() if not isinstance(answer, str) else answer
