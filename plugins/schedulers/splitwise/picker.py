"""Where a request runs: FastDeploy's blurred least load over the cluster's instances.

Instances are sorted by load; the window holds those whose load is below the least plus a
step, and one of them is chosen at random, so a burst that arrives between two load updates
spreads instead of piling onto one instance. For prefill (or mixed) the load is queued prompt
tokens and the step ``max(100, min(500, prompt_len / rate))`` with ``rate`` 2 below 1,000
tokens and 10 above; for decode the load is requests and the step ``min(len(instances), 10)``.
A prefill instance is only a candidate when some decode instance can pair with it (a common
KV transport and the same KV layout: the router's rules, :mod:`fdcore.router.pairing`); a mixed
instance takes the request alone.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fdcore.router.pairing import choose_protocol, pair_problem
from fdcore.types import EngineRequest, Role

from .cluster import Node


class NoPlacement(Exception):
    """No instance (or pair) can take the request; the message says why."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one request goes: ``prefill`` (a mixed instance when ``decode`` is None)."""

    prefill: Node
    decode: Node | None = None
    protocol: str = ""


def prefill_step(prompt_len: int) -> int:
    """The blur window's width for a prefill or mixed pick."""
    rate = 2 if prompt_len < 1000 else 10
    return max(100, min(500, int(prompt_len / rate)))


def blurred_least_load(nodes: Sequence[Node], step: int, rng: random.Random) -> Node:
    """A random one of the least loaded ``nodes`` (load below the least plus ``step``)."""
    ranked = sorted(nodes, key=lambda n: (n.load, n.name))
    ceiling = ranked[0].load + step
    window = [n for n in ranked if n.load < ceiling] or ranked[:1]
    return rng.choice(window)


def place(request: EngineRequest, nodes: Mapping[str, Node], topic: str,
          rng: random.Random, avoid: frozenset[str] = frozenset()) -> Placement:
    """Pick the instance(s) for ``request``; raises :class:`NoPlacement`.

    ``avoid`` (a retry's failed instances) are left out while others can take the request;
    failing that, only the avoided prefill and mixed ones (decode instances are the scarcer
    kind, and a failed hand-off is more often P's); failing that, none."""
    if avoid:
        for keep in (lambda n: n.name not in avoid,
                     lambda n: n.name not in avoid or n.role is Role.DECODE):
            with contextlib.suppress(NoPlacement):
                return place(request, {k: n for k, n in nodes.items() if keep(n)}, topic, rng)
    decodes = [n for n in nodes.values() if n.role is Role.DECODE]
    firsts: list[Node] = []
    problems: list[str] = []
    for node in nodes.values():
        if node.role is Role.MIXED:
            firsts.append(node)
        elif node.role is Role.PREFILL:
            found = [pair_problem(node.instance, d.instance) for d in decodes]
            if any(p is None for p in found):
                firsts.append(node)
            elif not decodes:
                problems.append(f"prefill {node.name} has no decode instance to pair with")
            else:
                problems += [f"decode {d.name}: {p}" for d, p in zip(decodes, found, strict=True)]
    if not firsts:
        why = "; ".join(problems) or "none is registered"
        raise NoPlacement(f"no prefill or mixed instance of topic {topic!r} can take the "
                          f"request ({why})")
    first = blurred_least_load(firsts, prefill_step(request.prompt_len), rng)
    if first.role is Role.MIXED:
        return Placement(first)
    pairs = [d for d in decodes if pair_problem(first.instance, d.instance) is None]
    decode = blurred_least_load(pairs, min(len(pairs), 10), rng)
    protocol = choose_protocol(first.instance, decode.instance)
    assert protocol is not None  # pair_problem said they have one
    return Placement(first, decode, protocol)
