"""What the operator sees: views of the state folder and of the server, one module each.

- `status`: what runs now, a task's story, what it cost (`status`, `logs`, `report`);
- `metrics`: the Prometheus text (`metrics`) and the endpoint of `run --metrics-addr`;
- `fleet`: every agent, task and lock the server knows (`fleet`);
- `health`: is this machine fit to run agents (`health`, and `run` before a claim).

They read, with three exceptions, each said where it happens: `metrics` keeps what it
counted so far in the state folder (`metrics-fold.json`, derived, rebuilt when missing) and
writes the file `--output` names; `health` writes a probe file to check the disk, and
repairs as it checks: it removes the temp files a killed write left and gives a corrupt
record's task back to the server (through pmtool.work.recover, which is why the views stand
on the run floor). What acts on the operator's word lives with what it acts on: deleting
old logs in pmtool.state, the notify hook in pmtool.hooks, `init` in pmtool.config.
"""
