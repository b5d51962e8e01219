import numpy as np
import pytest
import torch

from fredfusion.model.anchors import anchor_recall, default_anchors, kmeans_anchors

CENTRES = np.array(
    [[8, 6], [16, 10], [24, 20], [40, 28], [60, 50], [90, 60], [130, 100], [200, 140], [300, 250]],
    dtype=np.float64,
)


def _clusters(per: int = 40, sigma: float = 0.04, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c * np.exp(rng.normal(0, sigma, size=(per, 2))) for c in CENTRES])


def test_default_anchors_shape_and_order() -> None:
    a = default_anchors()
    assert a.shape == (3, 3, 2)
    assert a.dtype == torch.float32
    area = a.prod(-1).flatten()
    assert torch.all(area[1:] > area[:-1])  # increasing size from P3 to P5
    assert torch.all(a[..., 0] >= a[..., 1])  # drones: wider than tall


def test_default_anchors_cover_fred_sizes() -> None:
    # FRED at 640 wide: boxes from ~6 to ~120 px, average ~25x17
    wh = np.array([[6, 4], [25, 17], [50, 34], [120, 80], [10, 10]], dtype=np.float64)
    assert anchor_recall(wh, default_anchors().numpy(), 4.0) == 1.0


def test_anchor_recall_hand_computed() -> None:
    wh = np.array([[10, 10], [100, 10], [30, 12], [0, 5]], dtype=np.float64)
    anchors = np.array([[10, 10]], dtype=np.float64)
    # metrics: 1, 10, 3 (the 0-wide box is ignored) -> 2 of 3 below 4
    assert anchor_recall(wh, anchors, 4.0) == pytest.approx(2 / 3)
    assert anchor_recall(wh, anchors, 2.9) == pytest.approx(1 / 3)
    assert anchor_recall(wh, np.array([[10, 10], [100, 10]]), 4.0) == 1.0


def test_anchor_recall_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        anchor_recall(np.zeros((3, 3)), np.ones((9, 2)))
    with pytest.raises(ValueError, match="at least one box"):
        anchor_recall(np.zeros((3, 2)), np.ones((9, 2)))


def test_kmeans_recovers_clusters() -> None:
    wh = _clusters()
    anchors, recall = kmeans_anchors(wh, n=9, thr=4.0, seed=0)
    assert anchors.shape == (9, 2)
    assert np.all(np.diff(anchors.prod(1)) > 0)  # sorted by area
    np.testing.assert_allclose(anchors, CENTRES, rtol=0.05)
    assert recall == 1.0


def test_kmeans_deterministic_per_seed() -> None:
    wh = np.random.default_rng(3).uniform(4, 120, size=(200, 2))
    a1, r1 = kmeans_anchors(wh, seed=5)
    a2, r2 = kmeans_anchors(wh, seed=5)
    np.testing.assert_array_equal(a1, a2)
    assert r1 == r2


def _fitness(wh: np.ndarray, anchors: np.ndarray, thr: float = 4.0) -> float:
    best = np.array([max(min(w / a, a / w, h / b, b / h) for a, b in anchors) for w, h in wh])
    return float(np.mean(best * (best > 1 / thr)))


def test_kmeans_evolve_improves_ratio_fitness() -> None:
    wh = np.random.default_rng(4).lognormal(np.log(25), 0.6, size=(300, 2))
    base, _ = kmeans_anchors(wh, seed=0)
    evolved, recall = kmeans_anchors(wh, seed=0, evolve=200)
    assert evolved.shape == (9, 2)
    assert np.all(np.diff(evolved.prod(1)) >= 0)
    assert _fitness(wh, evolved) > _fitness(wh, base)
    assert recall == anchor_recall(wh, evolved, 4.0)


def test_kmeans_too_few_boxes_falls_back_to_defaults() -> None:
    wh = np.array([[10, 8], [20, 15], [1, 1]], dtype=np.float64)
    with pytest.warns(UserWarning, match="default anchors"):
        anchors, recall = kmeans_anchors(wh)
    np.testing.assert_array_equal(anchors, default_anchors().numpy().reshape(-1, 2))
    assert recall == pytest.approx(2 / 3)  # the 1x1 box is 8x smaller than the smallest anchor
    with pytest.raises(ValueError, match="at least 4 distinct"):
        kmeans_anchors(wh, n=4)


def test_kmeans_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        kmeans_anchors(np.ones(10))
    with pytest.raises(ValueError, match="thr"):
        kmeans_anchors(_clusters(), thr=1.0)
