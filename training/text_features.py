"""Frozen sentence features of every training sentence, computed once per run.

The text transformer is frozen (see `core.text_tower`), so a sentence's features never
change: each step only samples a paraphrase per class (and a phrase per attribute value)
and runs the small trainable projection on the cached features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.model import DualEncoder
from core.panels import Panel


class SentenceFeatureCache:
    def __init__(self, model: DualEncoder, panels: dict[str, Panel], classes: list[str],
                 phrases: dict[str, dict[str, list[str]]]):
        by_key = {c.key: c for panel in panels.values() for c in panel.classes}
        missing = [key for key in classes if key not in by_key]
        if missing:
            raise ValueError(f"Classes without sentences in assets/panels.json: {missing}")
        encoder = model.sentence_encoder()
        self.class_features = [encoder(list(by_key[key].all_sentences)) for key in classes]
        self.class_ids = torch.arange(len(classes))
        self.value_features = [encoder(texts) for values in phrases.values() for texts in values.values()]
        if model.config.center_text_features:
            every = torch.cat(self.class_features + self.value_features)
            model.text_feature_mean.copy_(every.mean(dim=0))
        self.slices, start = [], 0
        for values in phrases.values():
            self.slices.append(slice(start, start + len(values)))
            start += len(values)

    @staticmethod
    def _sample(groups: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        picks = [g[int(torch.randint(len(g), (1,), generator=generator))] for g in groups]
        return torch.stack(picks)

    def sample_class_features(self, generator: torch.Generator) -> torch.Tensor:
        """Features of one random paraphrase per class: (C, text_width), row = class id."""
        return self._sample(self.class_features, generator)

    def sample_attribute_features(self, generator: torch.Generator) -> torch.Tensor:
        """Features of one random phrase per attribute value; `self.slices` maps attributes to rows."""
        return self._sample(self.value_features, generator)

    @torch.no_grad()
    def class_prototypes(self, model: DualEncoder) -> torch.Tensor:
        """(C, D) mean embedding over all sentences of each class, normalised."""
        means = [model.project_sentence_features(f).mean(dim=0) for f in self.class_features]
        return F.normalize(torch.stack(means), dim=-1)
