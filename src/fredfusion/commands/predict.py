"""`fredfusion predict`: detect drones in an image, a frame folder, a FRED sequence folder or a video."""

from __future__ import annotations

import argparse
from pathlib import Path

from fredfusion.commands import flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion predict``."""
    p = sub.add_parser(
        "predict",
        help="detect drones in an image, a frame folder, a FRED sequence folder or a video",
    )
    flags.add_weights(p)
    p.add_argument(
        "--source",
        type=Path,
        required=True,
        help="image, folder of frames, FRED sequence folder (RGB/, Event/Frames/) "
        "or video (.mp4 .avi .mov .mkv)",
    )
    p.add_argument(
        "--event", type=Path, default=None, help="dual models: the event frame (or folder) matching --source"
    )
    flags.add_thresholds(p, conf=0.25)
    flags.add_out(p, None, "output folder (default: runs/predict/<source name>)")
    flags.add_device(p)
    flags.add_batch(p, 16)
    flags.add_input_shape(p)
    p.add_argument(
        "--save-frames",
        type=int,
        default=None,
        metavar="N",
        help="annotated JPEGs to write, spread over the source (default: all up to 300 frames, else none)",
    )
    p.add_argument(
        "--tolerance-ms", type=float, default=33.0, help="FRED sequences: max |dt| of an RGB/Event pair"
    )
    p.add_argument("--max-det", type=int, default=300, help="boxes per frame at most")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Predict on ``--source`` and write the outputs."""
    from fredfusion.predict import predict

    predict(
        args.weights,
        args.source,
        event=args.event,
        out=args.out,
        conf=args.conf,
        iou=args.iou,
        device=args.device,
        batch=args.batch,
        input_hw=flags.input_hw(args),
        save_frames=args.save_frames,
        tolerance_ms=args.tolerance_ms,
        max_det=args.max_det,
    )
    return 0
