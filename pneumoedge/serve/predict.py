"""One uploaded file to one result row, through the same `Ensemble.predict` and row as `pneumoedge infer`."""

from __future__ import annotations

import base64
import dataclasses
import logging
from typing import Any, Optional

import cv2

from pneumoedge.formats import ImageError, sniff
from pneumoedge.runtime.ensemble import Ensemble, Prediction
from pneumoedge.serve.uploads import Upload

log = logging.getLogger("pneumoedge.serve")

#: Longest side of an overlay returned by the API, in pixels.
OVERLAY_MAX_SIDE = 1024


def predict_upload(ensemble: Ensemble, upload: Upload, explain: bool = False) -> tuple[dict[str, Any], int]:
    """The JSONL row for `upload` (its `path` is the client's file name) and the file's HTTP status.

    Runs on a worker thread. The status is 200 when classified, 415 when the bytes are not an
    image format pneumoedge reads, 422 when they are but cannot be decoded.
    """
    status = 200
    try:
        if not upload.data:  # the decoder's reason would be "unrecognised content"
            raise ImageError("empty file (0 bytes): was the upload cut off, or the file still being written?")
        prediction = ensemble.predict(upload.data, explain=True) if explain else ensemble.predict(upload.data)
    except ImageError as exc:
        prediction = Prediction(source=upload.name, status="error", error=str(exc))
        status = 422 if not upload.data or _is_image_format(upload.data) else 415
    except Exception as exc:  # a decoder bug must cost one row, not the server; the type is logged, no data
        log.error("prediction failed with %s", type(exc).__name__)
        prediction = Prediction(source=upload.name, status="error", error="this file could not be processed (internal error)")
        status = 422
    row = dataclasses.replace(prediction, source=upload.name).to_dict()
    if explain and prediction.status == "ok":
        row["overlay"] = _overlay_data_url(prediction) or ""
    return row, status


def response_status(codes: list[int]) -> int:
    """200 when any file was classified; otherwise the files' status (422 when they differ)."""
    if any(code == 200 for code in codes):
        return 200
    return codes[0] if len(set(codes)) == 1 else 422


def _is_image_format(data: bytes) -> bool:
    try:
        sniff(data)
    except ImageError:
        return False
    return True


def _overlay_data_url(prediction: Prediction) -> Optional[str]:
    """The overlay as a PNG data URL: nothing is kept on the server after the response."""
    try:
        rgb = prediction.overlay(max_side=OVERLAY_MAX_SIDE)
    except ValueError:  # no heatmap for this image (the members that carry one gave none)
        return None
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        return None
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii")
