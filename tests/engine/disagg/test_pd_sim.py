"""P+D sim engines give the same text as one mixed engine, for every transport here, and every
block returns to its baseline on both sides."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engine.conftest import Engine, wait_until
from tests.engine.disagg.pd_client import at_baseline, pd_complete, post, received_bytes

PROTOCOLS = ["ipc", "tcp"]
FLAGS = ("--block-size", "16", "--num-gpu-blocks", "128")


@pytest.fixture(scope="module")
def mixed(start_engine: Callable[..., Engine]) -> Engine:
    """The reference: one mixed engine with the same cache shape."""
    return start_engine(*FLAGS)


@pytest.fixture(scope="module")
def pair(start_pd: Callable[..., tuple[Engine, Engine]]) -> tuple[Engine, Engine]:
    """P and D offering both transports."""
    return start_pd("ipc,tcp", *FLAGS)


def _body(prompt: str, max_tokens: int = 24, stream: bool = False) -> dict[str, object]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "ignore_eos": True}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("stream", [False, True])
def test_pd_output_equals_mixed(mixed: Engine, pair: tuple[Engine, Engine], protocol: str,
                                stream: bool) -> None:
    p, d = pair
    prompt = f"the quick brown fox jumps over the lazy dog, {protocol} {stream} " * 3
    expected = post(mixed, _body(prompt, stream=stream)).text
    d_answer, p_answer = pd_complete(p, d, _body(prompt, stream=stream), protocol)
    assert d_answer.status == 200, d_answer
    assert p_answer.status == 200, p_answer
    assert d_answer.text == expected
    assert len(d_answer.text) == 24
    # P answered with the first token alone.
    assert expected.startswith(p_answer.text) and len(p_answer.text) == 1
    wait_until(lambda: at_baseline(p) and at_baseline(d))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_prefix_already_cached_on_d(mixed: Engine, pair: tuple[Engine, Engine],
                                    protocol: str) -> None:
    """D reserves only what its prefix cache lacks; the text is unchanged."""
    p, d = pair
    shared = f"a shared system prompt long enough for several blocks ({protocol}). " * 2
    first = shared + "first question"
    second = shared + "second question, different"
    d_first, _ = pd_complete(p, d, _body(first), protocol)
    assert d_first.status == 200 and d_first.text == post(mixed, _body(first)).text
    before = received_bytes(d)
    d_second, p_second = pd_complete(p, d, _body(second), protocol)
    assert d_second.status == 200
    # P kept its source blocks in its prefix cache: the shared blocks were not prefilled again.
    assert p_second.body["usage"]["prompt_tokens_details"]["cached_tokens"] == 7 * 16
    assert d_second.text == post(mixed, _body(second)).text
    # BOS + the shared part fill 7 blocks of 16 tokens that D has cached: P writes the last 3
    # of the prompt's 10 blocks (1 KiB each: 64 bytes per token in the sim pool).
    assert d_second.body["usage"]["prompt_tokens"] == 1 + len(second) == 149
    assert received_bytes(d) - before == 3 * 1024
    wait_until(lambda: at_baseline(p) and at_baseline(d))


def test_d_without_disaggregate_info_runs_the_request_itself(
        mixed: Engine, pair: tuple[Engine, Engine]) -> None:
    """Conditional disaggregation: a request sent to D alone is prefilled there."""
    _, d = pair
    answer = post(d, _body("a short prompt run on D alone"))
    assert answer.status == 200
    assert answer.text == post(mixed, _body("a short prompt run on D alone")).text


def test_bad_disaggregate_info_is_a_400(pair: tuple[Engine, Engine]) -> None:
    p, _ = pair
    for bad in ({"decode_ip": "127.0.0.1"}, "not an object",
                {"prefill_ip": "a", "decode_ip": "b", "prefill_connector_port": 1,
                 "decode_connector_port": 2, "transfer_protocol": "carrier-pigeon"},
                {"prefill_ip": "a", "decode_ip": "b", "prefill_connector_port": "x",
                 "decode_connector_port": 2, "transfer_protocol": "ipc"},
                {"prefill_ip": "a", "decode_ip": "b", "prefill_connector_port": 0,
                 "decode_connector_port": 2, "transfer_protocol": "ipc"},
                # a transport the pair does not offer
                {"prefill_ip": "a", "decode_ip": "b", "prefill_connector_port": 1,
                 "decode_connector_port": 2, "transfer_protocol": "rdma"}):
        answer = post(p, {**_body("x"), "disaggregate_info": bad})
        assert answer.status == 400, answer
        assert answer.body["error"]["param"] == "disaggregate_info"


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                      min_size=1, max_size=120),
       max_tokens=st.integers(1, 12), protocol=st.sampled_from(PROTOCOLS))
def test_many_prompts_match_mixed(mixed: Engine, pair: tuple[Engine, Engine], prompt: str,
                                  max_tokens: int, protocol: str) -> None:
    p, d = pair
    body = _body(prompt, max_tokens)
    d_answer, _ = pd_complete(p, d, body, protocol)
    assert d_answer.status == 200, d_answer
    assert d_answer.text == post(mixed, body).text
