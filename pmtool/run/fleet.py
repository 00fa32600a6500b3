"""Many agents on one machine: N `Runner`s of one role in one process (`pmtool run --agents
N`), each with its own agent id, record, worktrees and agent process, sharing one `PMClient`
(its connection pool sized for N), one `pmtool.run.poller.Poller` and one health check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pmtool.errors import EXIT_NOTHING, EXIT_OK
from pmtool.run.poller import Poller, SharedHealth, process_agent

if TYPE_CHECKING:
    from pmtool.client import PMApi


def agent_ids(given: list[str], agents: int | None) -> list[str]:
    """The fleet's agent ids: `--agent-id` repeated, or `<agent-id>-1..N` for `--agents N`."""
    from pmtool.errors import UsageError

    if not given:
        raise UsageError("give --agent-id")
    if agents is None:
        ids = list(given)
    elif len(given) > 1:
        raise UsageError("give one --agent-id with --agents N, or repeat --agent-id",
                         hint="--agents 3 --agent-id dev makes dev-1, dev-2, dev-3")
    elif agents < 1:
        raise UsageError(f"--agents {agents}: give 1 or more")
    else:
        ids = [f"{given[0]}-{i}" for i in range(1, agents + 1)]
    if len(set(ids)) != len(ids):
        raise UsageError("the agent ids repeat: " + ", ".join(ids))
    from pmtool.state import check_agent_id

    for one in ids:  # <agent-id>-N may be longer than any id given
        check_agent_id(one)
    return ids


class Fleet:
    """N runners of one role and level in one process; `run()` answers one exit code."""

    def __init__(self, settings: Any, opts_list: list[Any],
                 emit: Callable[[dict[str, Any]], None],
                 progress: Callable[[str], None] = lambda _msg: None,
                 client: PMApi | None = None) -> None:
        from pmtool.client import PMClient
        from pmtool.run.loop import Runner

        first = opts_list[0]
        # One connection pool for all: the runners, the poller and the heartbeats, with at
        # most MAX_IN_FLIGHT requests open at the server at once.
        self.client = client or PMClient(settings.api_url, settings.api_key,
                                         timeout=settings.http_timeout, agent=process_agent())
        self.poller = Poller(self.client, settings.state_path, first.role, first.level,
                             first.poll_interval, first.poll_max)
        health = SharedHealth(first.health_interval)
        lock = threading.Lock()

        def emit_locked(event: dict[str, Any]) -> None:
            with lock:  # one whole line per event, whichever thread sends it
                emit(event)

        self.runners = [Runner(settings, opts, emit_locked, progress=progress,
                               client=self.client, poller=self.poller, health=health)
                        for opts in opts_list]
        self.codes: list[int | None] = [None] * len(self.runners)

    def request_stop(self) -> None:
        """First call: every runner stops after its current step; second: ends agents now."""
        for runner in self.runners:
            runner.request_stop()
        self.poller.wake()

    def run(self) -> int:
        def work(i: int) -> None:
            try:
                self.codes[i] = self.runners[i].run()
            except Exception as exc:  # one runner's bug must not take the others down
                self.runners[i].progress(f"runner crashed: {type(exc).__name__}: {exc}")
                self.codes[i] = 1

        threads = [threading.Thread(target=work, args=(i,), name=f"pmtool-{r.opts.agent_id}")
                   for i, r in enumerate(self.runners)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.5)  # a bounded join keeps the main thread free for signals
        finally:
            self.poller.close()
        return fleet_code([c if c is not None else 1 for c in self.codes])


def fleet_code(codes: list[int]) -> int:
    """One exit code for the fleet: the first failure; else 0 if any runner worked (or all
    ended well); 3 only if every runner found nothing."""
    failures = [c for c in codes if c not in (EXIT_OK, EXIT_NOTHING)]
    if failures:
        return failures[0]
    return EXIT_NOTHING if codes and all(c == EXIT_NOTHING for c in codes) else EXIT_OK
