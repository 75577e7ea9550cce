"""Client for a remote tokenize endpoint (``tokenizer-url``), as FastDeploy's router calls it."""

from __future__ import annotations

from urllib.parse import urlsplit

import aiohttp


class TokenizeFailed(Exception):
    """The tokenizer did not answer usefully; ``reason`` is a short metrics label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"tokenizer {reason}: {detail}")
        self.reason = reason


class RemoteTokenizer:
    """POSTs ``{"text", "prompt", "message"}`` (all the prompt) and reads ``{"input_ids"}``.

    A url without a path gets ``/tokenize``, FastDeploy's default.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url if urlsplit(url).path not in ("", "/") else url.rstrip("/") + "/tokenize"
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the HTTP client."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout)
        )

    async def stop(self) -> None:
        """Close the HTTP client."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``; raise :class:`TokenizeFailed` on any failure."""
        if self._session is None:
            raise RuntimeError("the tokenizer client is not started")
        body = {"text": text, "prompt": text, "message": text}
        try:
            async with self._session.post(self.url, json=body) as resp:
                if resp.status >= 300:
                    raise TokenizeFailed("error", f"HTTP {resp.status}")
                payload = await resp.json(content_type=None)
        except TimeoutError as exc:
            raise TokenizeFailed("timeout", str(exc) or "timed out") from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise TokenizeFailed("error", str(exc)) from None
        ids = payload.get("input_ids") if isinstance(payload, dict) else None
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise TokenizeFailed("invalid", "no non-empty integer list under input_ids")
        return ids
