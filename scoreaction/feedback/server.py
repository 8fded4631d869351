"""A listening socket for the labeling app, bound before the server starts so the real port is known."""

from __future__ import annotations

import socket


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
