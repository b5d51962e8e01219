"""Other tools' weights: converted models compute what the source networks compute.

The reference networks below are rebuilt here from the published layouts (the old tool's YoloBody /
YoloFusionBody with its Focus stem and SPP, the official YOLOv5 v5.0 / v6 layer lists), with their own
blocks, so a wrong key mapping, stem rearrangement or concatenation order shows as different outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fredfusion.cli import main
from fredfusion.model.convert import (
    OLD_TOOL_ANCHORS,
    convert_state_dict,
    focus_to_stem,
    parse_anchors,
    with_layout,
)
from fredfusion.model.detector import build_model
from fredfusion.model.weights import CheckpointError, load_model, load_weights, read_weights
from fredfusion.spec import SIZES

KEY_LIST = Path(__file__).resolve().parents[2].parent / "shared" / "old_tool_checkpoint_keys.json"
DEPTH, WIDTH = SIZES["n"]


# ---------------------------------------------------------------- reference blocks (old tool / YOLOv5 v5.0)
class RefConv(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=0.001, momentum=0.03)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y * torch.sigmoid(y)


class RefFocus(nn.Module):
    def __init__(self, c1: int, c2: int, k: int) -> None:
        super().__init__()
        self.conv = RefConv(4 * c1, c2, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]]
        return self.conv(torch.cat(parts, 1))


class RefBottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = RefConv(c, c, 1)
        self.cv2 = RefConv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class RefC3(nn.Module):
    def __init__(self, c1: int, c2: int, n: int, shortcut: bool = True) -> None:
        super().__init__()
        c_ = c2 // 2
        self.cv1 = RefConv(c1, c_)
        self.cv2 = RefConv(c1, c_)
        self.cv3 = RefConv(2 * c_, c2)
        self.m = nn.Sequential(*(RefBottleneck(c_, shortcut) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class RefSPP(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.cv1 = RefConv(c1, c1 // 2)
        self.cv2 = RefConv(c1 // 2 * 4, c2)
        self.m = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in (5, 9, 13))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class RefSPPF(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.cv1 = RefConv(c1, c1 // 2)
        self.cv2 = RefConv(c1 // 2 * 4, c2)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


# ---------------------------------------------------------------- the old tool's networks
class OldDarknet(nn.Module):
    def __init__(self, bc: int, bd: int) -> None:
        super().__init__()
        self.stem = RefFocus(3, bc, 3)
        self.dark2 = nn.Sequential(RefConv(bc, 2 * bc, 3, 2), RefC3(2 * bc, 2 * bc, bd))
        self.dark3 = nn.Sequential(RefConv(2 * bc, 4 * bc, 3, 2), RefC3(4 * bc, 4 * bc, 3 * bd))
        self.dark4 = nn.Sequential(RefConv(4 * bc, 8 * bc, 3, 2), RefC3(8 * bc, 8 * bc, 3 * bd))
        self.dark5 = nn.Sequential(
            RefConv(8 * bc, 16 * bc, 3, 2), RefSPP(16 * bc, 16 * bc), RefC3(16 * bc, 16 * bc, bd, False)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.dark3(self.dark2(self.stem(x)))
        p4 = self.dark4(x)
        return x, p4, self.dark5(p4)


class OldBody(nn.Module):
    """YoloBody (``fusion=False``) or YoloFusionBody (concat, compression ratio 1)."""

    def __init__(self, nc: int, fusion: bool = False) -> None:
        super().__init__()
        bc, bd = int(WIDTH * 64), max(round(DEPTH * 3), 1)
        self.fusion = fusion
        if fusion:
            self.backbone_rgb, self.backbone_event = OldDarknet(bc, bd), OldDarknet(bc, bd)
            self.compression_convs = nn.ModuleList(RefConv(2 * c, c) for c in (4 * bc, 8 * bc, 16 * bc))
        else:
            self.backbone = OldDarknet(bc, bd)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv_for_feat3 = RefConv(16 * bc, 8 * bc)
        self.conv3_for_upsample1 = RefC3(16 * bc, 8 * bc, bd, False)
        self.conv_for_feat2 = RefConv(8 * bc, 4 * bc)
        self.conv3_for_upsample2 = RefC3(8 * bc, 4 * bc, bd, False)
        self.down_sample1 = RefConv(4 * bc, 4 * bc, 3, 2)
        self.conv3_for_downsample1 = RefC3(8 * bc, 8 * bc, bd, False)
        self.down_sample2 = RefConv(8 * bc, 8 * bc, 3, 2)
        self.conv3_for_downsample2 = RefC3(16 * bc, 16 * bc, bd, False)
        self.yolo_head_P3 = nn.Conv2d(4 * bc, 3 * (5 + nc), 1)
        self.yolo_head_P4 = nn.Conv2d(8 * bc, 3 * (5 + nc), 1)
        self.yolo_head_P5 = nn.Conv2d(16 * bc, 3 * (5 + nc), 1)

    def forward(self, rgb: torch.Tensor, event: torch.Tensor | None = None) -> list[torch.Tensor]:
        if self.fusion:
            pairs = zip(self.backbone_rgb(rgb), self.backbone_event(event))
            f1, f2, f3 = (conv(torch.cat(p, 1)) for conv, p in zip(self.compression_convs, pairs))
            # the fusion body joins lateral first
            p5 = self.conv_for_feat3(f3)
            p4 = self.conv_for_feat2(self.conv3_for_upsample1(torch.cat([f2, self.upsample(p5)], 1)))
            p3 = self.conv3_for_upsample2(torch.cat([f1, self.upsample(p4)], 1))
            p4 = self.conv3_for_downsample1(torch.cat([p4, self.down_sample1(p3)], 1))
            p5 = self.conv3_for_downsample2(torch.cat([p5, self.down_sample2(p4)], 1))
        else:
            f1, f2, f3 = self.backbone(rgb)
            p5 = self.conv_for_feat3(f3)
            p4 = self.conv_for_feat2(self.conv3_for_upsample1(torch.cat([self.upsample(p5), f2], 1)))
            p3 = self.conv3_for_upsample2(torch.cat([self.upsample(p4), f1], 1))
            p4 = self.conv3_for_downsample1(torch.cat([self.down_sample1(p3), p4], 1))
            p5 = self.conv3_for_downsample2(torch.cat([self.down_sample2(p4), p5], 1))
        return [self.yolo_head_P3(p3), self.yolo_head_P4(p4), self.yolo_head_P5(p5)]


# ---------------------------------------------------------------- official YOLOv5 (model.N layer list)
class RefDetect(nn.Module):
    def __init__(self, nc: int, channels: tuple[int, int, int]) -> None:
        super().__init__()
        self.m = nn.ModuleList(nn.Conv2d(c, 3 * (5 + nc), 1) for c in channels)
        self.register_buffer("anchors", torch.rand(3, 3, 2) * 4 + 0.5)  # stride units


class OfficialYOLOv5(nn.Module):
    """The v6 (6x6 stem, C3 then SPPF) or v5.0 (Focus, SPP then C3 without shortcut) layer list."""

    def __init__(self, version: str, nc: int) -> None:
        super().__init__()
        c = [max(int(x * WIDTH), 8) for x in (64, 128, 256, 512, 1024)]
        n = [max(round(x * DEPTH), 1) for x in ((3, 9, 9, 3) if version == "v5.0" else (3, 6, 9, 3))]
        if version == "v5.0":
            first: nn.Module = RefFocus(3, c[0], 3)
            last = [RefSPP(c[4], c[4]), RefC3(c[4], c[4], n[3], False)]
        else:
            first = RefConv(3, c[0], 6, 2)
            first.conv.padding = (2, 2)
            last = [RefC3(c[4], c[4], n[3]), RefSPPF(c[4], c[4])]
        up = nn.Upsample(scale_factor=2, mode="nearest")
        nh = n[0]
        layers = [
            first,
            *(
                RefConv(c[i], c[i + 1], 3, 2) if j == 0 else RefC3(c[i + 1], c[i + 1], n[i])
                for i in range(3)
                for j in (0, 1)
            ),
            RefConv(c[3], c[4], 3, 2),
            *last,
            RefConv(c[4], c[3]),  # 10
            up,
            nn.Identity(),
            RefC3(2 * c[3], c[3], nh, False),  # 13
            RefConv(c[3], c[2]),  # 14
            up,
            nn.Identity(),
            RefC3(2 * c[2], c[2], nh, False),  # 17
            RefConv(c[2], c[2], 3, 2),  # 18
            nn.Identity(),
            RefC3(2 * c[2], c[3], nh, False),  # 20
            RefConv(c[3], c[3], 3, 2),  # 21
            nn.Identity(),
            RefC3(2 * c[3], c[4], nh, False),  # 23
            RefDetect(nc, (c[2], c[3], c[4])),  # 24
        ]
        self.model = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        out: dict[int, torch.Tensor] = {}
        for i in range(10):
            x = out[i] = m[i](x)
        x = out[10] = m[10](x)
        x = out[13] = m[13](torch.cat((m[11](x), out[6]), 1))
        x = out[14] = m[14](x)
        x = out[17] = m[17](torch.cat((m[15](x), out[4]), 1))
        x = out[20] = m[20](torch.cat((m[18](x), out[14]), 1))
        x = out[23] = m[23](torch.cat((m[21](x), out[10]), 1))
        return [conv(out[i]) for conv, i in zip(m[24].m, (17, 20, 23))]


# ---------------------------------------------------------------- helpers
def _randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights scaled by fan-in and random BatchNorm statistics (so no layer is an identity and
    activations neither vanish nor saturate), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point() or name.endswith("anchors"):
                continue
            r = torch.randn(t.shape, generator=g)
            if t.dim() == 4:
                t.copy_(r * 1.4 / t[0].numel() ** 0.5)
            elif name.endswith(("bn.weight", "running_var")):
                t.copy_(1 + 0.2 * r.abs())
            else:
                t.copy_(0.1 * r)
    return net.eval()


def _check_same(got: list[torch.Tensor], ref: nn.Module, *inputs: torch.Tensor) -> None:
    """``got`` equals the reference's maps for ``inputs`` (tolerance 1e-4), which differ from its maps for
    other inputs by 100x that (the comparison could not pass on outputs that ignore the input)."""
    with torch.no_grad():
        want = _as_maps(ref(*inputs))
        other = _as_maps(ref(*(x.flip(-1) for x in inputs)))
    for a, b, c in zip(got, want, other):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert float((b - c).abs().max()) > 1e-2


def _as_maps(raw: list[torch.Tensor]) -> list[torch.Tensor]:
    """(B, 3 * no, h, w) head outputs as (B, 3, h, w, no) maps."""
    return [r.view(r.shape[0], 3, -1, *r.shape[2:]).permute(0, 1, 3, 4, 2) for r in raw]


def _save(state: dict[str, torch.Tensor], path: Path, wrapper: str | None = None) -> Path:
    torch.save({wrapper: state} if wrapper else state, path)
    return path


def _loaded(modality: str, path: Path, fusion: str = "concat", nc: int = 1) -> tuple[nn.Module, list[str]]:
    source = read_weights(path)
    model = with_layout(build_model(modality, "n", fusion, num_classes=nc), source.layout)
    report = load_weights(model, source)
    return model.eval(), [*report.lines(path), str(report.skipped)]


# ---------------------------------------------------------------- tests
def test_focus_kernel_becomes_the_6x6_stem_kernel() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 12, 3, 3, generator=g)
    x = torch.randn(2, 3, 32, 48, generator=g)
    s2d = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
    want = nn.functional.conv2d(s2d, w, padding=1)
    got = nn.functional.conv2d(x, focus_to_stem(w), stride=2, padding=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("modality", "wrapper"), [("rgb", None), ("event", "state_dict")])
def test_old_single_modality_body_converts_to_the_same_network(
    modality: str, wrapper: str | None, tmp_path: Path
) -> None:
    ref = _randomise(OldBody(nc=1))
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}  # DataParallel prefix
    model, info = _loaded(modality, _save(state, tmp_path / "old.pth", wrapper))
    assert "skipped" not in " ".join(info[:-1]), info
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        got = model(x, None) if modality == "rgb" else model(None, x)
        stem = model.backbone.stem(x)
        ref_stem = ref.backbone.stem(x)
        feats, ref_feats = model.backbone(x), ref.backbone(x)
    torch.testing.assert_close(stem, ref_stem, rtol=1e-4, atol=1e-4)
    for a, b in zip(feats, ref_feats):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    _check_same(got, ref, x)
    torch.testing.assert_close(model.anchors, torch.tensor(OLD_TOOL_ANCHORS))


def test_old_fusion_body_converts_to_the_same_dual_concat_network(tmp_path: Path) -> None:
    ref = _randomise(OldBody(nc=1, fusion=True), seed=2)
    model, info = _loaded("dual", _save(ref.state_dict(), tmp_path / "fusion.pth", "model"))
    assert "skipped" not in " ".join(info[:-1]), info
    rgb, event = torch.rand(2, 3, 64, 96), torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        got = model(rgb, event)
    _check_same(got, ref, rgb, event)


@pytest.mark.parametrize("version", ["v6", "v5.0"])
def test_official_yolov5_state_dict_converts_to_the_same_network(version: str, tmp_path: Path) -> None:
    ref = _randomise(OfficialYOLOv5(version, nc=1), seed=3)
    model, info = _loaded("rgb", _save(ref.state_dict(), tmp_path / "yolov5n.pth"))
    assert "skipped" not in " ".join(info[:-1]) and "unused" not in " ".join(info), info
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        got = model(x)
    _check_same(got, ref, x)
    torch.testing.assert_close(
        model.anchors, ref.model[24].anchors * torch.tensor([8.0, 16.0, 32.0]).view(3, 1, 1)
    )


def test_every_old_tool_checkpoint_layout_converts_completely() -> None:
    if not KEY_LIST.is_file():
        pytest.skip(f"{KEY_LIST} not found (the shared key list of the old tool's checkpoints)")
    models = json.loads(KEY_LIST.read_text())["models"]
    assert len(models) == 8
    for name, shapes in models.items():
        kind, size = name.rsplit("_", 1)
        src = {k: torch.zeros(s) for k, s in shapes.items()}
        source = convert_state_dict(src)
        modality = "dual" if kind == "YoloFusionBody" else "rgb"
        assert (source.size, source.num_classes, source.modality, source.layout) == (
            size,
            1,
            "dual" if modality == "dual" else None,
            "v5",
        ), name
        model = with_layout(build_model(modality, size, "concat", num_classes=1), "v5")
        report = load_weights(model, source)
        assert not report.skipped and not report.unused and not source.unknown, (
            name,
            report.lines(Path(name)),
        )
        assert len(report.loaded) == report.total == len(model.state_dict()), name
        assert report.total == len(shapes) + 1, name  # every listed tensor, plus the anchors


def test_a_single_modality_model_takes_its_own_backbone_from_a_dual_file(tmp_path: Path) -> None:
    ref = _randomise(OldBody(nc=1, fusion=True), seed=6)
    path = _save(ref.state_dict(), tmp_path / "fred_fusion_best.pth")
    for modality, branch in (("event", ref.backbone_event), ("rgb", ref.backbone_rgb)):
        model, info = _loaded(modality, path)
        assert info[-2].startswith("weights: unused from the file:") and "fusion_p3" in info[-2], info
        torch.testing.assert_close(model.backbone.stage3[1].cv3.conv.weight, branch.dark4[1].cv3.conv.weight)


def test_coco_head_is_reinitialised_and_the_rest_loaded(tmp_path: Path) -> None:
    ref = _randomise(OldBody(nc=80), seed=4)
    path = _save(ref.state_dict(), tmp_path / "yolov5n.pth")
    source = read_weights(path)
    model = with_layout(build_model("dual", "n", "concat", num_classes=1), source.layout)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("head.", "anchors"))}
    report = load_weights(model, source)
    lines = report.lines(path)
    assert lines[0].startswith(f"weights: loaded {len(report.loaded)}/{report.total} tensors from {path}")
    assert "its backbone in both backbones" in lines[0]
    assert any("head" in line and "80 classes, the model 1: re-initialised" in line for line in lines), lines
    assert any("fusion_p3, fusion_p4, fusion_p5" in line and "not in the file" in line for line in lines), (
        lines
    )
    assert report.backbones
    for key, value in head_before.items():
        assert torch.equal(model.state_dict()[key], value), key
    rgb = ref.backbone.dark4[1].cv3.conv.weight
    for branch in (model.backbone_rgb, model.backbone_event):
        torch.testing.assert_close(branch.stage3[1].cv3.conv.weight, rgb)


def test_unknown_or_unreadable_files_are_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"junk\.pth: unknown weight names"):
        read_weights(_save({"foo.weight": torch.zeros(1)}, tmp_path / "junk.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"text\.pth: (refused to load|not a readable checkpoint)"):
        read_weights(tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match=r"nope\.pth: checkpoint not found"):
        read_weights(tmp_path / "nope.pth")


def test_convert_command_writes_a_checkpoint_eval_and_export_load(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ref = _randomise(OldBody(nc=1, fusion=True), seed=5)
    src = _save(ref.state_dict(), tmp_path / "fred_fusion_best.pth")
    out = tmp_path / "converted.pth"
    assert main(["convert", "--weights", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    model, payload = load_model(out)
    total = len(model.state_dict())
    assert f"weights: loaded {total}/{total} tensors from {src}" in printed
    assert (payload["meta"]["modality"], payload["meta"]["layout"], payload["meta"]["size"]) == (
        "dual",
        "v5",
        "n",
    )
    assert f"wrote {out}" in printed and "skipped" not in printed
    rgb, event = torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        got = model(rgb, event)
    _check_same(got, ref, rgb, event)

    assert main(["convert", "--weights", str(tmp_path / "nope.pth"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.pth" in err[0] and "Traceback" not in err[0]


def test_the_old_tools_anchors_file_replaces_its_default_anchors(tmp_path: Path) -> None:
    text = "8,6, 12,9, 18,12, 26,18, 38,26, 56,38, 80,54, 116,78, 168,112\n"
    anchors = parse_anchors(text)
    assert anchors.shape == (3, 3, 2) and anchors[0, 0].tolist() == [8.0, 6.0]
    with pytest.raises(ValueError, match="9 positive"):
        parse_anchors("10,13, 16,30")
    path = _save(_randomise(OldBody(nc=1)).state_dict(), tmp_path / "old.pth")
    torch.testing.assert_close(read_weights(path, anchors).state["anchors"], anchors)
