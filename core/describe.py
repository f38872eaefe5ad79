"""Describe a cell image: the sentence, calibrated confidence, every sentence's score and an
honest abstention. The one call everything else uses.

    python -m core.describe IMAGE... [--panel NAME] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image

from core.checkpoint import ModelBundle
from core.cli_guard import debugging, run_main
from core.imageio import prepare_image
from core.model import encode_views
from core.neighbours import NeighbourVote
from core.preprocess import to_model_input
from core.reliability import (abstention_decision, content_problems, framing_problem, is_calibrated,
                              panel_neighbour_votes, panel_out_of_scope_score, panel_probabilities)
from core.typicality import is_atypical, typicality_band


@dataclass(frozen=True)
class Description:
    """What the model says about one image under one panel: sentence or abstention, scores, timings."""
    panel: str  # panel the image was described against
    class_key: str | None  # the described class; None when the model abstained
    sentence: str | None  # canonical sentence of class_key; None when abstained
    confidence: float  # calibrated probability of the top class of the panel
    abstained: bool  # True: "I don't know", see abstain_reason
    abstain_reason: str | None  # why the model abstained, in words
    abstain_kind: str | None  # which check refused (core.reliability.ABSTAIN_KINDS); None when answered
    best_class: str  # top class of the panel even when abstaining (for the chart)
    scores: dict[str, float]  # calibrated probability of every class of the panel
    similarities: dict[str, float]  # cosine similarity to every class prototype
    out_of_scope_score: float  # higher = further from every cell type seen in training
    panel_validated: bool  # False: no images of this panel's classes were ever available
    model_id: str  # model identity from the sidecar
    weights_sha256: str  # sha256 of the weights that produced this
    atypical: bool | None = None  # an answer in the atypical band (core.typicality); None: abstained or no band
    # which temperature and thresholds decided (ModelBundle.calibration_id); None: an uncalibrated panel
    calibration_id: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage
    # {"k": K, "counts": {class: n}}: the classes of the K training cells nearest the image
    # (core.neighbours); None for a model that stores no reference cells of the panel
    neighbours: dict | None = None
    notes: tuple[str, ...] = ()  # what was done to the image first (rotated, alpha over white ...)

    def to_dict(self) -> dict:
        return asdict(self)


def default_panel(bundle: ModelBundle) -> str:
    """The first validated panel of the model (``blood_cells`` for the default model)."""
    for name, panel in bundle.panels.items():
        if panel.validated:
            return name
    return next(iter(bundle.panels))


@torch.no_grad()
def embed_images(bundle: ModelBundle, images: list[Image.Image]) -> tuple[torch.Tensor, float]:
    """Unit-norm embeddings (B, D) and the preprocessing time in ms. Images go through
    `core.imageio.prepare_image` first (raises ImageRejected for one it cannot describe)."""
    embeddings, prep_ms, _ = _embed_with_inputs(bundle, [prepare_image(image)[0] for image in images])
    return embeddings, prep_ms


def embed_checked(bundle: ModelBundle, images: list[Image.Image]) -> tuple[torch.Tensor, list[str | None]]:
    """`embed_images`'s embeddings and, from the same model inputs, Describe's content check of
    each image (`core.reliability.content_problems`: blank, noise, no stain colour) or None."""
    embeddings, _, inputs = _embed_with_inputs(bundle, [prepare_image(image)[0] for image in images])
    return embeddings, content_problems(inputs)


@torch.no_grad()
def _embed_with_inputs(bundle: ModelBundle, images: list[Image.Image]) -> tuple[torch.Tensor, float, torch.Tensor]:
    started = time.perf_counter()
    batch = to_model_input(images, bundle.model.config.image_size)
    prep_ms = (time.perf_counter() - started) * 1000
    with bundle.lock:
        return encode_views(bundle.model, batch, bundle.views), prep_ms, batch


def describe_batch(bundle: ModelBundle, images: list[Image.Image], panel: str | None = None) -> list[Description]:
    """Describe several PIL images against one panel (one forward pass).

    Any PIL image is accepted: each is first made what the file loader makes of an upload
    (`core.imageio.prepare_image`: size checks, EXIF orientation, alpha over white, 16-bit grey
    stretched, downscaled), so an image opened with Pillow is described as its file would be.
    Raises ImageRejected (a readable sentence) for an image that cannot be described, e.g. one
    under 16 px a side; to describe a batch file by file, load each with `load_image_bytes`."""
    panel = panel or default_panel(bundle)
    if panel not in bundle.panels:
        raise ValueError(f"Unknown panel {panel!r}; this model knows {sorted(bundle.panels)}")
    if not images:
        return []
    started = time.perf_counter()
    prepared = [prepare_image(image) for image in images]
    checks_ms = (time.perf_counter() - started) * 1000
    embeddings, prep_ms, inputs = _embed_with_inputs(bundle, [rgb for rgb, _ in prepared])
    embed_ms = (time.perf_counter() - started) * 1000 - checks_ms - prep_ms
    prep_ms += checks_ms
    results = []
    framing = [framing_problem(rgb.size) for rgb, _ in prepared]
    calibration_id = bundle.calibration_id if is_calibrated(bundle, panel) else None  # a hash: once a batch
    votes = panel_neighbour_votes(bundle, embeddings, panel)  # one look-up for the batch
    for embedding, content, strip, (_, notes), vote in zip(embeddings, content_problems(inputs), framing, prepared,
                                                           votes):
        problem = content or strip
        t0 = time.perf_counter()
        results.append(_describe_embedding(bundle, embedding, panel, calibration_id, vote, problem, tuple(notes)))
        score_ms = (time.perf_counter() - t0) * 1000
        results[-1].timings_ms.update(preprocess=prep_ms / len(images), embed=embed_ms / len(images), score=score_ms)
    return results


def describe(bundle: ModelBundle, image: Image.Image, panel: str | None = None) -> Description:
    """Describe one PIL image against `panel` (default: the model's first validated panel)."""
    return describe_batch(bundle, [image], panel)[0]


def _describe_embedding(bundle: ModelBundle, embedding: torch.Tensor, panel: str, calibration_id: str | None,
                        vote: NeighbourVote | None, content_problem: str | None = None,
                        notes: tuple[str, ...] = ()) -> Description:
    spec = bundle.panels[panel]
    similarities = (bundle.prototypes[panel] @ embedding).tolist()
    score = panel_out_of_scope_score(bundle, embedding, panel)  # the temperature and the abstention both read it
    probabilities = panel_probabilities(bundle, embedding, panel, score)
    best = int(torch.tensor(probabilities).argmax())
    decision = abstention_decision(bundle, embedding, panel, probabilities, content_problem, score, vote)
    chosen = None if decision.abstained else spec.classes[best]
    return Description(
        panel=panel, class_key=chosen.key if chosen else None, sentence=chosen.sentence if chosen else None,
        confidence=float(probabilities[best]), abstained=decision.abstained, abstain_reason=decision.reason,
        abstain_kind=decision.kind,
        best_class=spec.classes[best].key, scores=dict(zip(spec.keys, map(float, probabilities))),
        similarities=dict(zip(spec.keys, map(float, similarities))), out_of_scope_score=decision.out_of_scope_score,
        panel_validated=spec.validated, model_id=bundle.model_id, weights_sha256=bundle.weights_sha256,
        atypical=is_atypical(decision.out_of_scope_score, decision.abstained, typicality_band(bundle.sidecar, panel)),
        calibration_id=calibration_id,
        timings_ms={}, notes=notes, neighbours={"k": vote.k, "counts": vote.counts} if vote else None)


def _describe_file(bundle: ModelBundle, path: str, panel: str | None) -> dict:
    from core.imageio import ImageRejected, load_image_path

    try:
        loaded = load_image_path(path)
    except ImageRejected as error:
        return {"file": path, "ok": False, "error": str(error)}
    result = describe(bundle, loaded.image, panel)
    band = typicality_band(bundle.sidecar, result.panel)
    return {"file": path, "ok": True, "panel": result.panel, "class": result.class_key, "atypical": result.atypical,
            "atypical_accuracy": band["accuracy_above"] if result.atypical else None,
            "sentence": result.sentence, "confidence": round(result.confidence, 4),
            "abstained": result.abstained, "abstain_reason": result.abstain_reason, "abstain_kind": result.abstain_kind,
            "best_class": result.best_class, "calibrated": is_calibrated(bundle, result.panel),
            "model_id": result.model_id, "calibration_id": result.calibration_id,
            "notes": list(loaded.notes), "neighbours": result.neighbours,
            "scores": {k: round(v, 4) for k, v in result.scores.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Describe blood-cell images in sentences.",
                                     epilog="Exit status: 0 every file described (an abstention counts as "
                                            "described), 1 some file refused, 2 bad model or panel.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--panel", default=None, help="panel name (default: the model's first validated panel)")
    parser.add_argument("--model", default=None, help="weights file (default: the HEMASCRIBE_MODEL setting)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line (default: readable text)")
    args = parser.parse_args(argv)
    from core.checkpoint import ModelLoadError, load_bundle
    from core.settings import SettingsError, load_settings

    try:
        settings = load_settings()
        bundle = load_bundle(args.model or settings.model_path, settings.text_model)
    except (ModelLoadError, SettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.panel is not None and args.panel not in bundle.panels:  # "" too: not silently the default
        print(f"error: unknown panel {args.panel!r}; choose from {sorted(bundle.panels)}", file=sys.stderr)
        return 2
    failures, kinds = 0, {}  # by path: a file named twice counts once in the batch check
    for path in args.images:
        try:
            record = _describe_file(bundle, path, args.panel)
        except Exception as error:  # noqa: BLE001 - one file's failure must not cost the rest of the batch
            if debugging():
                raise
            record = {"file": path, "ok": False, "error": f"could not be described ({type(error).__name__}: {error})"}
        # A file name that is not valid UTF-8 reaches Python as lone surrogates, which strict
        # JSON readers reject: show the undecodable bytes as U+FFFD instead.
        record["file"] = path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        failures += not record["ok"]
        if record["ok"]:
            kinds[path] = record["abstain_kind"]
        print(json.dumps(record) if args.json else _readable(record), flush=True)
    _note_another_lab(bundle, args.panel or default_panel(bundle), list(kinds.values()))
    return 1 if failures else 0


def _note_another_lab(bundle: ModelBundle, panel: str, abstain_kinds: list) -> None:
    """On stderr (stdout keeps one record per file): the batch-level lab check, `core.site_shift`."""
    from core.site_shift import batch_shift, home_out_of_scope_rate, shift_message

    notice = batch_shift(abstain_kinds, home_out_of_scope_rate(bundle.sidecar, panel))
    if notice is not None:
        print("note: " + shift_message(notice, bundle.sidecar, panel), file=sys.stderr)


def _readable(record: dict) -> str:
    if not record["ok"]:
        return f"{record['file']}: REFUSED - {record['error']}"
    if record["abstained"]:
        return f"{record['file']}: UNCERTAIN - {record['abstain_reason']}"
    if not record["calibrated"]:
        return (f"{record['file']}: {record['sentence']} (confidence {record['confidence']:.2f}, NOT calibrated: "
                f"no abstention thresholds; run python -m training.calibrate)")
    text = f"{record['file']}: {record['sentence']} (confidence {record['confidence']:.2f}"
    vote = record["neighbours"]
    if vote and vote["k"]:  # core.neighbours
        text += f"; {vote['counts'].get(record['class'], 0)} of the {vote['k']} most similar training cells agree"
    text += ")"
    if record["atypical"]:  # core.typicality
        text += (f" - ATYPICAL image: answers like it were right {record['atypical_accuracy']:.0%} of the time on "
                 "the training lab's held-out cells; on other labs' images it can be far lower")
    return text


if __name__ == "__main__":
    sys.exit(run_main(main))
