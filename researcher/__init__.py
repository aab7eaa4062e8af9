"""Researcher library for the Personal Health Train registry; `python -m researcher` is its CLI."""

from researcher.client import Registry, RegistryError, TaskFailed, TaskTimeout
from researcher.images import ImageNotPinned
from researcher.keys import DecryptionFailed, generate_identity
from researcher.results import RunResult
from researcher.settings import SettingsError, connect

__all__ = ["DecryptionFailed", "ImageNotPinned", "Registry", "RegistryError", "RunResult", "SettingsError", "TaskFailed", "TaskTimeout", "connect", "generate_identity"]
