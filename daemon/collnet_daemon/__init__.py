"""collnet_daemon: the per-node peer daemon, the coordinator service and the CLI."""
