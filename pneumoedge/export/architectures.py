"""The founding student projects' small CNNs, as a registry: name -> Architecture.

Each architecture names its default `PreprocessSpec` (input size, colour, resize, scale), so a
run trained with it records exactly the preprocessing the runtime must repeat. The registry
feeds the CLI's `--arch` choices. Models are deliberately small (tens to a few hundred
thousand parameters): the clinic workstation runs them on 2-4 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from pneumoedge.export.errors import TrainingError
from pneumoedge.preprocessing import PreprocessSpec

TASK_CLASSES = {"binary": 1}  # binary: one sigmoid unit = probability of labels[1]


@dataclass(frozen=True)
class Architecture:
    """A named CNN: conv blocks (filters per block), a small dense head, and its input spec.

    Each block is Conv3x3 -> BatchNorm -> ReLU (twice when `double` is set for that block),
    then 2x2 max pooling; then global average pooling, dropout, one hidden dense layer and the
    output layer (1 sigmoid unit for binary, N softmax units for multiclass).
    """

    name: str
    description: str
    spec: PreprocessSpec
    filters: tuple[int, ...]
    dense: int = 64
    dropout: float = 0.3
    separable_from: Optional[int] = None  # blocks from this index use SeparableConv2D
    double_from: Optional[int] = None  # blocks from this index have two convolutions

    def default_spec(self, size: Optional[Sequence[int]] = None) -> PreprocessSpec:
        """The architecture's spec, with the input size overridden when `size` = (H, W)."""
        if size is None:
            return self.spec
        height, width = (int(v) for v in size)
        return replace(self.spec, height=height, width=width)

    def build(self, task: str = "binary", num_classes: int = 2, size: Optional[Sequence[int]] = None) -> Any:
        """Build a fresh, uncompiled Keras model (imports Keras here, not at module import)."""
        import keras
        from keras import layers

        if task not in ("binary", "multiclass"):
            raise TrainingError(f"task must be 'binary' or 'multiclass', got {task!r}")
        spec = self.default_spec(size)
        if min(spec.height, spec.width) < 2 ** len(self.filters):
            raise TrainingError(
                f"{self.name}: input {spec.height}x{spec.width} is too small for {len(self.filters)} pooling blocks"
            )
        inputs = keras.Input(shape=spec.input_shape, name="image")
        x = inputs
        for index, filters in enumerate(self.filters):
            convs = 2 if self.double_from is not None and index >= self.double_from else 1
            for repeat in range(convs):
                if self.separable_from is not None and index >= self.separable_from:
                    x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"b{index}_sep{repeat}")(x)
                else:
                    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"b{index}_conv{repeat}")(x)
                x = layers.BatchNormalization(momentum=0.9, name=f"b{index}_bn{repeat}")(x)
                x = layers.ReLU(name=f"b{index}_relu{repeat}")(x)
            x = layers.MaxPooling2D(2, name=f"b{index}_pool")(x)
        x = layers.GlobalAveragePooling2D(name="gap")(x)
        x = layers.Dropout(self.dropout, name="dropout")(x)
        x = layers.Dense(self.dense, activation="relu", name="hidden")(x)
        if task == "binary":
            outputs = layers.Dense(1, activation="sigmoid", name="probability")(x)
        else:
            outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
        return keras.Model(inputs, outputs, name=self.name)


def _gray(size: int) -> PreprocessSpec:
    # Area resampling: X-rays are downscaled a lot, and area averages instead of aliasing.
    return PreprocessSpec(height=size, width=size, color="gray", resize="area", scale=1.0 / 255.0)


#: The registry. Names say blocks, colour and default input size.
ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            name="cnn3_gray150",
            description="3 conv blocks (16-32-64), grayscale 150 px: the first student project's model",
            spec=_gray(150),
            filters=(16, 32, 64),
            dense=64,
        ),
        Architecture(
            name="cnn4_gray256",
            description="4 conv blocks (16-32-64-96), last two doubled, grayscale 256 px",
            spec=_gray(256),
            filters=(16, 32, 64, 96),
            dense=64,
            double_from=2,
        ),
        Architecture(
            name="cnn4_rgb224",
            description="4 conv blocks (16-32-64-128), separable from block 3, RGB 224 px (ImageNet-style input)",
            spec=PreprocessSpec(height=224, width=224, color="rgb", resize="bilinear", scale=1.0 / 255.0),
            filters=(16, 32, 64, 128),
            dense=64,
            separable_from=2,
        ),
    )
}


def get_architecture(name: str) -> Architecture:
    """The registered architecture `name`, or a `TrainingError` listing the choices."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise TrainingError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}") from None
