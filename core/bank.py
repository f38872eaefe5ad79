"""The sentence bank: class prototypes per panel and phrase prototypes per attribute.

As in open_clip's zero-shot classifier: encode every sentence of a class once (canonical
sentence and paraphrases), average, normalise, stack. Computed once when a model is
exported and stored in its weights file, so describing never runs the text tower.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.model import DualEncoder
from core.panels import Panel


@torch.no_grad()
def encode_sentence_groups(model: DualEncoder, groups: list[list[str]]) -> torch.Tensor:
    """(len(groups), D): the normalised mean embedding of each group of sentences."""
    flat = [sentence for group in groups for sentence in group]
    embeddings = model.encode_text(flat)
    out, start = [], 0
    for group in groups:
        out.append(embeddings[start:start + len(group)].mean(dim=0))
        start += len(group)
    return F.normalize(torch.stack(out), dim=-1)


def panel_prototypes(model: DualEncoder, panels: dict[str, Panel]) -> dict[str, torch.Tensor]:
    """{panel: (K, D)} class prototypes in the panel's class order."""
    return {name: encode_sentence_groups(model, [list(c.all_sentences) for c in panel.classes])
            for name, panel in panels.items()}


def attribute_prototypes(model: DualEncoder, phrases: dict[str, dict[str, list[str]]]) -> dict[str, torch.Tensor]:
    """{attribute: (V, D)} value prototypes in the vocabulary's value order."""
    return {name: encode_sentence_groups(model, list(values.values())) for name, values in phrases.items()}
