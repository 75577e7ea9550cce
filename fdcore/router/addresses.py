"""Where a registering instance lives: its resolved addresses, checked against the allow-list
and against the router's own listen address."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from fdcore.config import RouterConfig
from fdcore.http import APIError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _normal(text: str) -> IPAddress:
    ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def literal(host: str) -> frozenset[str]:
    """``host`` itself, normalised, when it is an IP address; else nothing."""
    try:
        return frozenset({str(_normal(host))})
    except ValueError:
        return frozenset()


async def resolve(host: str) -> frozenset[str]:
    """Every IP address ``host`` names (just itself for an IP address).

    Raises :class:`APIError` (400) for a name that does not resolve.
    """
    if found := literal(host):
        return found
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise APIError(400, f"host_ip: cannot resolve {host!r}: {exc}",
                       param="host_ip") from None
    return frozenset(str(_normal(str(info[4][0]))) for info in infos)


def is_local(address: str) -> bool:
    """Whether ``address`` is one of this machine's: loopback, unspecified, or an interface's.

    Binding a socket succeeds only for a local address, which covers every interface without
    listing them.
    """
    ip = _normal(address)
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((str(ip), 0))
    except OSError:
        return False
    return True


class RegistrationRules:
    """``manager.register-allow-networks`` and "never the router itself", for ``/register``."""

    def __init__(self, config: RouterConfig) -> None:
        self.networks = [ipaddress.ip_network(n) for n in config.manager.register_allow_networks]
        self.host = config.server.host
        self.port = config.server.port

    async def check(self, host: str, port: int) -> frozenset[str]:
        """Resolve ``host`` and apply the rules; return its addresses.

        Raises :class:`APIError`: 403 for an address outside the allow-list, 400 for the
        router's own port on a local address (an instance that would be the router itself).
        """
        addresses = await resolve(host)
        if self.networks:
            outside = sorted(a for a in addresses
                             if not any(_normal(a) in net for net in self.networks))
            if outside:
                raise APIError(
                    403, f"host_ip: {host} ({', '.join(outside)}) is outside the networks "
                         "allowed to register (manager.register-allow-networks)",
                    type_="permission_error", param="host_ip",
                )
        if port == self.port:
            try:
                own = await resolve(self.host)
            except APIError:  # a listen host that no longer resolves: the local check stays
                own = frozenset()
            if any(a in own or is_local(a) for a in addresses):
                raise APIError(400, "cannot register the router itself", param="host_ip")
        return addresses
