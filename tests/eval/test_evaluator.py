"""evaluate() on a tiny fake dataset and a fake model whose raw maps decode to known boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fredfusion.data.dataset import FrameBatch
from fredfusion.eval.coco_metrics import coco_map
from fredfusion.eval.evaluator import EvalResult, evaluate, predict_frames, restrict_gt
from fredfusion.eval.plots import COLOR_PRED, draw_pair_preview
from fredfusion.model.postprocess import decode

STORE_HW = (72, 128)  # store frames; originals are 1280x720 (scale 0.1)
INPUT_HW = (64, 96)  # letterbox: scale 0.75, pad_x 0, pad_y 5
ROW = 3  # grid row of every fake detection on the stride-8 map


def _expected_xywh(k: int) -> list[float]:
    """Original-pixel box the fake model reports for image k (worked out by hand below).

    Cell (row 3, col 2 + k), xy logits 0 -> centre ((2 + k + 0.5) * 8, 3.5 * 8) = (20 + 8k, 28);
    wh logits 0 -> the 16x12 anchor: input box [12 + 8k, 22, 28 + 8k, 34];
    store = (x - 0) / 0.75, (y - 5) / 0.75; original = store / 0.1.
    """
    x1, y1, x2, y2 = 12 + 8 * k, 22, 28 + 8 * k, 34
    ox1, ox2 = x1 / 0.75 / 0.1, x2 / 0.75 / 0.1
    oy1, oy2 = (y1 - 5) / 0.75 / 0.1, (y2 - 5) / 0.75 / 0.1
    return [ox1, oy1, ox2 - ox1, oy2 - oy1]


class FakeDataset:
    """PreparedDataset stand-in: image k has constant frames (RGB 10k+10, Event 10k+11) and one box."""

    def __init__(self, n: int = 5, modality: str = "dual") -> None:
        self.modality = modality
        self.store_hw = STORE_HW
        self.orig_hw = (720, 1280)
        self.scale = STORE_HW[1] / 1280
        self.images = [
            {"id": 100 + k, "width": 1280, "height": 720, "sequence_id": k % 2, "pair_status": "dual"}
            for k in range(n)
        ]
        self.ids = np.asarray([img["id"] for img in self.images], dtype=np.int64)
        anns = [
            {"id": k + 1, "image_id": 100 + k, "category_id": 1, "bbox": _expected_xywh(k), "iscrowd": 0}
            for k in range(n)
        ]
        for a in anns:
            a["area"] = a["bbox"][2] * a["bbox"][3]
        self.coco = {"images": self.images, "annotations": anns, "categories": [{"id": 1, "name": "drone"}]}

    def __len__(self) -> int:
        return len(self.ids)

    def load(
        self, ids: np.ndarray, modalities: tuple[str, ...] | None = None, out: dict | None = None
    ) -> FrameBatch:
        ids = np.asarray(ids, dtype=np.int64)
        k = ids - 100
        h, w = STORE_HW
        rgb = np.broadcast_to((10 * k + 10).astype(np.uint8)[:, None, None, None], (len(ids), h, w, 3)).copy()
        event = rgb + 1
        for name, frames in (out or {}).items():
            frames[...] = rgb if name == "rgb" else event
        boxes = []
        for i in ids:
            x, y, bw, bh = self.coco["annotations"][int(i) - 100]["bbox"]
            boxes.append(np.asarray([[x, y, x + bw, y + bh]], dtype=np.float32) * self.scale)
        ones = np.ones(len(ids), dtype=bool)
        return FrameBatch(ids=ids, rgb=rgb, event=event, boxes=boxes, has_rgb=ones, has_event=ones)


class FakeModel(nn.Module):
    """Emits one box per image at column 2 + k of the stride-8 map, k read from the frame value."""

    strides = (8, 16, 32)

    def __init__(self, modality: str = "dual") -> None:
        super().__init__()
        self.modality = modality
        self.register_buffer("anchors", torch.tensor([[[16.0, 12.0]] * 3] * 3))
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[bool, bool, bool]] = []

    def forward(self, rgb: torch.Tensor | None, event: torch.Tensor | None = None) -> list[torch.Tensor]:
        self.calls.append((rgb is not None, event is not None, self.training))
        ref = rgb if rgb is not None else event
        b, _, h, w = ref.shape
        maps = [torch.full((b, 3, h // s, w // s, 6), -30.0) for s in self.strides]
        for i in range(b):
            value = round(float(ref[i, 0, h // 2, w // 2]) * 255)
            if rgb is not None and event is not None:  # a true pair: event value = rgb value + 1
                assert round(float(event[i, 0, h // 2, w // 2]) * 255) == value + 1
            k = (value if rgb is not None else value - 1) // 10 - 1
            maps[0][i, 0, ROW, 2 + k, :4] = 0.0
            maps[0][i, 0, ROW, 2 + k, 4] = math.log(0.9 / 0.1)  # objectness 0.9
            maps[0][i, 0, ROW, 2 + k, 5] = 30.0  # class probability ~1
        return [m + 0 * self.weight for m in maps]

    def decode(self, preds: list[torch.Tensor]) -> torch.Tensor:
        """The detector interface's decoding (the YOLOv5 family's)."""
        return decode(preds, self.anchors, self.strides)


def test_detections_in_original_pixels_and_metrics() -> None:
    ds, model = FakeDataset(5), FakeModel("dual")
    model.train()
    res = evaluate(model, ds, batch_size=2, input_hw=INPUT_HW, conf=0.25)
    assert isinstance(res, EvalResult)
    assert model.training  # mode restored
    assert model.calls == [(True, True, False)] * 3  # 3 batches (2, 2, 1), both modalities, eval mode
    assert len(res.detections) == 5
    for k, det in enumerate(sorted(res.detections, key=lambda d: d["image_id"])):
        assert det["image_id"] == 100 + k and det["category_id"] == 1
        np.testing.assert_allclose(det["bbox"], _expected_xywh(k), atol=2e-3)
        assert det["score"] == pytest.approx(0.9, abs=1e-4)
    m = res.metrics
    assert m["mAP50"] == pytest.approx(1.0) and m["mAP50_95"] == pytest.approx(1.0)
    assert m["images"] == 5 and m["pairs_per_s"] > 0 and m["metrics_s"] >= 0
    assert m["val_loss"] is None
    assert [img["id"] for img in res.gt["images"]] == list(ds.ids)
    assert res.coco is not None and res.coco.precision.shape == (10, 101, 1, 4, 3)


def test_single_modality_models_get_only_their_frames() -> None:
    ds = FakeDataset(3)
    for modality, expect in (("rgb", (True, False, False)), ("event", (False, True, False))):
        model = FakeModel(modality)
        res = evaluate(model, ds, batch_size=4, input_hw=INPUT_HW, conf=0.25)
        assert model.calls == [expect]
        assert res.metrics["mAP50"] == pytest.approx(1.0)


def test_max_images_and_val_loss() -> None:
    ds, model = FakeDataset(5), FakeModel("dual")
    seen: list[torch.Tensor] = []

    def loss_fn(preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(targets.clone())
        return torch.tensor(float(len(targets))), torch.zeros(3)

    res = evaluate(
        model, ds, batch_size=2, input_hw=INPUT_HW, conf=0.25, loss_fn=loss_fn, max_images=3, progress=True
    )
    assert res.metrics["images"] == 3
    assert sorted(d["image_id"] for d in res.detections) == [100, 101, 102]
    assert [img["id"] for img in res.gt["images"]] == [100, 101, 102]
    assert len(res.gt["annotations"]) == 3
    # the loss is a batch sum (YoloLoss convention): batches of 2 and 1 boxes give (2 + 1) / 3 images
    assert res.metrics["val_loss"] == pytest.approx(1.0)
    # targets reach the loss in input pixels: store box * 0.75 + pad (0, 5)
    x, y, w, h = _expected_xywh(0)
    store = np.array([x, y, x + w, y + h]) * 0.1
    np.testing.assert_allclose(seen[0][0, 2:].numpy(), store * 0.75 + [0, 5, 0, 5], atol=1e-4)
    assert seen[1].shape == (1, 6)


def test_missing_modality_is_an_error() -> None:
    with pytest.raises(ValueError, match="dual model needs RGB and event"):
        evaluate(FakeModel("dual"), FakeDataset(2, modality="rgb"), input_hw=INPUT_HW)


def test_empty_and_low_scores() -> None:
    ds = FakeDataset(2)
    res = evaluate(FakeModel("dual"), ds, input_hw=INPUT_HW, conf=0.95)  # every score is 0.9
    assert res.detections == [] and res.metrics["mAP50"] == 0.0
    res = evaluate(FakeModel("dual"), ds, input_hw=INPUT_HW, max_images=0)
    assert res.metrics["images"] == 0 and res.detections == [] and res.metrics["mAP50"] == -1.0


def test_predict_frames_and_restrict_gt() -> None:
    ds, model = FakeDataset(3), FakeModel("dual")
    fb = ds.load(ds.ids)
    out = predict_frames(model, fb.rgb, fb.event, INPUT_HW, conf=0.25)
    assert [len(o) for o in out] == [1, 1, 1]
    x, y, w, h = _expected_xywh(2)
    np.testing.assert_allclose(out[2][0, :4], np.array([x, y, x + w, y + h]) * 0.1, atol=1e-3)
    sub = restrict_gt(ds.coco, [101])
    assert [i["id"] for i in sub["images"]] == [101] and [a["image_id"] for a in sub["annotations"]] == [101]
    assert sub["categories"] == ds.coco["categories"]


def test_draw_pair_preview() -> None:
    ds, model = FakeDataset(3), FakeModel("dual")
    model.train()
    picture = draw_pair_preview(model, ds, ds.ids[:2], INPUT_HW, conf=0.25)
    assert model.training
    # two tiles (22 px header + 72 px frames) with a 6 px gap; RGB | Event side by side
    assert picture.shape == (2 * (22 + 72) + 6, 2 * 128, 3) and picture.dtype == np.uint8
    red = (picture == np.array(COLOR_PRED, dtype=np.uint8)).all(-1)
    assert red[:94, :128].any() and red[:94, 128:].any() and red[100:].any()


def test_real_model_and_loss_smoke() -> None:
    from fredfusion.model import build_model
    from fredfusion.model.loss import YoloLoss

    torch.manual_seed(0)
    model = build_model("dual", "n", "concat")
    loss_fn = YoloLoss(model.anchors, model.strides, 1)
    res = evaluate(model, FakeDataset(3), batch_size=2, input_hw=INPUT_HW, loss_fn=loss_fn, max_det=20)
    assert res.metrics["images"] == 3 and math.isfinite(res.metrics["val_loss"])
    assert 0 < len(res.detections) <= 60
    boxes = np.asarray([d["bbox"] for d in res.detections])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 1280 + 1e-3).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 720 + 1e-3).all()
    assert (boxes[:, 2:] > 0).all()
    scored = coco_map(restrict_gt(FakeDataset(3).coco, FakeDataset(3).ids), res.detections).stats
    assert res.metrics["mAP50"] == scored["mAP50"] and res.metrics["mAP50_95"] == scored["mAP50_95"]


_TIMES = ("pairs_per_s", "infer_s", "wait_s", "wall_s", "metrics_s")


def _scores(res: EvalResult) -> dict:
    """The metrics of ``res`` without its timings."""
    return {k: v for k, v in res.metrics.items() if k not in _TIMES}


def test_pipelined_evaluation_equals_the_straightforward_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """With batches in flight the host converts batch k's rows after batch k + 1 (and later ones) was
    launched; detections (values and order), metrics and val_loss are bit-identical to landing every
    batch before the next starts, for either NMS, with a cut last batch (max_images) and a loss."""
    from fredfusion.eval import evaluator
    from fredfusion.model import build_model
    from fredfusion.model.loss import YoloLoss

    torch.manual_seed(0)
    model = build_model("dual", "n", "concat")
    loss_fn = YoloLoss(model.anchors, model.strides, 1)
    ds = FakeDataset(7)
    order: list[str] = []
    launch, land = evaluator._Pass.launch, evaluator._Pass.land

    def logged_launch(self: evaluator._Pass, batch: object, keep: int) -> evaluator._Flight:
        order.append(f"L{len(order)}")
        return launch(self, batch, keep)

    def logged_land(self: evaluator._Pass, flight: evaluator._Flight, bar: object = None) -> None:
        order.append(f"H{int(flight.ids[0]) - 100}")
        land(self, flight, bar)

    monkeypatch.setattr(evaluator._Pass, "launch", logged_launch)
    monkeypatch.setattr(evaluator._Pass, "land", logged_land)
    kw = dict(batch_size=2, input_hw=INPUT_HW, loss_fn=loss_fn, max_det=50, max_images=6)
    for dense in (False, True):
        runs = {}
        for in_flight in (0, 1, 3):
            order.clear()
            runs[in_flight] = evaluate(model, ds, dense=dense, in_flight=in_flight, **kw)
            lands = [step for step in order if step.startswith("H")]
            assert lands == ["H0", "H2", "H4"]  # first images of the batches, in order
            # batch k lands after batch k + in_flight was launched (all launched: the rest land)
            assert [step[0] for step in order] == {
                0: list("LHLHLH"),
                1: list("LLHLHH"),
                3: list("LLLHHH"),
            }[in_flight]
        ref = runs[0]
        assert len(ref.detections) > 50 and ref.metrics["images"] == 6
        assert math.isfinite(ref.metrics["val_loss"]) and ref.metrics["wall_s"] > 0
        for res in runs.values():
            assert res.detections == ref.detections
            assert _scores(res) == _scores(ref)
    with pytest.raises(ValueError, match="in_flight"):
        evaluate(model, ds, in_flight=-1, input_hw=INPUT_HW)


class RandomModel(FakeModel):
    """Random raw maps per image (seeded by the image's frame value): overlapping boxes of all sizes,
    scores that differ (so the order of equal scores, which no NMS promises, never counts)."""

    def forward(self, rgb: torch.Tensor | None, event: torch.Tensor | None = None) -> list[torch.Tensor]:
        ref = rgb if rgb is not None else event
        b, _, h, w = ref.shape
        maps = []
        for s in self.strides:
            per_image = []
            for i in range(b):
                seed = round(float(ref[i, 0, h // 2, w // 2]) * 255) * 100 + s
                m = torch.randn((3, h // s, w // s, 6), generator=torch.Generator().manual_seed(seed))
                m[..., 4] *= 2.0
                m[..., 5] = 30.0
                per_image.append(m)
            maps.append(torch.stack(per_image) + 0 * self.weight)
        return maps


def test_dense_nms_in_the_evaluator_and_its_unconverged_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dense NMS gives the torchvision path's detections (batches of 3 x 378 candidates: torchvision's
    per-class loop on a CPU); a batch whose fixed point is not reached in the unexamined rounds is
    settled on the host and ends the same."""
    import functools

    from fredfusion.model import postprocess

    model, ds = RandomModel("dual"), FakeDataset(6)
    kw = dict(batch_size=3, input_hw=INPUT_HW, max_det=40)
    ref = evaluate(model, ds, dense=False, **kw)
    dense = evaluate(model, ds, dense=True, **kw)
    assert len(ref.detections) > 200  # up to 40 per image (boxes clipped to nothing are dropped)
    assert dense.detections == ref.detections and _scores(dense) == _scores(ref)
    settled: list[bool] = []
    real_settle = postprocess.settle

    def watched(dets: postprocess.DenseDetections, *args: object, **kwargs: object) -> object:
        settled.append(bool(dets.converged))
        return real_settle(dets, *args, **kwargs)

    monkeypatch.setattr(postprocess, "dense_nms", functools.partial(postprocess.dense_nms, rounds=1))
    monkeypatch.setattr(postprocess, "settle", watched)
    one_round = evaluate(model, ds, dense=True, **kw)
    assert settled == [False, False]  # both batches needed more than one round
    assert one_round.detections == ref.detections


@pytest.mark.parametrize("arch", ["yolov5", "yolov8"])
def test_device_stage_never_syncs_on_fake_cuda_tensors(arch: str) -> None:
    """The device stage of an evaluation batch (letterbox, channels-last model, decode, dense NMS,
    packing) on fake CUDA tensors: shapes only, no data. Under FakeTensorMode every op that needs
    values on the host (``.item()``, ``bool(t)``, ``nonzero``, boolean-mask indexing) raises, as the
    torchvision NMS path does; no copy between host and device happens either."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from fredfusion.eval.evaluator import _forward, _pack_dense
    from fredfusion.model import build_model
    from fredfusion.model.postprocess import _grid, dense_nms, non_max_suppression

    aten = torch.ops.aten

    class HostDeviceCopies(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.copies: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (aten._to_copy.default, aten.copy_.default):
                src, dst = (args[1], args[0]) if func is aten.copy_.default else (args[0], out)
                if src.device.type != dst.device.type:
                    self.copies.append(f"{func}: {src.device} -> {dst.device} {tuple(src.shape)}")
            return out

    model = build_model("dual", "n", arch=arch).eval()
    mode = FakeTensorMode()
    try:
        with torch.no_grad(), mode:
            dev = torch.device("cuda")
            for mod in model.modules():  # the weights as fake channels-last CUDA tensors
                for store in (mod._parameters, mod._buffers):
                    for name, t in list(store.items()):
                        if t is not None:
                            fake = mode.from_tensor(t).to(dev)
                            store[name] = (
                                fake.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else fake
                            )
            rgb, event = (torch.empty((4, 3, 72, 128), dtype=torch.uint8, device=dev) for _ in range(2))
            with HostDeviceCopies() as log:
                preds, _, (pad_x, pad_y, scale) = _forward(model, rgb, event, (96, 160), channels_last=True)
                decoded = model.decode(preds)
                dets = dense_nms(decoded, 0.001, 0.45, 300)
                rows = _pack_dense(dets.rows(), pad_x, pad_y, scale * 0.1, 1280, 720)
            with pytest.raises(DynamicOutputShapeException, match="nonzero"):  # the torchvision path
                non_max_suppression(decoded, 0.001, 0.45, 300)
    finally:
        _grid.cache_clear()  # no fake grids left for later real CUDA tensors
    k = decoded.shape[1]  # fewer than 1000 anchors at 96x160: all are candidates
    assert rows.shape == (4, k, 7) and rows.device.type == "cuda"
    assert dets.keep.shape == (4, k) and dets.converged.shape == ()
    assert log.copies == []
