"""The continuous runner: the loop, the machine's poller, several agents in one process,
the demo. Only `pmtool.cli` imports it."""
