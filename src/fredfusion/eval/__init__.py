"""Evaluation: batched inference, COCO metrics (faster-coco-eval), breakdowns, reports and plots."""

from fredfusion.eval.coco_metrics import (
    CocoEvaluator,
    CocoResult,
    Matches,
    coco_map,
    f1_optimal,
    match_detections,
    pr_curve,
)
from fredfusion.eval.evaluator import EvalResult, evaluate, predict_frames, restrict_gt
from fredfusion.eval.plots import plot_curves
from fredfusion.eval.report import breakdowns, compare_table, format_table, write_report

__all__ = [
    "CocoEvaluator",
    "CocoResult",
    "EvalResult",
    "Matches",
    "breakdowns",
    "coco_map",
    "compare_table",
    "evaluate",
    "f1_optimal",
    "format_table",
    "match_detections",
    "plot_curves",
    "pr_curve",
    "predict_frames",
    "restrict_gt",
    "write_report",
]
