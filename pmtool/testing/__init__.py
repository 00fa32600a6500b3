"""Test and demo support: a stand-in Headless PM server and helpers that seed any server."""
