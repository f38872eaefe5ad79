"""Descriptions as data: panels of classes with a canonical sentence and paraphrases
(``assets/panels.json``) and WBCAtt morphology phrases (``assets/attributes.json``)."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.settings import ASSETS_DIR

PANELS_FILE = ASSETS_DIR / "panels.json"
ATTRIBUTES_FILE = ASSETS_DIR / "attributes.json"


@dataclass(frozen=True)
class CellClass:
    """One class of a panel: key, display name, canonical sentence and training paraphrases."""
    key: str  # class key, exactly the data folder name
    name: str  # short display name
    sentence: str  # canonical sentence shown to the user
    paraphrases: tuple[str, ...]  # other wordings, used in training and in the class prototype

    @property
    def all_sentences(self) -> tuple[str, ...]:
        return (self.sentence, *self.paraphrases)


@dataclass(frozen=True)
class Panel:
    """A named set of classes the model describes against (e.g. the 8 PBC cell types)."""
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

    def key_for_label(self, label: str | None) -> str | None:
        """The class of this panel a folder or expert label names, as a person writes it:
        'Neutrophils', 'early-pre-B', 'Immature granulocyte' (`class_key_for_label` with the
        display names and plurals); None when it names none, or more than one."""
        names = {c.key: [c.name] for c in self.classes}
        return class_key_for_label(label, self.keys, names, plurals=True)


def normalise_label(label: str) -> str:
    """'  Early Pre-B ' -> 'early_pre_b': lower case, hyphens and runs of spaces as one underscore."""
    return "_".join(label.strip().lower().replace("-", " ").split())


def class_key_for_label(label: str | None, keys: Iterable[str], names: Mapping[str, Iterable[str]] | None = None,
                        plurals: bool = False) -> str | None:
    """The one class key `label` names, or None. The rule every reader of labels shares
    (training and evaluation folders, quiz gallery labels):

    - a label that is a key is that key;
    - else the label, normalised (`normalise_label`), must equal the normalised form of exactly
      one key, or of one of its `names` ({key: [display names]}): a label is never read as a
      class it does not name, and one that could mean two classes means none;
    - with `plurals`, and only when nothing matched as written, the same with a trailing "s"
      dropped ('Neutrophils', 'IGs')."""
    if not label:
        return None
    keys = list(keys)
    if label in keys:
        return label
    forms = {key: {normalise_label(key)} | {normalise_label(n) for n in (names or {}).get(key, ())} for key in keys}
    wanted = normalise_label(label)
    candidates = [wanted, wanted[:-1]] if plurals and wanted.endswith("s") else [wanted]
    for candidate in candidates:  # as written first, so a key ending in "s" is not lost to the plural rule
        matches = [key for key in keys if candidate in forms[key]]
        if matches:
            return matches[0] if len(matches) == 1 else None
    return None


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


def all_class_keys(panels: dict[str, Panel]) -> set[str]:
    """The class keys of every panel: the classes a data folder may be named after."""
    return {key for panel in panels.values() for key in panel.keys}


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


def require_panel(panels: dict[str, Panel], name: str | None) -> None:
    """A ValueError naming the known panels when `name` (a --panel option) is not one of them;
    nothing for None (no panel named: the command infers one)."""
    if name is not None and name not in panels:
        raise ValueError(f"Unknown panel {name!r}; this model knows {sorted(panels)}")
