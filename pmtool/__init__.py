"""pmtool: the worker side of Headless PM, as a library and a JSON-speaking CLI."""

__version__ = "0.1.0"
