"""Options of the ``global`` scheduler (``--scheduler-<field>``), with FastDeploy's defaults."""

from __future__ import annotations

from pydantic import Field

from fdcore.redis import RedisConfig


class GlobalConfig(RedisConfig):
    """Where Redis is (see :class:`~fdcore.redis.RedisConfig`), the topic shared by the
    cluster, and when work may be stolen."""

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
