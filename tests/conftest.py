"""Shared fixtures: one tiny synthetic FRED sample, prepared once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder from 5 synthetic sequences of 16 frames at 320x180 (store 128x72)."""
    from fredfusion.data.prepare import prepare
    from fredfusion.data.synth import write_sample

    root = tmp_path_factory.mktemp("tiny")
    write_sample(root / "fred", sequences=5, frames=16, width=320, height=180, seed=1)
    prepare(root / "fred", root / "prepared", imgsz=128, workers=0, progress=False, log=lambda _m: None)
    return root / "prepared"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the test (restored after): tiny models gain nothing from more,
    and on a shared 2-core machine spinning threads slowed small steps down ~10x."""
    from fredfusion.bench import torch_threads

    with torch_threads(1):
        yield
