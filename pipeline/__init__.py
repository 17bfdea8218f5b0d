"""Orchestration: config, Ray Data plan, CLI, report."""

__version__ = "0.1.0"
