"""HTTP/1.1 connections with deadlines and a cap: uvicorn's h11 protocol, guarded against slow clients.

uvicorn closes a connection that idles between requests (`timeout_keep_alive`), but not one that sends
its request head or body slowly, or nothing at all; and its `limit_concurrency` counts such connections
and answers 503 to the real requests beside them. This protocol adds, per connection:

    header_timeout   a request head (request line and headers) must be complete this many seconds after
                     the connection opens, or after the first byte of a later request: else the
                     connection is closed (no request was read, so nothing is answered)
    body_timeout     its body must be complete this many seconds after the head: else a 408 with a JSON
                     {"error": ...} is sent, the connection is closed and the app sees a disconnect
    max_connections  connections open at once; one more closes the connection that has waited longest
                     for a client to finish sending a request (an idle, slow or stalled one; the app sees a
                     disconnect), or, when every connection holds a whole request the app is answering,
                     is answered 503 and closed. Slow clients thus never crowd out a real request.

The deadlines are absolute: bytes that trickle in do not extend them.
"""

from __future__ import annotations

import json
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def raw_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response with a JSON {"error": message} body that closes the connection."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's H11Protocol with the header and body deadlines and the connection cap above; `limits`
    (a server.Limits) is set on the subclass that server.make_server builds."""

    limits = None

    def connection_made(self, transport) -> None:
        self._timer = None  # the deadline now running (an asyncio.TimerHandle), if any
        self._timed = None  # the request (uvicorn's RequestResponseCycle) whose head was read last
        self.waiting_since = time.monotonic()  # waiting for the client's request since; None while answering
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict_one():
            self.waiting_since = None
            transport.write(raw_response(503, "Service Unavailable", "too many connections; try again shortly"))
            transport.close()
            return
        self._arm(self.limits.header_timeout, self._header_late)

    def _evict_one(self) -> bool:
        """Drop the other connection that has waited longest for its client; False if none waits."""
        waiting = [c for c in self.connections if c is not self and getattr(c, "waiting_since", None) is not None
                   and not c.transport.is_closing()]
        if not waiting:
            return False
        min(waiting, key=lambda c: c.waiting_since).drop()
        return True

    def drop(self, response: bytes = b"") -> None:
        """Close the connection (after `response`, if no response was begun); the request the app may be
        reading sees a disconnect, and what it sends is ignored."""
        self._disarm()
        self.waiting_since = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() now reports a disconnect and its send() is ignored
            cycle.message_event.set()
            if response and not cycle.response_started and self.conn.our_state is h11.SEND_RESPONSE:
                self.transport.write(response)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.waiting_since is not None and self._timer is None:  # the first bytes of a later request
            self._arm(self.limits.header_timeout, self._header_late)
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        self._disarm()
        self._timed, self.waiting_since = None, time.monotonic()  # idle until the next head (keep-alive)
        super().on_response_complete()  # may start a pipelined request
        self._follow()

    def connection_lost(self, exc) -> None:
        self._disarm()
        self.waiting_since = None
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Move the deadline on after uvicorn has read what arrived: a new head starts the body's
        deadline, a complete body ends it."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or self.transport.is_closing():
            return
        if cycle is not self._timed:  # a request head was read
            self._timed = cycle
            self._disarm()
            if cycle.more_body:
                self._arm(self.limits.body_timeout, self._body_late)
            else:
                self.waiting_since = None
        elif not cycle.more_body and self.waiting_since is not None:  # its body is complete
            self._disarm()
            self.waiting_since = None

    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_late(self) -> None:
        self._timer = None
        if self.waiting_since is not None and not self.transport.is_closing():
            self.drop()  # no request was read: nothing to answer

    def _body_late(self) -> None:
        self._timer = None
        cycle = self.cycle
        if cycle is not None and cycle is self._timed and cycle.more_body and not self.transport.is_closing():
            self.drop(raw_response(408, "Request Timeout",
                                   f"the request body was not received within {self.limits.body_timeout:g} s"))
