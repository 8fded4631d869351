"""`scoreaction feedback serve`: the labeling web app, with the limits that keep it answering under slow
clients (feedback/server.py) and the fastest answer it accepts (feedback/store.py)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from dataclasses import dataclass

from scoreaction.cli.feedback import DEFAULT_PORT, StoreOptions, read_options
from scoreaction.config import check_nonnegative_int, check_positive_int, check_range, check_text, option
from scoreaction.errors import ConfigError
from scoreaction.feedback.server import Limits, listen, make_server, url_of
from scoreaction.feedback.store import MIN_RESPONSE_MS


@dataclass
class ServeOptions(StoreOptions):
    host: str = option("127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    port: int = option(DEFAULT_PORT, help="port (0: any free port)")
    question: str = option("Which sample do you prefer?", help="the question shown above each pair")
    min_response_ms: float = option(MIN_RESPONSE_MS, help="answers sooner than this after their pair was shown "
                                                          "(or after the labeler's previous answer) are refused")
    header_timeout: float = option(Limits.header_timeout, help="seconds a client has to send a request's headers")
    body_timeout: float = option(Limits.body_timeout, help="seconds a client has to send a request's body")
    max_connections: int = option(Limits.max_connections, help="connections open at once (one more closes the "
                                                               "longest-idle one)")

    def __post_init__(self):
        super().__post_init__()
        check_text("host", self.host)
        check_text("question", self.question)
        check_nonnegative_int("port", self.port)
        if self.port > 65535:
            raise ConfigError(f"port must be at most 65535, found {self.port}")
        check_range("min_response_ms", self.min_response_ms, 0, 60_000)
        check_range("header_timeout", self.header_timeout, 0.01, 86_400)
        check_range("body_timeout", self.body_timeout, 0.01, 86_400)
        check_positive_int("max_connections", self.max_connections)
        if self.max_connections > 100_000:
            raise ConfigError(f"max_connections must be at most 100000, found {self.max_connections}")



def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(args: argparse.Namespace) -> int:
    from scoreaction.feedback.app import create_app

    opts = read_options(args, ServeOptions)
    limits = Limits(header_timeout=opts.header_timeout, body_timeout=opts.body_timeout,
                    max_connections=opts.max_connections)
    with opts.open() as store:  # closed when the server stops: the answers are in the file, not only its WAL
        app = create_app(store, question=opts.question, min_response_ms=opts.min_response_ms)
        sock = listen(opts.host, opts.port)
        if not is_loopback(opts.host):
            sys.stderr.write("scoreaction: warning: serving beyond this machine over plain HTTP; tokens travel in "
                             "clear (put a TLS proxy in front)\n")
        url = url_of(sock)
        print(f"labeling app for {store.path} at {url}  (labelers open {url}?token=THEIR_TOKEN; Ctrl-C stops)",
              flush=True)
        try:
            make_server(app, limits).run(sockets=[sock])  # no access log: it would show the page's ?token=...
        finally:
            sock.close()
    return 0
