"""A task's life on this machine: the protocol claim, exec, finish and recover speak with
the server, each step kept in the agent's task record."""
