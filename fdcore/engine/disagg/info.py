"""``disaggregate_info``: what a router adds to a request it sends to both P and D.

FastDeploy's keys (``prefill_ip``, ``decode_ip``, ``prefill_connector_port``,
``decode_connector_port``, ``decode_device_ids``, ``decode_rdma_ports``, ``transfer_protocol``,
``decode_tp_size``) plus fdcore's ``transfer_id`` (fresh per attempt; the request id when a
router does not send one). Ports and ids may come as strings (FastDeploy's register payload
coerces everything to strings), so numbers are read from either.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from fdcore.engine.config import TRANSFER_PROTOCOLS


def _int(value: Any) -> Any:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _strings(value: Any) -> Any:
    if isinstance(value, list):
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


Port = Annotated[int, BeforeValidator(_int), Field(ge=0, le=65535)]
Strings = Annotated[list[str], BeforeValidator(_strings)]


class DisaggInfo(BaseModel):
    """One request's P-D pairing, checked before anything reads it."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    prefill_ip: str = Field(min_length=1, max_length=255)
    decode_ip: str = Field(min_length=1, max_length=255)
    prefill_connector_port: Port
    decode_connector_port: Port
    transfer_protocol: str
    decode_device_ids: Strings = Field(default_factory=list)
    decode_rdma_ports: Strings = Field(default_factory=list)
    decode_tp_size: Annotated[int, BeforeValidator(_int)] = 1
    transfer_id: str | None = Field(None, min_length=1, max_length=256)

    @property
    def prefill_address(self) -> str:
        """P's connector, ``host:port``."""
        return f"{self.prefill_ip}:{self.prefill_connector_port}"

    @property
    def decode_address(self) -> str:
        """D's connector, ``host:port``."""
        return f"{self.decode_ip}:{self.decode_connector_port}"

    def transfer(self, request_id: str) -> str:
        """The transfer id: the router's, else the request id."""
        return self.transfer_id or request_id

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able form carried in ``EngineRequest.extra``."""
        return self.model_dump()


class DisaggInfoError(ValueError):
    """``disaggregate_info`` that cannot be used, with the first problem named."""


def parse_disagg_info(value: Any) -> DisaggInfo:
    """``value`` checked as ``disaggregate_info``; :class:`DisaggInfoError` names the problem."""
    if not isinstance(value, dict):
        raise DisaggInfoError("disaggregate_info must be an object")
    try:
        info = DisaggInfo.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "disaggregate_info"
        raise DisaggInfoError(f"disaggregate_info.{key}: {err['msg']}") from None
    if info.transfer_protocol not in TRANSFER_PROTOCOLS:
        known = ", ".join(TRANSFER_PROTOCOLS)
        raise DisaggInfoError(f"disaggregate_info.transfer_protocol: unknown KV transport "
                              f"{info.transfer_protocol!r} (known: {known})")
    for name in ("prefill_connector_port", "decode_connector_port"):
        if getattr(info, name) == 0:
            raise DisaggInfoError(f"disaggregate_info.{name}: the instance has no connector "
                                  "port (start it with --pd-comm-port)")
    return info


DISAGG_KEY = "disaggregate_info"


def disagg_of(extra: dict[str, Any]) -> DisaggInfo | None:
    """The checked info an :class:`~fdcore.types.EngineRequest`'s ``extra`` carries, if any."""
    value = extra.get(DISAGG_KEY)
    return None if value is None else DisaggInfo.model_validate(value)
