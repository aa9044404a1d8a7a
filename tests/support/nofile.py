"""`python -m tests.support.nofile N ARGS...`: run `mwapjobs ARGS...` with at most N open
file descriptors, as a unit's LimitNOFILE would."""

from __future__ import annotations

import resource
import sys

from mwapjobs.cli import main

if __name__ == "__main__":
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    sys.exit(main(sys.argv[2:]))
