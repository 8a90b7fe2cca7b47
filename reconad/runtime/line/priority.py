"""CPU priorities of the loop's threads: inference first, everything else with what it leaves.

Linux schedules threads, not processes, so each call here changes the calling thread only (and the
threads it starts later, which inherit it). Two levels below inference:

- ``lower_thread_priority``: nice +10 (``SINK_NICENESS``), for sink threads whose work is heavy but whose
  interpreter-lock hold times are short.
- ``background_thread``: Linux's SCHED_IDLE policy (``sched(7)``): the thread gets a core only when no
  normal thread wants it, and a waking inference thread preempts it at once; nice 19 where the policy is
  refused. For work with slack (the next frames' preprocessing, the render process). Its risk is
  starvation by other processes' load: callers must not wait on such a thread without a fallback
  (``line/preprocess.py`` prepares a late frame itself).

Plain ``os`` calls; nothing to install. Elsewhere than Linux the calls do nothing and say so (False/None).
"""

from __future__ import annotations

import os
import threading

SINK_NICENESS = 10  # how far below the inference threads the heavy sink threads run (Linux nice increments)
BACKGROUND_NICENESS = 19  # the lowest normal priority: under SCHED_IDLE, or where that policy is refused


def lower_thread_priority(increment: int = SINK_NICENESS) -> bool:
    """Raise the calling thread's nice value by ``increment``; False where that is not possible."""
    try:
        thread_id = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, min(19, current + increment))
    except (AttributeError, OSError):  # not Linux, or not allowed: the thread keeps the default priority
        return False
    return True


def background_thread(idle: bool = True) -> str | None:
    """Run the calling thread in the background: nice 19, then (``idle``) the SCHED_IDLE policy.

    Returns:
        ``"idle"`` (SCHED_IDLE), ``"nice 19"`` (the policy was refused or not asked for), or None where
        neither could be set (not Linux): the thread keeps its priority.
    """
    lowered = lower_thread_priority(BACKGROUND_NICENESS)
    if idle:
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except (AttributeError, OSError):
            pass
    return f"nice {BACKGROUND_NICENESS}" if lowered else None
