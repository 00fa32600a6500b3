"""A fleet on one machine: `pmtool run --agents N`, one poller per role and level however
many processes share the state folder, an adaptive poll, claims in parallel, a read-back
that asks only for what it needs, and the fleet benchmark in its smallest configuration."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import ROOT, World, events, wait_for
from pmtool.client import PMClient
from pmtool.errors import NothingToDo, UsageError
from pmtool.records import RecordStore
from pmtool.run.fleet import agent_ids, fleet_code
from pmtool.run.poller import Poller
from pmtool.testing.seed import Seeder
from pmtool.work import claim as work

ROLE, LEVEL = "backend_dev", "senior"
NEXT = "GET /api/v1/tasks/next"


@pytest.fixture
def private(make_standin: Callable[..., Any]) -> tuple[Any, PMClient, Seeder]:
    key = f"k-{secrets.token_hex(8)}"
    server = make_standin(api_key=key, production=True)
    return server, PMClient(server.url, key), Seeder(server.url, key)


def test_agent_ids() -> None:
    assert agent_ids(["dev"], 3) == ["dev-1", "dev-2", "dev-3"]
    assert agent_ids(["a", "b"], None) == ["a", "b"]
    assert agent_ids(["solo"], None) == ["solo"]
    with pytest.raises(UsageError):
        agent_ids(["a", "b"], 2)
    with pytest.raises(UsageError):
        agent_ids(["a", "a"], None)
    assert fleet_code([0, 3, 3]) == 0 and fleet_code([3, 3]) == 3 and fleet_code([0, 5]) == 5


def test_three_agents_finish_six_tasks_each_once(world: World) -> None:
    tasks = [world.task(title=f"fleet {i}")["id"] for i in range(6)]
    run = world.run("--agents", "3", "--agent-id", "fl", "--max-tasks", "2",
                    "--poll-interval", "0.1", "--poll-max", "0.4", timeout=180)
    assert run.code == 0, run.stderr[-2000:]
    finished = run.of("finished")
    assert sorted(e["task_id"] for e in finished) == sorted(tasks)
    assert {e["agent"] for e in finished} == {"fl-1", "fl-2", "fl-3"}
    assert all(e["outcome"] == "done" for e in finished)
    claimed = run.of("claimed")
    assert sorted(e["task_id"] for e in claimed) == sorted(tasks)  # no task claimed twice
    for task_id in tasks:
        assert world.status(task_id)["status"] == "dev_done"
        moves = [c for c in world.seeder.changelog(500)
                 if c["task_id"] == task_id and c["new_status"] == "dev_done"]
        assert len(moves) == 1
    stopped = run.of("stopped")
    assert sorted(e["agent"] for e in stopped) == ["fl-1", "fl-2", "fl-3"]


def test_a_signal_stops_every_agent_after_its_step_and_keeps_their_records(
        world: World) -> None:
    tasks = [world.task(title=f"long {i}")["id"] for i in range(2)]
    proc = world.start("--agents", "2", "--agent-id", "sig", "--poll-interval", "0.1",
                       env={"PMTOOL_FAKE_AGENT_SLEEP": "2"})
    for agent in ("sig-1", "sig-2"):
        wait_for(lambda a=agent: (r := world.store.load(a)) and r.session_id,
                 what=f"{agent}'s agent to start")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    got = events(out)
    assert sorted(e["agent"] for e in got if e["event"] == "agent") == ["sig-1", "sig-2"]
    assert not [e for e in got if e["event"] == "finished"]  # stopped after the agent step
    stopped = [e for e in got if e["event"] == "stopped"]
    assert sorted(e["agent"] for e in stopped) == ["sig-1", "sig-2"]
    assert all(e["record_kept"] for e in stopped)
    assert all(world.status(t)["status"] == "under_work" for t in tasks)


def test_processes_sharing_a_state_folder_poll_as_one(world: World) -> None:
    args = ("--agents", "2", "--idle-poll", "60", "--poll-interval", "0.1",
            "--poll-max", "0.1")
    first = world.start(*args, "--agent-id", "one")
    second = world.start(*args, "--agent-id", "two")
    procs = [first, second]
    try:
        # Every agent of both processes is up and waiting once all four registered.
        wait_for(lambda: len(world.server.requests("POST /api/v1/register")) >= 4,
                 what="four registrations")
        start = len(world.server.requests(NEXT))
        wait_for(lambda: len(world.server.requests(NEXT)) >= start + 10, what="ten polls")
        task = world.task(title="seen by the one poller")
        wait_for(lambda: world.status(task["id"])["status"] != "created", what="a claim")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        outs = [proc.communicate(timeout=60)[0] for proc in procs]
    polls = world.server.requests(NEXT)
    pollers = {p["user_agent"] for p in polls}
    assert len(pollers) == 1, pollers  # one process polled for both
    assert pollers <= {f"pmtool (pid {p.pid})" for p in procs}
    claims = [e for out in outs for e in events(out) if e["event"] == "claimed"]
    assert [e["task_id"] for e in claims] == [task["id"]]


def _waiter(poller: Poller, stop: threading.Event) -> threading.Thread:
    def wait() -> None:
        seen = 0
        while not stop.is_set():
            offer = poller.wait(seen, 0.5, stop)
            if offer:
                seen = offer.seq
    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def test_poll_backs_off_while_idle_and_snaps_back(private: Any, tmp_path: Path) -> None:
    server, client, seeder = private
    poller = Poller(client, tmp_path / "state", ROLE, LEVEL, interval=0.05, maximum=0.4)
    stop = threading.Event()
    thread = _waiter(poller, stop)
    try:
        wait_for(lambda: sum(o.interval == 0.4 for o in poller.history) >= 2,
                 what="the poll backed off to its cap")
        seeder.create_task(title="wakes the poll")
        wait_for(lambda: any(o.task for o in poller.history), what="the task seen")
        found = next(i for i, o in enumerate(poller.history) if o.task)
        wait_for(lambda: len(poller.history) > found + 1, what="a poll after the find")
    finally:
        stop.set()
        poller.close()
        thread.join(5)
    history = list(poller.history)
    idle = [o.interval for o in history[:found]]
    assert idle[:4] == [0.1, 0.2, 0.4, 0.4]  # doubling from poll_interval to poll_max
    assert history[found].interval == 0.05  # snapped back once work came in
    assert [o.seq for o in history] == list(range(1, len(history) + 1))
    assert len(server.requests(NEXT)) == poller.polls


def test_claims_on_one_machine_overlap(private: Any, tmp_path: Path) -> None:
    _server, client, seeder = private
    for i in range(2):
        seeder.create_task(title=f"parallel {i}")
    store = RecordStore(tmp_path / "state")
    # Each claim waits in its settle for the other to reach its own settle: under a
    # machine-wide lock held through the settle, the second could never get there.
    both_settling = threading.Barrier(2, timeout=20)
    results: dict[str, Any] = {}

    def claim(agent: str) -> None:
        settles: list[float] = []

        def settle(seconds: float) -> None:
            settles.append(seconds)
            if len(settles) == 1:  # the first settle of each; a lost race settles again
                both_settling.wait()

        try:
            results[agent] = work.claim(PMClient(client.url, _server.api_key), store, agent, ROLE,
                                        LEVEL, options=work.ClaimOptions(settle=0.0, sleep=settle))
        except Exception as exc:  # reported below
            results[agent] = exc

    threads = [threading.Thread(target=claim, args=(f"par-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    got = {agent: r.task["id"] for agent, r in results.items() if isinstance(r, work.Claimed)}
    assert len(got) == 2, results
    assert len(set(got.values())) == 2


def test_claim_read_back_asks_for_status_and_role(private: Any, tmp_path: Path) -> None:
    server, client, seeder = private
    for i in range(3):  # history the read-back must not have to page through
        done = seeder.create_task(title=f"old {i}")
        seeder.set_status(done["id"], "committed")
    task = seeder.create_task(title="to claim")
    before = len(server.requests("GET /api/v1/tasks"))
    claimed = work.claim(client, RecordStore(tmp_path / "state"), "rb-1", ROLE, LEVEL,
                         options=work.ClaimOptions(settle=0.0))
    assert claimed.task["id"] == task["id"]
    reads = server.requests("GET /api/v1/tasks")[before:]
    assert reads, "the claim read the task back"
    assert all(r["query"] == {"status": "created", "role": ROLE} for r in reads), reads


def test_a_task_offered_a_moment_too_early_is_not_worked_again(private: Any,
                                                               tmp_path: Path) -> None:
    # A poll saw the task created; it was finished before the claim: the lock endpoint
    # looks at no status, so only the read-back can tell.
    _server, client, seeder = private
    task = seeder.create_task(title="finished meanwhile")
    seeder.set_status(task["id"], "dev_done")
    with pytest.raises(NothingToDo):
        work.claim(client, RecordStore(tmp_path / "state"), "late-1", ROLE, LEVEL,
                   options=work.ClaimOptions(settle=0.0), first=task)
    after = seeder.get_task(task["id"])
    assert (after["status"], after["locked_by"]) == ("dev_done", None)  # lock put down


def test_fleet_benchmark_smallest(tmp_path: Path) -> None:
    bench = ROOT / "benchmarks" / "fleet.py"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PMTOOL_TEST_PM_URL", "PMTOOL_TEST_PM_KEY")}
    proc = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True,
                          text=True, env={**env, "TMPDIR": str(tmp_path)}, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"claims run twice\s+0\s", proc.stdout), proc.stdout
    assert "did not finish" not in proc.stdout, proc.stdout


def test_counting_proxy_passes_answers_through_and_counts(pm_server: Any) -> None:
    """fleet.py counts a real server's requests through this proxy: what passes it must be
    what the server said (answers, 4xx, a dead server as a 5xx), and each request counted."""
    from pmtool.errors import ApiError, AuthError, ServerError
    from pmtool.testing.countproxy import CountingProxy

    proxy = CountingProxy(pm_server.url).start()
    try:
        direct = PMClient(pm_server.url, pm_server.api_key, retries=0)
        through = PMClient(proxy.url, pm_server.api_key, retries=0)
        agent = f"proxy-{secrets.token_hex(3)}"
        assert through.register(agent, ROLE, LEVEL)["agent"]["agent_id"] == agent
        assert through.next_task(ROLE, "junior") == direct.next_task(ROLE, "junior")
        with pytest.raises(ApiError) as err:
            through.lock(2**31 - 1, agent)  # no such task: the server's 404, as it was
        assert err.value.status == 404
        with pytest.raises(AuthError):
            PMClient(proxy.url, "not-the-key", retries=0).register(agent, ROLE, LEVEL)
        assert proxy.counts() == {"POST /api/v1/register": 2, "GET /api/v1/tasks/next": 1,
                                  "POST /api/v1/tasks/2147483647/lock": 1}
        assert proxy.total() == 4
    finally:
        proxy.stop()
    dead = CountingProxy(proxy.url).start()  # its upstream is gone now
    try:
        with pytest.raises(ServerError):
            PMClient(dead.url, pm_server.api_key, retries=0).next_task(ROLE, LEVEL)
        assert dead.total() == 1
    finally:
        dead.stop()


def test_one_client_keeps_few_requests_open_however_many_threads_call() -> None:
    """`run --agents 200` shares one client: 200 registrations at once wedged a real
    server (quirk 7), so the client holds at most MAX_IN_FLIGHT open; the rest wait."""
    import json
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pmtool.client import MAX_IN_FLIGHT

    seen = {"now": 0, "most": 0}
    guard = threading.Lock()

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with guard:
                seen["now"] += 1
                seen["most"] = max(seen["most"], seen["now"])
            time.sleep(0.05)  # a server busy enough that the calls overlap
            with guard:
                seen["now"] -= 1
            body = json.dumps({"agent": {"role": ROLE, "level": LEVEL}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = PMClient(f"http://127.0.0.1:{server.server_address[1]}", "k")
        callers = [threading.Thread(target=client.register, args=(f"a-{i}", ROLE, LEVEL))
                   for i in range(64)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(60)
    finally:
        server.shutdown()
        server.server_close()
    assert seen["now"] == 0
    # Without the cap, 64 threads had about 40 open at once here; with it, 8 at most.
    assert 1 < seen["most"] <= min(MAX_IN_FLIGHT, 15), seen
