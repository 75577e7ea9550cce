"""Every hook fdcore calls. Plugins implement them with :data:`fdcore.hookimpl`.

All hooks run once at start-up, when the app factory builds its plugin manager; none runs per
request. Each receives a :class:`fdcore.registry.Register` bound to the implementing plugin, so
a duplicate component name can be reported with both plugins' names, and a
:class:`fdcore.types.HostInfo` saying which process loads the plugin.

Implementations are called through pluggy's argument binding: an implementation declares only
the arguments it uses (``def fdcore_register_policies(register): ...`` is complete), so a hook
can gain an argument without breaking it. Register hooks take plain implementations: one
declared ``wrapper=True`` or ``hookwrapper=True`` is refused at load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from fdcore.registry import Register
    from fdcore.types import HostInfo

hookspec = pluggy.HookspecMarker("fdcore")


@hookspec
def fdcore_register_policies(register: Register, host: HostInfo) -> None:
    """Register selection-policy classes.

    :param register: call ``register.add_policy(cls)`` for each class. ``cls`` follows
        :class:`fdcore.types.SelectionPolicy`: a unique ``name`` (what ``scheduler.policy``,
        ``scheduler.prefill-policy`` and ``scheduler.decode-policy`` select), a strict
        ``Config`` model whose kebab-case fields are read from the router's ``scheduler:``
        section, and a constructor ``cls(config, context: PolicyContext)``.
    :param host: which process loads the plugin (``host.process``: ``router``, ``engine`` or
        ``cli``) and the fdcore version; declare it only if you use it.
    :return: nothing; the return value is ignored.

    Called once per plugin manager, before the router builds its policies.
    """


@hookspec
def fdcore_register_schedulers(register: Register, host: HostInfo) -> None:
    """Register engine-side scheduler classes.

    :param register: call ``register.add_scheduler(cls)``. ``cls`` follows
        :class:`fdcore.types.Scheduler`; ``--scheduler-name`` selects it, its ``Config``
        fields come from the ``--scheduler-*`` flags (or ``scheduler:`` in ``engine.yaml``),
        and it is built as ``cls(config, context: SchedulerContext)``.
    :param host: which process loads the plugin (``host.process``: ``router``, ``engine`` or
        ``cli``) and the fdcore version; declare it only if you use it.
    :return: nothing; the return value is ignored.

    Called once when an engine starts, before it builds its scheduler.
    """


@hookspec
def fdcore_register_transports(register: Register, host: HostInfo) -> None:
    """Register KV-cache transport classes.

    :param register: call ``register.add_transport(cls)``. ``cls`` follows
        :class:`fdcore.types.Transport`; an engine builds the ones named by
        ``--cache-transfer-protocol``.
    :param host: which process loads the plugin (``host.process``: ``router``, ``engine`` or
        ``cli``) and the fdcore version; declare it only if you use it.
    :return: nothing; the return value is ignored.

    Called once when an engine starts.
    """


@hookspec
def fdcore_register_health_checks(register: Register, host: HostInfo) -> None:
    """Register health-check classes.

    :param register: call ``register.add_health_check(cls)``. ``cls`` follows
        :class:`fdcore.types.HealthCheck`; ``manager.health-check`` selects it (default
        ``http``), its ``Config`` is read from ``manager.health-check-options`` and it is built
        as ``cls(config, context: HealthContext)``.
    :param host: which process loads the plugin (``host.process``: ``router``, ``engine`` or
        ``cli``) and the fdcore version; declare it only if you use it.
    :return: nothing; the return value is ignored.

    Called once per plugin manager, before the health manager starts.
    """
