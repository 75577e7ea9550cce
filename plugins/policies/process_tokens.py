"""``process_tokens``: the instance with the fewest prompt tokens in flight."""

from __future__ import annotations

import fdcore
from fdcore.registry import Register
from fdcore.types import Instance

from .least_load import LeastLoadPolicy


class ProcessTokensPolicy(LeastLoadPolicy):
    """Argmin of the router's token counter; tied candidates take turns.

    FastDeploy's default prefill policy: prefill cost grows with prompt length, so in-flight
    prompt tokens predict the wait better than a request count.
    """

    name = "process_tokens"

    def load(self, instance: Instance) -> float:
        """Prompt tokens (estimated) in flight to ``instance``."""
        return instance.load.tokens


@fdcore.hookimpl
def fdcore_register_policies(register: Register) -> None:
    """Register ``process_tokens``."""
    register.add_policy(ProcessTokensPolicy)
