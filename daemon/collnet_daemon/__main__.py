from collnet_daemon.cli import main

main()
