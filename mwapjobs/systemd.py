"""systemd's notification protocol: READY, STOPPING, STATUS and watchdog pings.

The protocol is one datagram on the socket named by $NOTIFY_SOCKET, so it is
written here rather than pulled in as a dependency. Outside systemd (no
socket), every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to systemd; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify failed", extra={"error": str(exc)})
        return False


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, if systemd asked this process for pings. The daemon pings from
    a task on its event loop, so a frozen loop stops the pings and systemd restarts it."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


async def ping_watchdog() -> None:
    notify("WATCHDOG=1")
