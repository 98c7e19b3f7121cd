"""The collective engine: the router and the run of one collective as pure machines.

``Router`` (router.py) takes every data-plane event of one peer and returns
``EngineAction``s (actions.py); ``Run`` (run.py) wraps one collective's
sans-I/O schedule. The daemon's executor performs the actions on links and
futures; tests drive the same machines with ``tests/unit/routersim.py``.
"""

from collnet.engine.actions import (
    AbortedEarly,
    EngineAction,
    Failed,
    Finished,
    SendAbort,
    Settled,
    Transmit,
)
from collnet.engine.router import Router
from collnet.engine.run import Run

__all__ = [
    "AbortedEarly",
    "EngineAction",
    "Failed",
    "Finished",
    "Router",
    "Run",
    "SendAbort",
    "Settled",
    "Transmit",
]
