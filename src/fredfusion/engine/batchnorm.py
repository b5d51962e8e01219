"""Precise BatchNorm: re-estimate BN running statistics of the weights being evaluated.

BN running averages (momentum 0.03) lag behind fast-moving weights early in training, so an evaluation
after a few hundred steps can score near zero although the network already detects in train mode.
Re-estimating the statistics on a few hundred training images (true averages, not a running blend)
before each evaluation removes that lag; it costs a few forward passes without gradients.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fredfusion.data.augment import letterbox_batch
from fredfusion.data.dataset import PreparedDataset
from fredfusion.spec import frames_for, model_inputs


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    dataset: PreparedDataset,
    input_hw: tuple[int, int],
    images: int = 256,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    seed: int = 0,
    frozen: list[nn.Module] | None = None,
) -> int:
    """Set every BN layer's running mean/var to its average over `images` letterboxed train images that
    have every frame the model reads (the true pairs for dual: what it is evaluated on).

    BN layers inside `frozen` modules (backbones of the freeze phase) keep their statistics.
    Returns the number of images used (0 when the model has no BatchNorm or images is 0).
    """
    keep = {id(m) for module in frozen or [] for m in module.modules()}
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in keep]
    has = {"rgb": dataset.has_rgb, "event": dataset.has_event}
    whole = np.logical_and.reduce([has[k] for k in frames_for(getattr(model, "modality", "dual"))])
    pool = dataset.ids[whole]
    if not bns or images <= 0 or len(pool) == 0:
        return 0
    rng = np.random.default_rng(seed)
    ids = rng.choice(pool, size=min(images, len(pool)), replace=False)
    was_training = model.training
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.train()
    for module in frozen or []:
        module.eval()
    device = torch.device(device)
    try:
        for start in range(0, len(ids), batch_size):
            batch = dataset.load(ids[start : start + batch_size])
            rgb = torch.from_numpy(batch.rgb).to(device).permute(0, 3, 1, 2)
            event = torch.from_numpy(batch.event).to(device).permute(0, 3, 1, 2)
            rgb_f, event_f, _, _, _ = letterbox_batch(rgb, event, input_hw)
            inputs = model_inputs(getattr(model, "modality", "dual"), rgb_f, event_f)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                model(*inputs)
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum
        model.train(was_training)
    return len(ids)
