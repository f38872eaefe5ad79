"""Descriptions as data: panels of classes with a canonical sentence and paraphrases
(``assets/panels.json``) and WBCAtt morphology phrases (``assets/attributes.json``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.settings import ASSETS_DIR

PANELS_FILE = ASSETS_DIR / "panels.json"
ATTRIBUTES_FILE = ASSETS_DIR / "attributes.json"


@dataclass(frozen=True)
class CellClass:
    key: str  # class key, exactly the data folder name
    name: str  # short display name
    sentence: str  # canonical sentence shown to the user
    paraphrases: tuple[str, ...]  # other wordings, used in training and in the class prototype

    @property
    def all_sentences(self) -> tuple[str, ...]:
        return (self.sentence, *self.paraphrases)


@dataclass(frozen=True)
class Panel:
    name: str  # panel key, e.g. "blood_cells"
    title: str  # human title
    validated: bool  # False: no images of these classes were available to train or test
    warning: str  # shown wherever the panel is shown when not validated
    source: str  # where the classes/images come from
    classes: tuple[CellClass, ...]

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.classes]

    def cell_class(self, key: str) -> CellClass:
        for cell_class in self.classes:
            if cell_class.key == key:
                return cell_class
        raise KeyError(f"Class {key!r} is not in panel {self.name!r}")


def panels_from_dict(data: dict) -> dict[str, Panel]:
    """Parse the panels JSON structure (also stored in every model sidecar)."""
    panels = {}
    for name, spec in data.items():
        classes = tuple(
            CellClass(key, c.get("name", key), c["sentence"], tuple(c.get("paraphrases", ())))
            for key, c in spec["classes"].items())
        panels[name] = Panel(name, spec.get("title", name), bool(spec.get("validated", False)),
                             spec.get("warning", ""), spec.get("source", ""), classes)
    return panels


def load_panels(path: Path | str = PANELS_FILE) -> dict[str, Panel]:
    """Panels from a JSON file (default: the shipped ``assets/panels.json``)."""
    return panels_from_dict(json.loads(Path(path).read_text()))


def load_attribute_phrases(path: Path | str = ATTRIBUTES_FILE) -> dict[str, dict[str, list[str]]]:
    """{attribute: {value: [phrases...]}}; the first phrase of a value is the display one."""
    data = json.loads(Path(path).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


class PanelTieError(ValueError):
    """Several panels hold equally many of the given classes; the message names them and asks for --panel."""


def infer_panel(panels: dict[str, Panel], class_keys: set[str], what: str = "class folders") -> str | None:
    """The panel holding the most of `class_keys` (so one holding all of them wins); None when no
    panel holds any. The one rule of every command that infers a panel (evaluate, calibrate,
    gan_quality). A tie raises `PanelTieError` naming the tied panels, which of the `what` (e.g.
    "class folders") each holds, and --panel: a guess would count the other panel's classes as
    unknown cells (evaluate) or score the wrong classes (calibrate, gan_quality), and would hang
    on the panels file's order or sizes."""
    overlap = {name: len(class_keys & set(panel.keys)) for name, panel in panels.items()}
    most = max(overlap.values(), default=0)
    best = [name for name, n in overlap.items() if most and n == most]
    if len(best) > 1:
        held = "; ".join(f"{name}: {', '.join(sorted(class_keys & set(panels[name].keys)))}" for name in best)
        raise PanelTieError(f"the {what} fit panels {' and '.join(best)} equally ({held}); "
                            "pass --panel NAME to choose one")
    return best[0] if best else None
