"""Replace batch normalization by group normalization in a timm trunk.

Why: batch-norm running statistics are learned from one site's colour and zoom
distribution and applied unchanged at test time; on another hospital's images they are
wrong (a named culprit of cross-site collapse). Group norm normalises every image by its
own statistics, identically in training and at test time.
"""
from __future__ import annotations

import torch.nn as nn
from timm.layers import BatchNormAct2d, GroupNormAct


def _groups(channels: int, max_groups: int = 16) -> int:
    groups = min(max_groups, channels)
    while channels % groups:
        groups -= 1
    return groups


def _group_norm_like(module: nn.BatchNorm2d) -> nn.Module:
    channels = module.num_features
    if isinstance(module, BatchNormAct2d):
        replacement = GroupNormAct(channels, num_groups=_groups(channels), eps=module.eps)
        replacement.act = module.act  # keep the fused activation timm put inside the norm
        replacement.drop = module.drop
        return replacement
    return nn.GroupNorm(_groups(channels), channels, eps=module.eps)


def batchnorm_to_groupnorm(model: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d (incl. timm's BatchNormAct2d) for GroupNorm, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, _group_norm_like(child))
        else:
            batchnorm_to_groupnorm(child)
    return model
