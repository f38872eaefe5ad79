"""Morphology from the image: each WBCAtt attribute predicted by matching its candidate
phrases, then composed into one sentence a hematologist can check phrase by phrase."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from core.checkpoint import ModelBundle

# attributes whose phrase only makes sense for white cells with cytoplasm and granules
_ORDER = ["cell_size", "cell_shape", "nucleus_shape", "chromatin_density", "nuclear_cytoplasmic_ratio",
          "cytoplasm_texture", "cytoplasm_colour", "cytoplasm_vacuole", "granule_type", "granule_colour", "granularity"]


# confidence a phrase needs to be stated when its attribute has no calibrated threshold
DEFAULT_PHRASE_THRESHOLD = 0.6

# WBCAtt annotates these five white-cell types only: the phrases (nucleus, granules, N:C ratio)
# were never learned for, and mean nothing on, a platelet, an erythroblast or an immature
# granulocyte, so no morphology sentence is composed for other classes.
ATTRIBUTE_CLASSES = frozenset({"basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"})
# attributes that name a colour: never stated as certain for an image without colour
COLOUR_ATTRIBUTES = frozenset({"cytoplasm_colour", "granule_colour"})
# largest channel difference (0-255) still counted as grey: JPEG noise on a grey image
_GREY_TOLERANCE = 6


@dataclass(frozen=True)
class AttributePrediction:
    """One predicted morphology attribute, its phrase and whether it is stated or marked uncertain."""
    attribute: str  # WBCAtt column name
    value: str  # predicted value (WBCAtt vocabulary)
    phrase: str  # display phrase of the value
    confidence: float  # softmax probability over the attribute's values
    certain: bool  # confidence at or above the attribute's threshold

    @property
    def label(self) -> str:
        """The phrase as it reads on its own, e.g. in a list ('no granules', not 'no')."""
        standalone = {"granule_type": "no granules", "granule_colour": "no granule colour"}
        return standalone.get(self.attribute, self.phrase) if self.value == "nil" else self.phrase


def attribute_probabilities(bundle: ModelBundle, name: str, embeddings: torch.Tensor) -> torch.Tensor:
    """Softmax over the attribute's values (vocabulary order) for one embedding (D,) -> (V,) or a
    batch (N, D) -> (N, V); the one scoring rule both prediction and calibration use."""
    scale = float(bundle.model.scale().detach())
    return torch.softmax(embeddings @ bundle.attribute_prototypes[name].t() * scale, dim=-1)


def predict_attributes(bundle: ModelBundle, embedding: torch.Tensor,
                       min_confidence: float | None = None) -> list[AttributePrediction]:
    """Every attribute the model was trained on, in display order."""
    phrases = bundle.sidecar.get("attribute_phrases", {})
    thresholds = bundle.sidecar.get("calibration", {}).get("attributes", {})
    out = []
    for name in [a for a in _ORDER if a in bundle.attribute_prototypes] + \
                [a for a in bundle.attribute_prototypes if a not in _ORDER]:
        values = list(phrases[name])
        probs = attribute_probabilities(bundle, name, embedding)
        best = int(probs.argmax())
        threshold = min_confidence if min_confidence is not None else thresholds.get(name, DEFAULT_PHRASE_THRESHOLD)
        # a None threshold: no confidence reached the target accuracy on val, so never stated
        out.append(AttributePrediction(name, values[best], phrases[name][values[best]][0], float(probs[best]),
                                       threshold is not None and float(probs[best]) >= threshold))
    return out


def compose_sentence(predictions: list[AttributePrediction]) -> str:
    """E.g. "Large round cell with a bilobed nucleus, dense chromatin and a low N:C ratio;
    clear light-blue cytoplasm with round red granules." Uncertain phrases carry "(?)"."""
    p = {a.attribute: a for a in predictions}

    def word(name: str, strip: str = "") -> str:
        if name not in p:
            return ""
        return p[name].phrase.replace(strip, "") + ("" if p[name].certain else " (?)")

    cell = " ".join(w for w in (word("cell_size", " cell"), word("cell_shape"), "cell") if w)
    nucleus = [w for w in (word("nucleus_shape"), word("chromatin_density"), word("nuclear_cytoplasmic_ratio")) if w]
    sentence = cell[0].upper() + cell[1:] + (" with " + _join(nucleus) if nucleus else "")
    cytoplasm = " ".join(w for w in (word("cytoplasm_texture"), word("cytoplasm_colour"), "cytoplasm") if w)
    if "granule_type" in p and p["granule_type"].value != "nil":
        colour = word("granule_colour") if p.get("granule_colour") and p["granule_colour"].value != "nil" else ""
        cytoplasm += " with " + " ".join(w for w in (word("granule_type"), colour, "granules") if w)
    elif "granule_type" in p:
        cytoplasm += " without granules" + ("" if p["granule_type"].certain else " (?)")
    if "cytoplasm_vacuole" in p and p["cytoplasm_vacuole"].value == "yes":
        # after "without granules", "and vacuoles" would read as "without vacuoles" too
        granular = " with " in cytoplasm
        cytoplasm += (" and " if granular else ", with ") + word("cytoplasm_vacuole")
    return f"{sentence}; {cytoplasm}."


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def stated_phrase_accuracy(sidecar: dict) -> float | None:
    """Mean over attributes of the held-out accuracy of phrases stated without "(?)", as
    `training.calibrate --attributes` measured it; None when the thresholds were not calibrated."""
    report = sidecar.get("calibration", {}).get("attributes_report", {}).get("per_attribute", {})
    accuracies = [r["accuracy_certain"] for r in report.values() if r.get("accuracy_certain") is not None]
    return sum(accuracies) / len(accuracies) if accuracies else None


def has_morphology(class_key: str | None) -> bool:
    """Whether morphology phrases are given for a described class (see ATTRIBUTE_CLASSES)."""
    return class_key in ATTRIBUTE_CLASSES


def is_colourless(image) -> bool:
    """True when a PIL image carries no colour (grey, or RGB with equal channels)."""
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    return bool(np.percentile(spread, 99) <= _GREY_TOLERANCE)


def describe_morphology(bundle: ModelBundle, image) -> tuple[str, list[AttributePrediction]]:
    """Morphology sentence and the per-attribute predictions for one PIL image
    ("", []) when the model was not trained on attributes. On an image without colour the
    colour phrases are never certain: whatever the model matched, it cannot have seen a colour."""
    from core.describe import embed_images

    if not bundle.attribute_prototypes:
        return "", []
    embedding = embed_images(bundle, [image])[0][0]
    predictions = predict_attributes(bundle, embedding)
    if is_colourless(image):
        predictions = [replace(p, certain=False) if p.attribute in COLOUR_ATTRIBUTES else p for p in predictions]
    return compose_sentence(predictions), predictions
