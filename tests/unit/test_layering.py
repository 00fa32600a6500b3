"""The layering the README promises: the floors of the package (cli > run > work > ledger,
preflight > the rest > the ground), no import circles, only `pmtool/cli/` knows
typer, only the client speaks HTTP (through the standard library's http.client: no requests
anywhere in pmtool), and the library imports neither behind the CLI's back.

Every check walks every subfolder and sees imports inside functions too: a lazy import
is still a dependency, it only moves its cost to the call."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pmtool

PACKAGE = Path(pmtool.__file__).parent
ROOT = PACKAGE.parent

def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def importers(module: str) -> set[str]:
    return {str(path.relative_to(ROOT)) for path in sorted(PACKAGE.rglob("*.py"))
            if module in imported_modules(path)}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {name for name, p in MODULES.items() if p.name == "__init__.py"}


def pmtool_imports(path: Path) -> set[str]:
    """The pmtool modules `path` imports, at any depth: `from pmtool.work import claim`
    is pmtool.work.claim, `from pmtool.work.claim import x` too; a package's own
    __init__ (a docstring) is no dependency."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pmtool."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "pmtool":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in MODULES)
    return {m for m in found if m in MODULES and m not in PACKAGES}


GRAPH = {name: pmtool_imports(path) - {name} for name, path in MODULES.items()}

# The floors, top down: a module imports only from its own floor or the floors below it.
# The ground is what everything may use; the pure failure policy stands there since the
# agent classifies its own stops with it and the ledger, claim and loop act on it.
FLOORS = [
    ("cli", ("pmtool.cli", "pmtool.__main__")),
    # The operator's views stand with run: health repairs as it checks (a corrupt record's
    # task goes back through work.recover) and the fleet view reads the server as recover
    # does; only cli and run use them.
    ("run", ("pmtool.run", "pmtool.views")),
    ("work", ("pmtool.work",)),
    ("before a claim", ("pmtool.ledger", "pmtool.preflight")),
    ("the rest", ("pmtool.agent", "pmtool.testing", "pmtool.config", "pmtool.models",
                  "pmtool.records", "pmtool.state", "pmtool.hooks", "pmtool.worktree",
                  "pmtool.client", "pmtool.settings")),
    ("ground", ("pmtool.procs", "pmtool.keeper", "pmtool.errors", "pmtool.faults",
                "pmtool.git", "pmtool.failure_policy", "pmtool.results")),
]


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def floor(module: str) -> int:
    """0 for the top floor (cli); higher is lower."""
    for level, (_name, prefixes) in enumerate(FLOORS):
        if within(module, *prefixes):
            return level
    raise AssertionError(f"{module} stands on no floor: add it to FLOORS")


def test_every_module_stands_on_a_floor():
    assert len(MODULES) > 40  # the walk found the subfolders
    for name in MODULES:
        if name != "pmtool" and name not in PACKAGES:
            floor(name)


def test_imports_go_down_the_floors_never_up():
    """cli > run (and the views) > work > (ledger, preflight) > the rest > the ground: a lower
    floor importing a higher one (at load or inside a function) is a layering bug."""
    upward = sorted(f"{m} ({FLOORS[floor(m)][0]}) imports {d} ({FLOORS[floor(d)][0]})"
                    for m, deps in GRAPH.items() if m != "pmtool" and m not in PACKAGES
                    for d in deps if floor(d) < floor(m))
    assert upward == []


def test_the_agent_knows_nothing_of_work_run_or_cli():
    """claude in, a verdict out: the agent package is usable without the task protocol."""
    found = sorted(f"{m} imports {d}" for m, deps in GRAPH.items()
                   if within(m, "pmtool.agent") for d in deps
                   if within(d, "pmtool.work", "pmtool.run", "pmtool.cli"))
    assert found == []


def test_the_failure_policy_is_pure():
    """Decisions over plain data: no pmtool module (so no I/O door) below it."""
    assert GRAPH["pmtool.failure_policy"] == set()


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    """Not even through imports inside functions, which hide a circle from Python but not
    from a reader: the lower module would have to know the upper one."""
    assert cycles(GRAPH) == []


def test_the_circle_check_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def library_files() -> list[Path]:
    """The library: everything outside the CLI and the test kits (and __main__)."""
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if p.relative_to(PACKAGE).parts[0] not in ("cli", "testing", "__main__.py")]


def test_only_the_cli_imports_typer():
    outside = {p for p in importers("typer") if not p.startswith("pmtool/cli/")}
    assert outside == set(), f"typer imported outside pmtool/cli/: {sorted(outside)}"


def test_only_the_client_speaks_http():
    """The stand-in's seeder and the counting proxy talk through pmtool.client too: one
    client. requests is for tests and benchmarks only (the test extra)."""
    assert importers("requests") == set()
    assert importers("urllib3") == set()
    # pmtool.views.metrics serves (http.server, for `run --metrics-addr`); it asks nobody.
    assert {p for p in importers("http") if not p.startswith("pmtool/testing/")} \
        == {"pmtool/client.py", "pmtool/views/metrics.py"}
    assert "http.client" not in (PACKAGE / "views" / "metrics.py").read_text()


def test_the_library_loads_without_typer_or_requests():
    """Importing every library module (outside cli/ and testing/) pulls in neither."""
    modules = sorted(module_name(p) for p in library_files())
    assert "pmtool.run.loop" in modules and "pmtool.work.claim" in modules
    code = ("import sys\n"
            + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in ('typer', 'requests', 'click') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_library_never_prints_or_exits():
    """print() and sys.exit belong to the CLI edge (and the test kits' own mains)."""
    offenders = []
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                fn = node.func
                name = (fn.id if isinstance(fn, ast.Name) else
                        f"{getattr(fn.value, 'id', '')}.{fn.attr}"
                        if isinstance(fn, ast.Attribute) else "")
                if name in ("print", "sys.exit", "exit"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert offenders == []


# Command modules that still import another command module at the top, each until its own
# change lands; the list only shrinks (it is empty: keep it so).
COMMAND_IMPORTS_PENDING: set[tuple[str, str]] = set()


def test_a_command_module_never_imports_another_at_load():
    """Lazy registration holds only if running one command loads one command module:
    shared options come from cli/options.py, which registers nothing."""
    from pmtool.cli import COMMAND_MODULES

    modules = set(COMMAND_MODULES.values())
    found = set()
    for name in modules:
        tree = ast.parse((PACKAGE / "cli" / f"{name}.py").read_text(encoding="utf-8"))
        # At any depth: an import inside a command body registers the other module's
        # commands too, and typer then builds their parameters on every call of it.
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                other = node.module.removeprefix("pmtool.cli.")
                if node.module.startswith("pmtool.cli.") and other in modules:
                    found.add((name, other))
    assert found - COMMAND_IMPORTS_PENDING == set()
    assert found >= COMMAND_IMPORTS_PENDING, "a pending import is gone: drop it from the list"


def test_colour_is_decided_in_one_place():
    """NO_COLOR and FORCE_COLOR are read by `pmtool.cli.colour` only; a command that decides
    for itself (a bare isatty, FORCE_COLOR=0 taken as on) drifts from the rest."""
    readers = {str(p.relative_to(ROOT)) for p in sorted(PACKAGE.rglob("*.py"))
               if re.search(r"NO_COLOR|FORCE_COLOR|\\033\[\{|\\033\[3\dm",
                            p.read_text(encoding="utf-8"))}
    assert readers == {"pmtool/cli/__init__.py"}


def test_messages_quote_values_plainly():
    """A person reads messages: `unknown role "dev"`, never Python's `'dev'` or `None` repr.
    `!r` is for code that is not a message: `__repr__`, and the test kit's errors to the
    programmer who wrote a bad script step (there the Python value is the point)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "testing":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        reprs = {id(n) for f in ast.walk(tree)
                 if isinstance(f, ast.FunctionDef) and f.name == "__repr__" for n in ast.walk(f)}
        offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(tree)
                      if isinstance(node, ast.FormattedValue) and node.conversion == ord("r")
                      and id(node) not in reprs]
    assert offenders == []


def test_cli_annotations_are_objects_not_strings():
    """typer reads the annotations of every registered command on each call; postponed
    (string) annotations make it eval and compile each one, which cost `pmtool --help`
    a sixth of its start-up. See pmtool/cli/__init__.py."""
    postponed = [str(p.relative_to(ROOT)) for p in sorted((PACKAGE / "cli").glob("*.py"))
                 if any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                        for n in ast.parse(p.read_text(encoding="utf-8")).body)]
    assert postponed == []


def test_a_call_builds_only_its_own_command(tmp_path: Path):
    """`pmtool claim` keeps only `claim` on the app (typer builds every command it holds,
    on every call), a later call with no command has every one back for the help; and a
    default setup (no PMTOOL_CONFIG or state folder given, on Linux) needs no platformdirs,
    and a call to the server does not read ~/.netrc (the key is a header). A claim loads
    none of the finish, recover, agent or worktree modules: their result dataclasses
    and git's module cost start-up time a claim with no task does not need."""
    code = (
        "import contextlib, io, sys\n"
        "from pmtool.cli import app, main\n"
        "main(['claim', '--agent-id', 'a', '--role', 'qa'])\n"
        "print(sorted(m for m in sys.modules if m in ('pmtool.work.finish', "
        "'pmtool.work.recover', 'pmtool.agent', 'pmtool.worktree')))\n"
        "kept = [c.name for c in app.registered_commands + app.registered_groups]\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "every = len(app.registered_commands + app.registered_groups)\n"
        "print(kept, every, 'platformdirs' in sys.modules, 'netrc' in sys.modules)\n")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "HEADLESS_PM_API_URL": "http://127.0.0.1:9", "HEADLESS_PM_API_KEY": "k" * 8}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    from pmtool.cli import COMMAND_MODULES

    linux = sys.platform.startswith("linux")
    answer, loaded, last = out.stdout.strip().splitlines()  # the claim's JSON (exit 4), ours
    assert '"ok": false' in answer
    assert loaded == "[]"
    assert last.split() == ["['claim']", str(len(COMMAND_MODULES)), str(not linux), "False"]


def test_no_test_imports_another_test_file():
    """Shared test code lives in tests/helpers.py (World, make_world, pmtool, wait_for)
    and the fixtures in tests/conftest.py: a test file imported by another drags its
    fixtures and tests along, and moves break both."""
    tests = ROOT / "tests"
    names = {p.stem for p in tests.rglob("test_*.py")}
    found = sorted(f"{p.relative_to(ROOT)} imports {m}" for p in tests.rglob("*.py")
                   if "node_modules" not in p.parts
                   for m in imported_modules(p) & names)
    assert found == []



# What starts the real claude binary in a test: its path, the skip mark that needs it, the
# environment that points it at the scripted model server.
REAL_CLAUDE = {"CLAUDE", "needs_claude", "real_claude_env", "claude_env", "find_test_claude",
               "find_claude"}


def test_only_tests_under_e2e_run_the_real_claude():
    """The `e2e` marker is set by folder (tests/conftest.py), so `-m "not e2e"` is
    claude-free only while every test that starts the real claude sits in tests/e2e/."""
    tests = ROOT / "tests"
    found = sorted(f"{p.relative_to(ROOT)} uses {name}"
                   for p in tests.rglob("test_*.py")
                   if "node_modules" not in p.parts and "e2e" not in p.relative_to(tests).parts
                   for name in used_names(p) & REAL_CLAUDE)
    assert found == []


def used_names(path: Path) -> set[str]:
    """Every name and attribute `path` mentions (`helpers.CLAUDE`, `world.real_claude_env`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return ({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            | {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               for a in n.names})


# Library functions that answer `-> dict[str, Any]` (a result's own to_json aside), per
# module: the count may only shrink. A command's answer becomes a dataclass of
# pmtool.results (its to_json gives the same keys); what stays a dict is wire data, such as
# a task row of the server, passed on as the server sent it. Fixed one? Lower its count.
DICT_ANSWERS = {
    "pmtool/agent/binary.py": 1,
    "pmtool/agent/claude.py": 2,
    "pmtool/agent/prompt.py": 3,
    "pmtool/agent/stream.py": 2,
    "pmtool/config.py": 2,
    "pmtool/failure_policy.py": 3,  # the attempt and park lines, a step as JSON
    "pmtool/hooks.py": 1,
    "pmtool/ledger.py": 2,
    "pmtool/run/demo.py": 1,
    "pmtool/run/loop.py": 1,
    "pmtool/settings.py": 1,
    "pmtool/state.py": 1,
    "pmtool/views/metrics.py": 2,
    "pmtool/views/status.py": 3,
    "pmtool/work/claim.py": 4,
    "pmtool/work/exec.py": 2,
    "pmtool/work/finish.py": 8,  # the steps it notes in the record, a transcript line
}


def test_dict_answers_only_shrink():
    """Results are typed (mypy checks attribute reads, not dict keys): no new library
    function answers a bare `dict[str, Any]`."""
    found: dict[str, int] = {}
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) \
                    and node.name != "to_json" and node.returns is not None \
                    and ast.unparse(node.returns).replace(" ", "") == "dict[str,Any]":
                name = str(path.relative_to(ROOT))
                found[name] = found.get(name, 0) + 1
    grown = {k: v for k, v in found.items() if v > DICT_ANSWERS.get(k, 0)}
    assert grown == {}, "a new dict answer: make it a pmtool.results.Result dataclass"
    shrunk = {k: v for k, v in DICT_ANSWERS.items() if found.get(k, 0) < v}
    assert shrunk == {}, "fewer dict answers: lower the pinned counts to what is found"

# Library functions over the parameter limit, each until its change lands (a dataclass of
# options, as RunOptions is for the Runner); the list only shrinks.
TOO_MANY_PARAMETERS_PENDING = {
}
MAX_PARAMETERS = 12


def test_no_library_function_takes_more_than_twelve_parameters():
    """A call with more than twelve knobs is a settings object waiting to be named."""
    found = {}
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
                if args.args and args.args[0].arg in ("self", "cls"):
                    count -= 1
                if count > MAX_PARAMETERS:
                    found[f"{path.relative_to(ROOT)}:{node.name}"] = count
    grown = {k: v for k, v in found.items() if v > TOO_MANY_PARAMETERS_PENDING.get(k, 12)}
    assert grown == {}
    assert set(found) == set(TOO_MANY_PARAMETERS_PENDING), "one is fixed: drop it from the list"
