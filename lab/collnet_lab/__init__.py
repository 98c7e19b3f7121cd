"""collnet_lab: the lab around the daemon, not shipped inside it.

A local cluster of real processes on loopback (``localcluster``), the demo of
``collnet up`` (``up``, and ``worker``: one trainer process per peer), the
chaos runs of ``collnet chaos`` (``chaos``) and their CLI commands (``cli``).
The lab drives daemons through the SDK (``collnet_client``); the daemon
(``collnet_daemon``) imports nothing of it and loads ``cli`` only when one of
its commands is run or listed.
"""
