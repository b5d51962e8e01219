"""`fredfusion convert`: the old tool's checkpoints and COCO files, or a YOLOv5 state dict, as a fredfusion
checkpoint (for eval, predict, export and train --weights)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fredfusion.spec import FUSIONS, MODALITIES, SIZES


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion convert``."""
    p = sub.add_parser("convert", help="write the old tool's or YOLOv5 weights as a fredfusion checkpoint")
    p.add_argument(
        "--weights",
        type=Path,
        required=True,
        help="the old tool's checkpoint or model_data/yolov5<phi>.pth, a YOLOv5 state dict (model.N...), "
        "or a fredfusion checkpoint",
    )
    p.add_argument("--out", type=Path, required=True, help="the fredfusion checkpoint to write (.pth)")
    p.add_argument(
        "--modality",
        choices=MODALITIES,
        default=None,
        help="the model to write (default: the file's; rgb for a single-modality file, which does not say "
        "its sensor; dual from a single-modality file puts its backbone in both)",
    )
    p.add_argument("--model", choices=tuple(SIZES), default=None, help="size (default: the file's)")
    p.add_argument(
        "--fusion", choices=FUSIONS, default=None, help="for dual (default: the file's, else concat)"
    )
    p.add_argument(
        "--anchors",
        type=Path,
        default=None,
        help="the old tool's model_data/yolo_anchors.txt when its anchors were changed (default: the ones "
        "it ships with)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert ``--weights`` into ``--out`` and print what was loaded and skipped."""
    from fredfusion.engine.checkpoint import save_checkpoint
    from fredfusion.model.convert import parse_anchors, with_layout
    from fredfusion.model.detector import build_model
    from fredfusion.model.weights import load_weights, model_meta, read_weights

    anchors = None
    if args.anchors is not None:
        try:
            anchors = parse_anchors(args.anchors.read_text())
        except ValueError as exc:
            raise SystemExit(f"--anchors {args.anchors}: {exc}") from None
    source = read_weights(args.weights, anchors)
    size = args.model or source.size
    if size is None:
        raise SystemExit(f"{args.weights}: the model size cannot be told from the weights; give --model")
    modality = args.modality or source.modality or "rgb"
    if args.modality is None and source.modality is None:
        print(
            "modality rgb: a single-modality file does not say its sensor (--modality event: an event model)"
        )
    model = build_model(
        modality, size, args.fusion or source.fusion or "concat", num_classes=source.num_classes or 1
    )
    model = with_layout(model, source.layout)
    report = load_weights(model, source)
    for line in report.lines(args.weights):
        print(line)
    save_checkpoint(
        {"meta": model_meta(model), "model": model.state_dict(), "source": str(args.weights)}, args.out
    )
    classes = f"{model.num_classes} class{'es' if model.num_classes > 1 else ''}"
    layout = "YOLOv5 v5.0" if source.layout == "v5" else "YOLOv5 v6"
    print(f"wrote {args.out}: {modality} YOLO-{size}, {classes}, {layout} backbone layout")
    return 0
