"""Researcher library for the Personal Health Train registry."""

from researcher.client import Registry, RegistryError, RunResult, TaskTimeout

__all__ = ["Registry", "RegistryError", "RunResult", "TaskTimeout"]
