"""The labeling app's server: a listening socket, bound before the server starts so the real port is
known, and uvicorn over it with per-connection deadlines and a connection cap (connections.py)."""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What keeps the server answering while slow, idle or hostile clients hold connections (seconds)."""

    header_timeout: float = 10.0  # a request head must be complete this long after the connection opens
    body_timeout: float = 20.0  # its body this long after the head (64 KiB at most: see app.MAX_BODY)
    keep_alive: float = 5.0  # an idle connection is closed after this long between requests
    max_connections: int = 512  # open at once; one more closes the longest-waiting idle or slow one


def listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family)
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    # accepted connections inherit this; without it a keep-alive response waits ~40 ms for a delayed ACK
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def url_of(sock: socket.socket) -> str:
    """The address a browser opens for a listening socket: the host and the port actually bound (port 0
    asks the system for a free one), with IPv6 hosts in brackets."""
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def make_server(app, limits: Limits = Limits()):
    """A uvicorn.Server for `app` (HTTP/1.1 through connections.GuardedH11Protocol with these limits, no
    access log: it would show the page's ?token=...); start it with `.run(sockets=[listen(...)])`."""
    import uvicorn

    from scoreaction.feedback.connections import GuardedH11Protocol

    protocol = type("LimitedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
    return uvicorn.Server(uvicorn.Config(app, http=protocol, log_level="warning", access_log=False,
                                         timeout_keep_alive=limits.keep_alive))
