"""Optimizer choice and learning rates."""

from __future__ import annotations

import pytest

from fredfusion.engine.optim import AUTO_ADAMW_LR, AUTO_MAX_STEPS, resolve_optimizer, scaled_lr


@pytest.mark.parametrize(
    ("name", "steps", "expected"),
    [
        ("auto", 390, ("adamw", AUTO_ADAMW_LR)),
        ("auto", AUTO_MAX_STEPS, ("adamw", AUTO_ADAMW_LR)),
        ("auto", AUTO_MAX_STEPS + 1, ("sgd", None)),
        ("sgd", 10, ("sgd", None)),
        ("adamw", 10**6, ("adamw", None)),
    ],
)
def test_auto_picks_adamw_for_short_schedules_only(name: str, steps: int, expected: tuple) -> None:
    assert resolve_optimizer(name, steps) == expected


def test_scaled_lr_follows_the_seed_rule() -> None:
    assert scaled_lr(1e-2, 16, "sgd") == pytest.approx(2.5e-3)  # Init_lr * batch / 64
    assert scaled_lr(1e-2, 1, "sgd") == pytest.approx(5e-4)  # clamped below
    assert scaled_lr(1e-3, 16, "adamw") == pytest.approx(3e-4)  # Adam range 3e-4 .. 1e-3
