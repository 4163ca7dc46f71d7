"""Errors of the export side; each message is meant for the user and names the fix."""

from __future__ import annotations


class ExportError(Exception):
    """A user-facing failure in training, evaluation, export or quantization."""


class TrainingError(ExportError):
    """Training cannot start or cannot finish (bad data folder, bad options)."""


class ParityError(ExportError):
    """The ONNX model does not reproduce the Keras model within the tolerance."""


class QuantizationError(ExportError):
    """No int8 recipe meets the accuracy tolerance, or quantization itself failed."""


class HeatmapUnavailable(ExportError):
    """The model's structure does not allow heatmaps from the graph; the classifier still exports."""
