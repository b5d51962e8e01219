"""`fredfusion export`: ONNX export of a checkpoint (decoded outputs), checked with onnxruntime."""

from __future__ import annotations

import argparse

from fredfusion.commands import flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion export``."""
    p = sub.add_parser("export", help="export a checkpoint to ONNX (decoded outputs) and check it")
    flags.add_weights(p)
    p.add_argument("--format", choices=("onnx",), default="onnx", help="file format (default: onnx)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch dimension")
    flags.add_out(p, None, "output file (default: the weights path with .onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    flags.add_input_shape(p, help="input size (default: the checkpoint's training input_shape)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export ``--weights`` and check the file against PyTorch."""
    from fredfusion.export import export_onnx

    export_onnx(args.weights, args.out, opset=args.opset, dynamic=args.dynamic, input_hw=flags.input_hw(args))
    return 0
