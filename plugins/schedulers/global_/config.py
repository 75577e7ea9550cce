"""Options of the ``global`` scheduler (``--scheduler-<field>``), with FastDeploy's defaults."""

from __future__ import annotations

from pydantic import Field

from fdcore.types import StrictModel


class GlobalConfig(StrictModel):
    """Where Redis is, the topic shared by the cluster, and when work may be stolen."""

    host: str = Field("127.0.0.1", description="Redis host")
    port: int = Field(6379, ge=1, le=65535, description="Redis port")
    db: int = Field(0, ge=0, description="Redis database number")
    password: str | None = Field(None, description="Redis password; empty: none")
    topic: str = Field(
        "default", min_length=1, pattern=r"^[^{}]+$",
        description="instances sharing a topic share their queues",
    )
    ttl: float = Field(900.0, gt=0, description="seconds queued work and every key may live")
    min_load_score: int = Field(
        3, ge=1, description="queued requests an instance needs before others steal from it"
    )
    load_shards_num: int = Field(1, ge=1, description="load tables (and cluster slots) per topic")
    alive_ttl: float = Field(
        30.0, gt=0, description="seconds an instance counts as alive without a keep-alive"
    )
    lost_timeout: float = Field(
        10.0, gt=0,
        description="seconds to wait, after Redis was lost or restarted, for remote work to "
                    "show it survived before failing it",
    )
    redis_max_connections: int = Field(
        512, ge=1,
        description="connections per client to Redis at most; a command finding all of them "
                    "busy waits for one (up to 5 s) instead of failing",
    )

    @property
    def redis_password(self) -> str | None:
        """The password to send (FastDeploy's launch line passes ``""`` for none)."""
        return self.password or None

    @property
    def address(self) -> str:
        """``host:port`` for messages."""
        return f"{self.host}:{self.port}"
