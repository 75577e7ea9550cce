"""``request_num``: the instance with the fewest requests in flight."""

from __future__ import annotations

import fdcore
from fdcore.registry import Register
from fdcore.types import Instance

from .least_load import LeastLoadPolicy


class RequestNumPolicy(LeastLoadPolicy):
    """Argmin of the router's request counter; tied candidates take turns.

    FastDeploy's default mixed and decode policy.
    """

    name = "request_num"

    def load(self, instance: Instance) -> float:
        """Requests in flight to ``instance``."""
        return instance.load.requests


@fdcore.hookimpl
def fdcore_register_policies(register: Register) -> None:
    """Register ``request_num``."""
    register.add_policy(RequestNumPolicy)
