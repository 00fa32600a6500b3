"""Importing this module registers every command on `pmtool.cli.app`."""

from pmtool.cli import (
    agent_run,  # noqa: F401
    agent_tools,  # noqa: F401
    core,  # noqa: F401
    loop,  # noqa: F401
    ops,  # noqa: F401
    work,  # noqa: F401
)
