"""The data of a training run: the train split (unreadable images skipped), the val split (true pairs),
the pairing of each train image, and the start-up check of damaged frame store files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fredfusion.config import TrainConfig, dropout_share, train_pairs
from fredfusion.data.dataset import PreparedDataset
from fredfusion.engine.errors import TrainingStopped


@dataclass
class RunData:
    """Train and val sets; per train image id: true pair or not, and the RGB/Event time difference (ms)."""

    train: PreparedDataset
    val: PreparedDataset | None
    dual_flag: dict[int, bool]
    tdiff: dict[int, float]
    checks: dict[str, str] = field(default_factory=dict)  # for the quick-test check list


def open_run_data(cfg: TrainConfig, log: Callable[[str], None]) -> RunData:
    """Open the splits of ``cfg.data`` and log what was found; stop on damaged files (see check_damaged)."""
    train = PreparedDataset(
        Path(cfg.data), "train", modality=cfg.modality, pairs=train_pairs(cfg), skip_bad=True
    )
    if len(train) == 0:
        raise SystemExit(f"{cfg.data}: the train split has no usable images for modality {cfg.modality}")
    try:
        val = PreparedDataset(
            Path(cfg.data),
            "val",
            modality=cfg.modality,
            pairs="dual",
            max_images=100 if cfg.quick_test else None,
        )
        val = val if len(val) else None
    except FileNotFoundError:
        val = None
    summary = train.pairing_summary()
    checks = {
        "data": f"{len(train)} train / {len(val or [])} val images in {cfg.data}",
        "dual_rate": f"{summary['dual']}/{summary['images']} ({100 * summary['dual_rate']:.1f}%)",
    }
    log(
        f"data: {checks['data']}; train dual_rate {checks['dual_rate']}, "
        f"avg_tdiff {summary['avg_tdiff_ms']:.2f} ms"
    )
    for line in blanking_lines(cfg, train):
        log(line)
    if val is None:
        log("no val images: evaluation is skipped; best checkpoint by training loss")
    status = {int(im["id"]): im for im in train.images}
    data = RunData(
        train,
        val,
        dual_flag={i: im.get("pair_status") == "dual" for i, im in status.items()},
        tdiff={i: float(im.get("time_diff_ms") or 0.0) for i, im in status.items()},
        checks=checks,
    )
    check_damaged(data, cfg.max_bad_frame_share, log)
    return data


DROPOUT_SIDE_WORDS = {"both": "RGB or events (50/50)", "rgb": "their RGB", "event": "their events"}
DROPOUT_REGION_WORDS = {
    "image": "whole frame, zeros",
    "boxes": "target boxes where the other modality shows them, filled from elsewhere in the frame",
    "box_parts": "target boxes less a random part of each, where the other modality shows them, "
    "filled from elsewhere in the frame",
}


def blanking_lines(cfg: TrainConfig, train: PreparedDataset) -> list[str]:
    """What a dual run blanks (``data.blanking``): its unpaired train images and the modality dropout."""
    if cfg.modality != "dual":
        return []
    lines = []
    rgb_only = int((train.has_rgb & ~train.has_event).sum())
    event_only = int((train.has_event & ~train.has_rgb).sum())
    if rgb_only or event_only:
        lines.append(
            f"unpaired: {rgb_only} rgb_only + {event_only} event_only train images "
            f"(pairs {train_pairs(cfg)}), their missing modality blanked (zeros)"
        )
    share = dropout_share(cfg)
    if share > 0:
        lines.append(
            f"modality dropout: {share:g} of the true pairs trained with "
            f"{DROPOUT_SIDE_WORDS[cfg.modality_dropout_side]} blanked "
            f"({DROPOUT_REGION_WORDS[cfg.modality_dropout_region]}, drawn per sample on the device)"
            + (
                f", rising from 0 over the first {cfg.modality_dropout_ramp:.0%} of the run"
                if cfg.modality_dropout_ramp
                else ""
            )
        )
    return lines


def check_damaged(data: RunData, max_share: float, log: Callable[[str], None]) -> None:
    """Frame store files damaged after prepare (one size check per file): their train images are
    skipped when few enough, the run stops otherwise; val images must all be readable."""
    hint = "run `fredfusion prepare` again to rebuild the damaged files"
    damaged = data.train.damaged_images()
    if damaged:
        n, total = len(damaged), len(data.train)
        text = (
            f"{n} of {total} train images ({n / total:.2%}) are in damaged frame store files, "
            f"e.g. {damaged[0][1]}: {damaged[0][2]}"
        )
        if n / total > max_share:
            raise TrainingStopped(f"{text}; that is more than max_bad_frame_share {max_share:.2%}: {hint}")
        log(f"warning: {text}; they are skipped in every epoch ({hint})")
    damaged = data.val.damaged_images() if data.val is not None else []
    if damaged:
        raise TrainingStopped(
            f"{len(damaged)} of {len(data.val)} val images are in damaged frame store files "
            f"(e.g. {damaged[0][1]}: {damaged[0][2]}), so evaluation cannot read them: {hint}"
        )
