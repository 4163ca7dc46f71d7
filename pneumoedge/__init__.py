"""pneumoedge: chest X-ray pneumonia classifiers, from Keras training to fast, checked ONNX inference.

Results are decision support for clinicians, never a diagnosis.

    import pneumoedge
    model = pneumoedge.load("bundle_dir")      # or .onnx path(s); None for the bundled default
    result = model.predict("image.jpeg")
    result.label, result.probability, result.member_probabilities
"""

from pneumoedge.bundle import BundleError
from pneumoedge.imageio import ImageError
from pneumoedge.preprocessing import PreprocessSpec, preprocess
from pneumoedge.runtime.ensemble import Ensemble
from pneumoedge.runtime.loading import load
from pneumoedge.runtime.prediction import Prediction
from pneumoedge.runtime.sessions import DeviceError

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "DeviceError",
    "Ensemble",
    "ImageError",
    "Prediction",
    "PreprocessSpec",
    "load",
    "preprocess",
    "__version__",
]
