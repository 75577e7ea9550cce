"""The official ``openai`` client, pointed at the router."""

from __future__ import annotations

import openai

from tests.router.conftest import RouterFactory


async def test_openai_client_completion_and_streamed_chat(backends, router: RouterFactory) -> None:
    (backend,) = backends(1)
    r = router([backend])
    await r.wait_healthy(1)
    client = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0)
    try:
        completion = await client.completions.create(model="test-model", prompt="Say hello")
        assert completion.choices[0].text == "hello from b0"
        stream = await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        pieces = [chunk.choices[0].delta.content async for chunk in stream]
        assert pieces == ["b0-0 ", "b0-1 ", "b0-2 "]
        models = await client.models.list()
        assert "test-model" in [m.id for m in models.data]
        # An error from the instance surfaces as the client's typed error with its message.
        try:
            await client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-test-status": "404"},
            )
        except openai.NotFoundError as exc:
            assert "test backend b0 says 404" in str(exc)
        else:
            raise AssertionError("a 404 from the instance must reach the client")
    finally:
        await client.close()
