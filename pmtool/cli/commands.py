"""Importing this module registers every command on `pmtool.cli.app`."""

from pmtool.cli import (
    core,  # noqa: F401
    work,  # noqa: F401
)
