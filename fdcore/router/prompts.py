"""Reading an inference request: JSON checks and the text a policy routes on."""

from __future__ import annotations

from typing import Any

from fdcore.http import APIError, BadRequestId, check_request_id


def _text_of_content(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise APIError(400, f"messages[{index}].content: parts must be objects",
                               param="messages")
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"].strip())
        return " ".join(p for p in parts if p)
    raise APIError(
        400, f"messages[{index}].content: must be a string, a list of parts or null",
        param="messages",
    )


def chat_prompt(payload: dict[str, Any]) -> str:
    """The chat messages' text, trimmed and joined by single spaces (FastDeploy's rule)."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: required, a non-empty list of message objects",
                       param="messages")
    texts = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{index}]: must be an object", param="messages")
        text = _text_of_content(message.get("content"), index)
        if text:
            texts.append(text)
    return " ".join(texts)


def completion_prompt(payload: dict[str, Any]) -> str:
    """The completion prompt's text (a string, or a list of strings joined by spaces).

    Token-id prompts are routed on their ids rendered as text so equal prompts still match.
    """
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt.strip()
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return " ".join(p.strip() for p in prompt if p.strip())
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return " ".join(map(str, prompt))
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return " ".join(" ".join(map(str, p)) for p in prompt)
    raise APIError(
        400, "prompt: required, a string, a list of strings or a list of token ids",
        param="prompt",
    )


def check_common(payload: Any) -> dict[str, Any]:
    """Type checks the router relies on; the instance validates everything else."""
    if not isinstance(payload, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(payload).__name__}")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream: must be a boolean", param="stream")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model: must be a string", param="model")
    request_id = payload.get("request_id")
    if request_id is not None:
        try:
            check_request_id(request_id, "request_id")
        except BadRequestId as exc:
            raise APIError(400, str(exc), param="request_id") from None
    return payload


PROMPT_READERS = {"chat": chat_prompt, "completions": completion_prompt}
