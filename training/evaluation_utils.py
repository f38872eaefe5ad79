"""Small helpers shared by training-time validation and the evaluation CLI."""
from __future__ import annotations

import torch

from core.model import DualEncoder, encode_views


@torch.no_grad()
def embed_uint8(model: DualEncoder, images: torch.Tensor, batch_size: int = 256, views: int = 1) -> torch.Tensor:
    """Unit-norm embeddings (on the CPU) of uint8 (N, 3, S, S) CPU images, in eval mode, on
    whatever device the model is on, averaged over `views` turned copies (`core.model.encode_views`)."""
    model.eval()
    device = model.logit_scale.device
    chunks = [encode_views(model, images[i:i + batch_size].to(device).float() / 255, views).cpu()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.embed_dim)


def panel_accuracy(model: DualEncoder, data, prototypes: torch.Tensor) -> float:
    """Accuracy of nearest-prototype classification restricted to the classes present in
    `data` (the val folder's panel), as the app would classify within a panel."""
    present = sorted(set(data.labels.tolist()))
    if not present:
        return float("nan")
    embeddings = embed_uint8(model, data.images)
    sims = embeddings @ prototypes[present].cpu().t()
    predicted = torch.tensor(present)[sims.argmax(dim=1)]
    return float((predicted == data.labels).float().mean())


def seeded_halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held_out) row indices: a seeded shuffle of range(n) cut in two. Calibration fits on the
    first half and reports on the second; whatever is added to a calibrated model later must use
    the same halves (same n, same seed), or its held-out numbers include fitted rows."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2], order[n // 2:]
