"""Frozen sentence features of every training sentence, computed once per run.

The text transformer is frozen (see `core.text_tower`), so a sentence's features never
change: each step only samples a paraphrase per class (and a phrase per attribute value)
and runs the small trainable projection on the cached features.

    python -m training.text_features --write FILE [--config NAME]

writes the frozen tower's features of every sentence the training and the export use (all
panels' sentences and paraphrases, every attribute phrase) to FILE, for a training machine
without the text model: ``python -m training.train ... --sentence-features FILE``.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from core.model import DualEncoder
from core.config import load_model_config
from core.panels import Panel, load_attribute_phrases, load_panels
from core.text_tower import write_sentence_features
from training.cli import run_main


class SentenceFeatureCache:
    """Frozen text-tower features of every training sentence and phrase, computed once."""
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


def every_sentence(panels: dict[str, Panel], phrases: dict[str, dict[str, list[str]]]) -> list[str]:
    """Every sentence that training or export encodes: each class's sentences in every panel
    (untrained panels too: export stores their prototypes) and every attribute phrase."""
    sentences = [s for panel in panels.values() for c in panel.classes for s in c.all_sentences]
    return sentences + [text for values in phrases.values() for texts in values.values() for text in texts]


def main(argv=None) -> int:
    """Write the sentence-feature file (see the module docstring)."""
    p = argparse.ArgumentParser(description="Write the frozen text tower's features of every training sentence.")
    p.add_argument("--write", required=True, help="output file (safetensors)")
    p.add_argument("--config", default="hemascribe-regnetx004-96", help="model config whose text tower to use")
    args = p.parse_args(argv)
    config = load_model_config(args.config)
    model = DualEncoder(config)
    sentences = every_sentence(load_panels(), load_attribute_phrases())
    path = write_sentence_features(model.sentence_encoder(), sentences, args.write, config.text_model,
                                   config.text_pooler)
    print(f"wrote {path}: {len(set(sentences))} sentences from {config.text_model}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
