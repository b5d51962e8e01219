"""Batched evaluation: loader -> letterbox -> model -> decode + NMS on the device -> COCO metrics."""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fredfusion.eval.coco_metrics import CocoResult, coco_map
from fredfusion.spec import DEFAULT_INPUT_HW, NMS_IOU, model_inputs

if TYPE_CHECKING:
    from fredfusion.model.postprocess import DenseDetections

__all__ = ["IN_FLIGHT", "EvalResult", "evaluate", "predict_frames", "restrict_gt"]

#: Batches launched on the device before the host converts the rows of the oldest (``evaluate``).
IN_FLIGHT = 2


@dataclass
class EvalResult:
    """Metrics, detections (COCO results format, original pixels) and the gt they were scored on.

    ``metrics`` holds the COCO numbers (mAP50_95, mAP50, mAP75, APs, APm, APl, AR1, AR10, AR100,
    ARs, ARm, ARl; None when mAP was not computed) plus ``images``, ``pairs_per_s`` (inference +
    NMS only: ``images / infer_s``), ``infer_s`` (the batches' device stage: letterbox, model, NMS,
    the copy to the host; CUDA events on a GPU), ``wait_s`` (time waiting for the loader),
    ``wall_s`` (the whole loop: loading, device and host stages), ``metrics_s`` and ``val_loss``
    (None when not computed). ``coco`` keeps the full COCO result (precision array).
    """

    metrics: dict[str, Any]
    detections: list[dict] = field(default_factory=list)
    gt: dict = field(default_factory=dict)
    coco: CocoResult | None = None


def _components() -> tuple[Any, Callable, Callable]:
    """The loader, letterbox and NMS functions (imported on first use)."""
    from fredfusion.data.augment import letterbox_batch
    from fredfusion.data.loader import BatchLoader
    from fredfusion.model.postprocess import non_max_suppression

    return BatchLoader, letterbox_batch, non_max_suppression


def restrict_gt(coco: dict, image_ids: set[int] | list[int] | np.ndarray) -> dict:
    """The COCO dict limited to ``image_ids`` (images and their annotations; categories kept)."""
    keep = {int(i) for i in image_ids}
    images = [img for img in coco.get("images", []) if int(img["id"]) in keep]
    anns = [ann for ann in coco.get("annotations", []) if int(ann["image_id"]) in keep]
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["images"] = images
    out["annotations"] = anns
    out.setdefault("categories", [{"id": 1, "name": "drone"}])
    return out


def _num(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _modality(model: torch.nn.Module) -> str:
    """The modality of ``model`` (dual when it does not say)."""
    return str(getattr(model, "modality", "dual"))


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _channels_last(model: torch.nn.Module) -> bool:
    """Whether ``model`` keeps its convolution weights channels-last (its first weight with a kernel
    wider than 1 says; 1x1 weights look the same in both layouts)."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[-1] * p.shape[-2] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def _forward(
    model: torch.nn.Module,
    rgb: torch.Tensor | None,
    event: torch.Tensor | None,
    input_hw: tuple[int, int],
    targets: torch.Tensor | None = None,
    autocast: torch.autocast | None = None,
    channels_last: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor | None, tuple[float, float, float]]:
    """Letterbox uint8 frames into ``input_hw`` (channels-last when asked) and run the model (inside
    ``autocast`` when given).

    Returns the float32 raw predictions, the letterboxed ``targets`` and ``(pad_x, pad_y, letterbox
    scale)``.
    """
    letterbox_batch = _components()[1]
    rgb_f, event_f, targets_lb, (pad_x, pad_y), lb_scale = letterbox_batch(
        rgb, event, tuple(input_hw), targets
    )
    if channels_last:
        rgb_f, event_f = (
            None if x is None else x.contiguous(memory_format=torch.channels_last) for x in (rgb_f, event_f)
        )
    with autocast if autocast is not None else contextlib.nullcontext():
        preds = model(rgb_f, event_f)
    preds = [p.float() for p in preds]
    return preds, targets_lb, (_num(pad_x), _num(pad_y), _num(lb_scale))


def _detect(
    model: torch.nn.Module,
    rgb: torch.Tensor | None,
    event: torch.Tensor | None,
    input_hw: tuple[int, int],
    nms: tuple[float, float, int],
) -> tuple[list[torch.Tensor], tuple[float, float, float]]:
    """:func:`_forward`, then decode and NMS (``nms``: conf, iou, max_det) on the device: the kept boxes
    per image and ``(pad_x, pad_y, letterbox scale)``."""
    preds, _, pads = _forward(model, rgb, event, input_hw)
    return _components()[2](model.decode(preds), *nms), pads


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host: a CUDA tensor is copied into pinned memory without waiting for the copy (an
    event recorded after it says when it is there); a host tensor is returned as it is, another
    device's copied as before (blocking)."""
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class _Clock:
    """The time of a batch's device stage: CUDA events on a GPU (read once the stage has run, so the
    host never waits for them), the wall clock elsewhere (where the stage runs as it is called)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.begin: torch.cuda.Event | None = None
        self.end: torch.cuda.Event | None = None
        self.wall = 0.0
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.wall = time.perf_counter()

    def stop(self) -> None:
        """Mark the end of the stage (on a GPU: after everything queued so far, copies included)."""
        if self.cuda:
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record()
        else:
            self.wall = time.perf_counter() - self.wall

    def wait(self) -> float:
        """Wait until the stage has run on the device; its seconds."""
        if not self.cuda:
            return self.wall
        assert self.begin is not None and self.end is not None
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1000.0


@dataclass
class _Flight:
    """A batch between its device stage and its host stage: image ids, the packed rows on their way to
    the host (every candidate with ``keep``/``converged`` for dense NMS), and the device result that
    finishes an unconverged dense NMS."""

    ids: np.ndarray
    rows: torch.Tensor
    clock: _Clock
    keep: torch.Tensor | None = None
    converged: torch.Tensor | None = None
    dense: DenseDetections | None = None


@dataclass
class _Pass:
    """One evaluation pass over a dataset: its settings and what its batches added up to.

    Each batch has a device stage (:meth:`launch`: letterbox, model, decode, NMS, packing, the copy of
    the rows to the host) and a host stage (:meth:`land`: the rows as COCO results). ``in_flight``
    batches are launched before the oldest lands, so on a GPU the device works on the next batches
    while the host converts the rows of an earlier one; 0 lands each batch before the next starts.
    """

    model: torch.nn.Module
    device: torch.device
    input_hw: tuple[int, int]
    nms: tuple[float, float, int]
    amp_dtype: torch.dtype | None
    loss_fn: Callable | None
    scale: float  # store pixels per original pixel
    orig_wh: tuple[int, int]
    dense: bool = False
    in_flight: int = 0
    channels_last: bool = False
    detections: list[dict] = field(default_factory=list)
    seen_ids: list[np.ndarray] = field(default_factory=list)
    infer_s: float = 0.0
    wait_s: float = 0.0
    wall_s: float = 0.0
    loss_sum: torch.Tensor | None = None
    n_done: int = 0

    def run(self, dataset: Any, n_total: int, batch_size: int, num_workers: int, progress: bool) -> None:
        """Evaluate the first ``n_total`` images of ``dataset`` in order, ``batch_size`` at a time."""
        BatchLoader = _components()[0]
        loader = BatchLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=num_workers,
            prefetch_factor=2 if num_workers > 0 else None,
            persistent_workers=False,
            device=self.device,
            max_batches=math.ceil(n_total / batch_size),
        )
        bar = None
        flights: deque[_Flight] = deque()
        try:
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=n_total, desc="eval", unit="img")
            start = tick = time.perf_counter()
            for batch in loader:
                self.wait_s += time.perf_counter() - tick
                keep = min(len(batch.ids), n_total - self.n_done)
                if keep <= 0:
                    break
                flights.append(self.launch(batch, keep))
                while len(flights) > self.in_flight:
                    self.land(flights.popleft(), bar)
                if self.n_done >= n_total:
                    break
                tick = time.perf_counter()
            while flights:
                self.land(flights.popleft(), bar)
            self.wall_s = time.perf_counter() - start
        finally:
            if bar is not None:
                bar.close()

    def launch(self, batch: Any, keep: int) -> _Flight:
        """Device stage of the first ``keep`` images of a loader batch; adds their loss. On a GPU nothing
        here waits for the device (with dense NMS): the rows come back by one copy per tensor into
        pinned memory, which :meth:`land` waits for."""
        ids = batch.ids[:keep].cpu().numpy().astype(np.int64)
        rgb = batch.rgb[:keep] if batch.rgb is not None else None
        event = batch.event[:keep] if batch.event is not None else None
        targets = batch.targets
        if targets is not None and keep < len(batch.ids):
            targets = targets[targets[:, 0] < keep]  # a cut last batch only (max_images)
        rgb, event = model_inputs(_modality(self.model), rgb, event)

        clock = _Clock(self.device)
        amp = self.amp_dtype is not None
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=amp)
        lb_targets = targets if self.loss_fn is not None else None
        preds, targets_lb, (pad_x, pad_y, lb_scale) = _forward(
            self.model, rgb, event, self.input_hw, lb_targets, autocast, self.channels_last
        )
        decoded = self.model.decode(preds)
        scale = lb_scale * self.scale
        if self.dense:
            from fredfusion.model.postprocess import dense_nms

            dets = dense_nms(decoded, *self.nms)
            rows = _pack_dense(dets.rows(), pad_x, pad_y, scale, *self.orig_wh)
            flight = _Flight(ids, _to_host(rows), clock, _to_host(dets.keep), _to_host(dets.converged), dets)
        else:
            out = _components()[2](decoded, *self.nms)
            flight = _Flight(ids, _to_host(_pack(out, pad_x, pad_y, scale, *self.orig_wh)), clock)
        clock.stop()
        if self.loss_fn is not None:
            loss, _parts = self.loss_fn(preds, targets_lb)
            term = loss.detach().float().reshape(-1).sum()  # YoloLoss returns the batch sum
            self.loss_sum = term if self.loss_sum is None else self.loss_sum + term
        self.n_done += keep
        return flight

    def land(self, flight: _Flight, bar: Any = None) -> None:
        """Host stage of a launched batch: wait for its rows, add them as COCO results, its ids and time."""
        self.infer_s += flight.clock.wait()
        rows = flight.rows.numpy()
        if flight.dense is not None:
            assert flight.keep is not None and flight.converged is not None
            keep = flight.keep
            if not bool(flight.converged):  # a host tensor: the rare batch settle() finishes
                from fredfusion.model.postprocess import settle

                keep = settle(flight.dense, self.nms[1], self.nms[2]).keep.cpu()
            rows = rows.reshape(-1, rows.shape[-1])[keep.numpy().reshape(-1)]
        self.detections.extend(_to_coco(rows, flight.ids))
        self.seen_ids.append(flight.ids)
        if bar is not None:
            bar.update(len(flight.ids))

    def result(self, coco: dict, compute_map: bool) -> EvalResult:
        """Metrics of the pass against the images of ``coco`` it saw."""
        all_ids = np.concatenate(self.seen_ids) if self.seen_ids else np.zeros(0, dtype=np.int64)
        gt = restrict_gt(coco, all_ids)
        n_done, loss_sum = self.n_done, self.loss_sum
        metrics: dict[str, Any] = {
            "images": int(n_done),
            "pairs_per_s": n_done / self.infer_s if self.infer_s > 0 else 0.0,
            "infer_s": self.infer_s,
            "wait_s": self.wait_s,
            "wall_s": self.wall_s,
            "val_loss": float(loss_sum.item()) / n_done if loss_sum is not None and n_done else None,
        }
        t0 = time.perf_counter()
        result = None
        if compute_map:
            result = coco_map(gt, self.detections)
            metrics.update(result.stats)
        else:
            metrics.update({"mAP50_95": None, "mAP50": None})
        metrics["metrics_s"] = time.perf_counter() - t0
        return EvalResult(metrics=metrics, detections=self.detections, gt=gt, coco=result)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    input_hw: tuple[int, int] = DEFAULT_INPUT_HW,
    conf: float = 0.001,
    iou: float = NMS_IOU,
    max_det: int = 300,
    amp_dtype: torch.dtype | None = None,
    loss_fn: Callable | None = None,
    max_images: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    compute_map: bool = True,
    dense: bool | None = None,
    in_flight: int | None = None,
) -> EvalResult:
    """Run the model over ``dataset`` in order and score it with COCO metrics.

    Frames are letterboxed into ``input_hw`` on the device; decode and NMS run on the device for the
    whole batch and the kept boxes come back by one device-to-host copy per batch, mapped to original
    pixels (``(x - pad) / letterbox_scale / dataset.scale``, clipped to the image). ``loss_fn``
    (``YoloLoss``) adds ``val_loss`` (per-image mean of the batch losses). The model is put in eval
    mode and its previous mode restored.

    ``dense`` (default: on a GPU) runs NMS as ``model.postprocess.dense_nms``, which needs no host
    sync; the inputs go channels-last on a GPU when the model's weights are. ``in_flight`` batches
    (default 2; 0: none) are launched before the rows of the oldest are converted on the host. The
    detections do not depend on either setting's overlap: the same computations run in another order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    device = torch.device(device)
    orig_h, orig_w = (int(v) for v in dataset.orig_hw)
    n_total = len(dataset.ids) if max_images is None else min(int(max_images), len(dataset.ids))
    if in_flight is not None and in_flight < 0:
        raise ValueError(f"in_flight must be >= 0, got {in_flight}")
    nms = (conf, iou, max_det)
    run = _Pass(
        model,
        device,
        tuple(input_hw),
        nms,
        amp_dtype,
        loss_fn,
        float(dataset.scale),
        (orig_w, orig_h),
        dense=device.type == "cuda" if dense is None else bool(dense),
        in_flight=IN_FLIGHT if in_flight is None else int(in_flight),
        channels_last=device.type == "cuda" and _channels_last(model),
    )
    with _eval_mode(model):
        if n_total > 0:
            run.run(dataset, n_total, batch_size, num_workers, progress)
    return run.result(dataset.coco, compute_map)


@torch.no_grad()
def predict_frames(
    model: torch.nn.Module,
    rgb: np.ndarray | torch.Tensor | None,
    event: np.ndarray | torch.Tensor | None,
    input_hw: tuple[int, int],
    device: str | torch.device = "cpu",
    conf: float = 0.25,
    iou: float = NMS_IOU,
    max_det: int = 300,
) -> list[np.ndarray]:
    """Detections ``(n, 6)`` [x1, y1, x2, y2, score, class] in frame pixels for frames ``(B, H, W, 3)`` uint8.

    Letterboxes into ``input_hw``, runs the model in eval mode (restoring its mode) and maps boxes
    back to the frames. Pass None for a modality the model does not use.
    """
    device = torch.device(device)

    def to_dev(x: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        t = torch.as_tensor(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        return t.to(device).permute(0, 3, 1, 2).contiguous()

    r, e = model_inputs(_modality(model), to_dev(rgb), to_dev(event))
    ref = r if r is not None else e
    h, w = int(ref.shape[2]), int(ref.shape[3])
    with _eval_mode(model):
        out, (pad_x, pad_y, lb_scale) = _detect(model, r, e, input_hw, (conf, iou, max_det))
    packed = _pack(out, pad_x, pad_y, lb_scale, w, h).cpu().numpy()
    idx = packed[:, 0].astype(np.int64)
    return [packed[idx == k, 1:7] for k in range(int(ref.shape[0]))]


def _pack(
    out: list[torch.Tensor], pad_x: float, pad_y: float, scale: float, orig_w: int, orig_h: int
) -> torch.Tensor:
    """One (n, 7) float32 tensor [img_idx, x1, y1, x2, y2, score, cls] in original pixels."""
    if not out:
        return torch.zeros((0, 7))
    dev = out[0].device
    sizes = [len(o) for o in out]  # known on the host: no device sync
    total = sum(sizes)
    if total == 0:
        return torch.zeros((0, 7), device=dev)
    det = torch.cat([o.reshape(-1, 6) for o in out]).float()
    counts = torch.tensor(sizes, device=dev)
    idx = torch.repeat_interleave(torch.arange(len(out), device=dev), counts, output_size=total).float()
    boxes = _to_original(det[:, :4], pad_x, pad_y, scale, orig_w, orig_h)
    return torch.cat([idx[:, None], boxes, det[:, 4:6]], dim=1)


def _pack_dense(
    rows: torch.Tensor, pad_x: float, pad_y: float, scale: float, orig_w: int, orig_h: int
) -> torch.Tensor:
    """:func:`_pack` of every dense NMS candidate ``(B, K, 6)``: ``(B, K, 7)``, the same value per row."""
    b, k, _ = rows.shape
    idx = torch.arange(b, device=rows.device, dtype=rows.dtype)[:, None, None].expand(b, k, 1)
    boxes = _to_original(rows[..., :4], pad_x, pad_y, scale, orig_w, orig_h)
    return torch.cat([idx, boxes, rows[..., 4:6]], dim=-1)


def _to_original(
    boxes: torch.Tensor, pad_x: float, pad_y: float, scale: float, orig_w: int, orig_h: int
) -> torch.Tensor:
    """Input-pixel boxes ``(..., 4)`` x1, y1, x2, y2 in original pixels, clipped to the image."""
    out = boxes.clone()
    out[..., 0::2] = ((out[..., 0::2] - pad_x) / scale).clamp(0.0, float(orig_w))
    out[..., 1::2] = ((out[..., 1::2] - pad_y) / scale).clamp(0.0, float(orig_h))
    return out


def _to_coco(packed: np.ndarray, ids: np.ndarray) -> list[dict]:
    """COCO results dicts from packed rows; boxes left empty by clipping are dropped."""
    if len(packed) == 0:
        return []
    x1, y1, x2, y2 = packed[:, 1], packed[:, 2], packed[:, 3], packed[:, 4]
    w, h = x2 - x1, y2 - y1
    ok = (w > 0) & (h > 0)
    img = ids[packed[ok, 0].astype(np.int64)].tolist()
    boxes = np.round(np.stack([x1, y1, w, h], axis=1)[ok].astype(np.float64), 3).tolist()
    scores = np.round(packed[ok, 5].astype(np.float64), 5).tolist()
    cats = (packed[ok, 6].astype(np.int64) + 1).tolist()
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(img, cats, boxes, scores)
    ]
