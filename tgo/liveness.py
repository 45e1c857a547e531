"""Telling a live worker from a dead one, for run leases (tgo.tracking) and Optuna trials
(tgo.storage): who this process is, whether a process exists on this host, and how often a live
one says so.

    TGO_HEARTBEAT_INTERVAL   seconds between a live process's renewals (default 60)
    TGO_GRACE_PERIOD         seconds without renewal after which a process elsewhere counts as dead (default 180)

Both are read when used, so a setting made after import (a test, a notebook) takes effect.
"""

from __future__ import annotations

import os
import socket

DEFAULT_HEARTBEAT_INTERVAL = 60  # seconds
DEFAULT_GRACE_PERIOD = 180


def _seconds(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    return int(text) if text else default


def heartbeat_interval() -> int:
    """Seconds between a live process's heartbeats (TGO_HEARTBEAT_INTERVAL, default 60)."""
    return _seconds("TGO_HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT_INTERVAL)


def grace_period() -> int:
    """Seconds without a heartbeat after which a process on another host counts as dead
    (TGO_GRACE_PERIOD, default 180)."""
    return _seconds("TGO_GRACE_PERIOD", DEFAULT_GRACE_PERIOD)


def worker_id() -> str:
    """This process, as "<host>:<pid>" (the owner of a trial or of a run's lease)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
