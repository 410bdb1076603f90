"""Benchmark and evaluation harness behind the ``tokenmerge`` command line (``tokenmerge bench`` / ``eval``)."""

from tokenmerge.errors import HarnessError
from tokenmerge.harness.registry import MethodSpec, architectures, methods, parse_method

__all__ = ["HarnessError", "MethodSpec", "architectures", "methods", "parse_method"]
