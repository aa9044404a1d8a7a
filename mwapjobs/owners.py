"""Who holds a lease: one name per engine, and whether a named process is gone.

A lease owner is `host:pid:boot:nonce`. `boot` identifies the machine's current
boot (the wall-clock time it booted, to ten seconds); `nonce` tells apart engines
that reuse a pid. A process on the same host and boot whose pid no longer exists
is dead for certain, so its runs can be taken back at once instead of after their
lease runs out: a crashed daemon restarted by systemd resumes its work in
seconds. Any doubt (another host, another boot, a pid that exists or that we may
not signal) means "alive": the lease decides.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

BOOT_ROUNDING = 10  # seconds
# Engines running in this process now (tests and embedders run several side by side).
LIVE: set[str] = set()


def _boot_mark() -> str:
    """When this machine booted, rounded: the same for every process of this boot."""
    booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return str(int(booted // BOOT_ROUNDING))


def process_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_boot_mark()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str, me: str) -> bool:
    """True only when `owner` was a process of this host and boot that no longer runs."""
    try:
        host, pid_text, boot, _nonce = owner.rsplit(":", 3)
        my_host, my_pid, my_boot, _ = me.rsplit(":", 3)
        pid = int(pid_text)
    except ValueError:
        return False
    if owner == me or host != my_host or boot != my_boot or pid <= 0:
        return False
    if str(pid) == my_pid:
        return owner not in LIVE  # this process, or an earlier one that had its pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists, but is not ours to signal
    return False
