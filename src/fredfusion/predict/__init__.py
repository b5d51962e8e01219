"""`fredfusion predict`: run a checkpoint on images, frame folders, FRED sequences or videos.

Frames are decoded on a small thread pool (:mod:`.frames`), resized to fit the model input (keeping
their aspect, area averaging when shrinking, as the frame store does), predicted in batches with
:func:`fredfusion.eval.evaluator.predict_frames`, and boxes are scaled back to the pixels of the
original frames (:mod:`.run`). What ``--source`` may be is in :mod:`.sources`. Outputs
(:mod:`.outputs`): annotated JPEGs (RGB | Event side by side for dual models), an MP4 for
multi-frame sources, ``detections.csv`` (one row per box) and ``detections.json`` (one entry per
frame).
"""

from fredfusion.predict.frames import fit_size
from fredfusion.predict.outputs import CSV_COLUMNS, annotate
from fredfusion.predict.run import PredictResult, predict
from fredfusion.predict.sources import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    FrameItem,
    PredictSource,
    open_source,
)

__all__ = [
    "CSV_COLUMNS",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "FrameItem",
    "PredictResult",
    "PredictSource",
    "annotate",
    "fit_size",
    "open_source",
    "predict",
]
