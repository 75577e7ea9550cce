"""Helpers for testing fdcore and fdcore plugins (also a pytest plugin: ``fdcore.testing``)."""

from fdcore.testing.processes import ServerProcess, free_port, wait_for_http

__all__ = ["ServerProcess", "free_port", "wait_for_http"]
