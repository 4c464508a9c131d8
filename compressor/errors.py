"""Exceptions. Every user-facing error is one line: where, what, the bad value, the fix."""

from __future__ import annotations


class CompressorError(Exception):
    """Base class for errors caused by user input; the CLI prints them as one line."""

    exit_code = 1


class ConfigError(CompressorError, ValueError):
    """A recipe, flag or config field is invalid."""

    exit_code = 2


class ModelError(CompressorError):
    """A model cannot be found, loaded, saved or is numerically broken."""


class DataError(CompressorError):
    """Text or labelled data cannot be read or is too small."""

    exit_code = 2


class OutputError(CompressorError):
    """The output folder cannot be written, or may not be (it holds data this tool did not write)."""

    exit_code = 2


class GateError(CompressorError):
    """A recipe quality gate was missed (the run itself succeeded)."""

    exit_code = 3
