"""Ports for servers a test starts in another process (a daemon, the wire server, an SMTP
receiver), which bind them a moment after they were picked.

The kernel hands out a port just released by `bind(0)` again, so two picks in a row can
return the same one, and two daemons were then given one port (one could not listen, the
other answered for both). A port is never given out twice in one test session here.
"""

from __future__ import annotations

import socket
import threading

_given: set[int] = set()
_lock = threading.Lock()


def free_port() -> int:
    """A port free now on 127.0.0.1 that this test session has not handed out before."""
    with _lock:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _given:
                _given.add(port)
                return port
