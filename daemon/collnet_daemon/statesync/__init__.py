"""Shared-state sync on one daemon: the transfer (transfer.py) and a trainer's
request with its coordinator barriers (requests.py)."""

from collnet_daemon.statesync.transfer import StateSync, check_declarations

__all__ = ["StateSync", "check_declarations"]
