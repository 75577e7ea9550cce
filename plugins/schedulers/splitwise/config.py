"""Options of the ``splitwise`` scheduler (``--scheduler-<field>``), with FastDeploy's defaults.

FastDeploy's code reads ``sync_period`` and ``expire_period`` in milliseconds (its docs say
seconds; the defaults 5 and 3000 only make sense as milliseconds): fdcore follows the code.
"""

from __future__ import annotations

from pydantic import Field

from fdcore.redis import RedisConfig


class SplitwiseConfig(RedisConfig):
    """Where Redis is (see :class:`~fdcore.redis.RedisConfig`), the topic shared by the
    cluster, and the cadence of its bookkeeping."""

    topic: str = Field(
        "fd", min_length=1, pattern=r"^[^{}\s]+$",
        description="instances sharing a topic pair with each other",
    )
    ttl: float = Field(900.0, gt=0, description="seconds a request and every key may live")
    sync_period: float = Field(
        5.0, gt=0,
        description="milliseconds between checks of this instance's load; a changed load is "
                    "published at once, an unchanged one every third of expire-period",
    )
    expire_period: float = Field(
        3000.0, gt=0,
        description="milliseconds without news after which an instance counts as gone",
    )
    release_load_expire_period: float = Field(
        600.0, gt=0,
        description="seconds after which a silent request no longer counts in the load",
    )
    clear_expired_nodes_period: float = Field(
        60.0, gt=0,
        description="seconds after which a gone instance's entry is deleted from the cluster",
    )
    reader_parallel: int = Field(4, ge=1, description="output streams (and readers) per instance")
    reader_batch_size: int = Field(200, ge=1, description="outputs a reader takes per read")
    writer_parallel: int = Field(4, ge=1, description="output writes in flight at once")
    writer_batch_size: int = Field(200, ge=1, description="outputs per pipelined write")
    pd_retry_count: int = Field(
        3, ge=0,
        description="fdcore: times a request whose hand-off failed, or whose prefill or decode "
                    "instance stopped, before its first token is placed again on another pair",
    )

    @property
    def expire_secs(self) -> float:
        """``expire_period`` in seconds."""
        return self.expire_period / 1000

    @property
    def sync_secs(self) -> float:
        """``sync_period`` in seconds."""
        return self.sync_period / 1000
