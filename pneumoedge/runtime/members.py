"""A loaded member: an ONNX session with its card; runs batches, names its optional outputs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np
import onnxruntime as ort

from pneumoedge.bundle import BundleError, ModelCard, apply_activation


@dataclass(frozen=True)
class LoadedMember:
    """A member with its open session."""

    name: str
    weight: float
    card: ModelCard
    session: ort.InferenceSession
    source: str
    precision: str = "fp32"

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def dynamic_batch(self) -> bool:
        return not isinstance(self.session.get_inputs()[0].shape[0], int)

    # Output names are read from the session once: they are looked up on every batch.
    @cached_property
    def output_name(self) -> str:
        return self.session.get_outputs()[0].name

    @cached_property
    def heatmap_output(self) -> Optional[str]:
        """The graph's heatmap output, when its card names one that exists."""
        return self._named_output("heatmap_output")

    @cached_property
    def features_output(self) -> Optional[str]:
        """The graph's pooled-features output (what the out-of-distribution score reads), if any."""
        return self._named_output("features_output")

    def _named_output(self, key: str) -> Optional[str]:
        name = (self.card.explain or {}).get(key)
        return name if name and name in {o.name for o in self.session.get_outputs()} else None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch of tensors; return (N, K) probabilities (activation applied)."""
        return self.run_outputs(batch)[0]

    def run_explained(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, K) probabilities and (N, h, w) raw heatmaps, from one run of the graph."""
        probs, maps, _ = self.run_outputs(batch, heatmap=True)
        return probs, maps  # type: ignore[return-value]

    def run_outputs(
        self, batch: np.ndarray, *, heatmap: bool = False, features: bool = False
    ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """One run: (N, K) probabilities, and when asked (N, h, w) raw heatmaps and (N, C) features."""
        names = [self.output_name] + ([self.heatmap_output] if heatmap else []) + ([self.features_output] if features else [])
        outputs = self._run(names, batch)
        probs = self._probabilities(outputs[0], len(batch))
        maps = np.asarray(outputs[1], dtype=np.float32) if heatmap else None
        feats = np.asarray(outputs[-1]).reshape(len(batch), -1) if features else None
        return probs, maps, feats

    def _run(self, names: list, batch: np.ndarray) -> list:
        # Only the named outputs are copied out: plain runs never fetch the heatmaps.
        if self.dynamic_batch:
            return self.session.run(names, {self.input_name: batch})
        parts = [self.session.run(names, {self.input_name: batch[i : i + 1]}) for i in range(len(batch))]
        return [np.concatenate([part[k] for part in parts]) for k in range(len(names))]

    def _probabilities(self, raw: np.ndarray, count: int) -> np.ndarray:
        raw = apply_activation(np.asarray(raw).reshape(count, -1), self.card.activation)
        if self.card.task == "binary" and raw.shape[1] == 1:
            raw = np.concatenate([1.0 - raw, raw], axis=1)
        if raw.shape[1] != len(self.card.labels):
            raise BundleError(
                f"{self.source}: model outputs {raw.shape[1]} values per image but has "
                f"{len(self.card.labels)} labels {list(self.card.labels)}"
            )
        return raw


def check_input_shape(member: LoadedMember) -> None:
    node = member.session.get_inputs()[0]
    expected = member.card.spec.input_shape
    shape = list(node.shape)
    if len(member.session.get_inputs()) != 1:
        raise BundleError(f"{member.source}: model has {len(member.session.get_inputs())} inputs; one image input expected")
    if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected)):
        raise BundleError(
            f"{member.source}: ONNX input {node.name!r} has shape {shape}, which does not fit its spec "
            f"({member.card.spec.layout} {list(expected)} plus a batch axis)"
        )
    if node.type != "tensor(float)":
        raise BundleError(f"{member.source}: ONNX input {node.name!r} is {node.type}; float32 expected")
