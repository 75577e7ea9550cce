"""FastDeploy's admission rule, shared by every scheduler's ``get_requests``."""

from __future__ import annotations

from collections.abc import Sequence

from fdcore.types import EngineRequest


def count_admissible(
    requests: Sequence[EngineRequest],
    available_blocks: int,
    block_size: int,
    reserved_output_blocks: int,
    batch: int,
) -> int:
    """How many leading ``requests`` an engine with ``available_blocks`` free can take now.

    Each costs the blocks of its prompt plus ``reserved_output_blocks``; requests are taken in
    order while the running sum fits; the first is taken whenever its prompt alone fits, so an
    engine with room never starves behind the reserve. Nothing is taken when
    ``available_blocks`` does not exceed the reserve or ``batch < 1``. The token budget does
    not limit admission because the engine prefills in chunks of at most
    ``max_num_batched_tokens`` per step.
    """
    if available_blocks <= reserved_output_blocks or batch < 1:
        return 0
    needed = 0
    taken = 0
    for request in requests[:batch]:
        prompt_blocks = -(-request.prompt_len // block_size)
        needed += prompt_blocks + reserved_output_blocks
        if needed > available_blocks and not (taken == 0 and prompt_blocks <= available_blocks):
            break
        taken += 1
    return taken
