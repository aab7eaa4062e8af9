"""Researcher library for the Personal Health Train registry; `python -m researcher` is its CLI."""

from researcher.client import ChecksumMismatch, Registry, RegistryError, TaskFailed, TaskTimeout
from researcher.images import ImageNotPinned, pin_to_digest
from researcher.keys import DecryptionFailed, generate_identity
from researcher.results import ResultLimits, ResultTooLarge, RunResult, UnsafeOutput, UnsafeSiteName
from researcher.settings import SettingsError, connect

__all__ = ["ChecksumMismatch", "DecryptionFailed", "ImageNotPinned", "Registry", "RegistryError", "ResultLimits",
           "ResultTooLarge", "RunResult", "SettingsError", "TaskFailed", "TaskTimeout", "UnsafeOutput",
           "UnsafeSiteName", "connect", "generate_identity", "pin_to_digest"]
