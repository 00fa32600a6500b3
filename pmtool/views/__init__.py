"""What the operator sees: views of the state folder and the server.

`status` (what runs now, a task's story, what it cost), `metrics` (Prometheus text, and the
endpoint `run --metrics-addr` serves), `fleet` (every agent, task and lock the server
knows) only read. `health` checks before a claim and repairs as it checks: a corrupt task
record's task goes back to the server (through pmtool.work.recover).
"""
