"""Errors raised by the export path (all are ValueErrors, with a message that says what to do)."""

from __future__ import annotations


class ExportError(ValueError):
    """Base class: something about an exported artifact or its use is wrong."""


class ModelFileError(ExportError):
    """The ONNX file / engine is missing, truncated or corrupted, or its sidecar is missing/invalid."""


class SidecarMismatchError(ExportError):
    """The ``.rfc.json`` sidecar does not describe the graph next to it (names, shapes, dtypes)."""


class InputMismatchError(ExportError):
    """An input or a state tensor given to a runner does not match the exported graph."""
