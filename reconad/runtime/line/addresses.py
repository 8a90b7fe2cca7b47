"""Where a client reaches a server of the line: the URL an RTSP output prints (``client_url``) and this
machine's non-loopback addresses (``local_addresses``), found without DNS or network traffic."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

SIOCGIFADDR = 0x8915  # Linux netdevice(7): an interface's IPv4 address
WATCH_WITH = "watch with ffplay or VLC"


def local_addresses() -> tuple[str, ...]:
    """This machine's non-loopback IPv4 addresses, one per interface that has one, read from the kernel
    (netdevice(7) SIOCGIFADDR; no DNS, no packet sent); () where that is not available (not Linux)."""
    import fcntl
    import struct

    addresses = []
    try:
        interfaces = socket.if_nameindex()
    except OSError:
        return ()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in interfaces:
            try:
                answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            address = socket.inet_ntoa(answer[20:24])
            if not ipaddress.ip_address(address).is_loopback and address not in addresses:
                addresses.append(address)
    return tuple(addresses)


def client_url(host: str, port: int, mount: str, hostname: str | None = None,
               addresses: Sequence[str] | None = None) -> tuple[str, str]:
    """(the URL a client opens, who can reach it) for an RTSP server bound to ``host``:``port``.

    Bound to every interface (``0.0.0.0``, ``::``), the URL names this machine by ``hostname``
    (default ``socket.gethostname()``, not resolved: no lookup that could hang) and the note lists the
    URL by each of ``addresses`` (default ``local_addresses()``), for a client whose DNS does not know the
    name. A named address is the URL itself; loopback is reachable from this machine only.
    """
    def url(address: str) -> str:
        return f"rtsp://{f'[{address}]' if ':' in address else address}:{port}{mount}"

    if host == "localhost" or ipaddress.ip_address(host).is_loopback:
        return url(host), f"reachable from this machine only; {WATCH_WITH}"
    if not ipaddress.ip_address(host).is_unspecified:
        return url(host), WATCH_WITH
    addresses = local_addresses() if addresses is None else addresses
    name = socket.gethostname() if hostname is None else hostname
    if not name or name == "localhost":
        name = addresses[0] if addresses else host
    also = [url(address) for address in addresses if address != name]
    return url(name), f"listening on all interfaces{', also ' + ', '.join(also) if also else ''}; {WATCH_WITH}"
