"""Expert labels of reviewed cases in the gallery: one per panel, the latest verdict of each
panel wins, and a verdict on one panel never relabels the image on another."""
from __future__ import annotations

import hashlib
import random

import pytest

from core.gallery import load_index, pending_work, update_index
from core.gallery_sources import reviewed_sources
from core.panels import load_panels
from core.store import add_feedback, add_prediction, get_or_create_image, make_engine, make_sessionmaker
from tests.conftest import draw_cell


@pytest.fixture
def case(tmp_path):
    """(sessionmaker, upload folder, give) for one stored image; give(panel, model class,
    verdict, corrected class) records a prediction and a verdict on it, later than the last."""
    engine = make_engine(f"sqlite:///{tmp_path / 'fb.sqlite'}")
    make_session = make_sessionmaker(engine)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    draw_cell(64).save(uploads / "x.png")
    sha = hashlib.sha256((uploads / "x.png").read_bytes()).hexdigest()

    def give(panel: str, model_class: str | None, verdict: str, corrected: str | None = None) -> None:
        with make_session.begin() as s:
            image = get_or_create_image(s, sha256=sha, original_name="x.png", n_bytes=1, width=64, height=64,
                                        stored_path="x.png")
            prediction = add_prediction(s, image, model_id="m", weights_sha256=str(random.random()), panel=panel,
                                        class_key=model_class, sentence="s", confidence=0.9,
                                        abstained=model_class is None, abstain_reason=None, scores={})
            add_feedback(s, prediction, verdict=verdict, reviewer="Dr T", corrected_class=corrected)

    yield make_session, uploads, give
    engine.dispose()


def only_source(make_session, uploads):
    with make_session() as s:
        sources = reviewed_sources(s, uploads)
    assert len(sources) == 1
    return sources[0]


def test_a_verdict_on_another_panel_does_not_relabel_the_image(case):
    make_session, uploads, give = case
    give("blood_cells", "lymphocyte", "agree")
    give("b_all", "pre_b", "disagree", "benign")  # later, on another question about the same cell
    source = only_source(make_session, uploads)
    assert source.expert_labels == (("b_all", "benign"), ("blood_cells", "lymphocyte"))
    assert source.label_for("blood_cells") == "lymphocyte" and source.label_for("b_all") == "benign"
    assert source.label_for("leukemia") is None and source.label is None and source.verified


def test_the_latest_verdict_of_a_panel_wins_whichever_model_it_answered(case):
    make_session, uploads, give = case
    give("blood_cells", "neutrophil", "agree")
    give("blood_cells", "neutrophil", "disagree", "monocyte")  # a second opinion overrides the first
    assert only_source(make_session, uploads).label_for("blood_cells") == "monocyte"
    give("blood_cells", "lymphocyte", "disagree")  # "not a lymphocyte": no contradiction of monocyte
    give("blood_cells", None, "disagree")  # a verdict on an abstention names no class
    give("blood_cells", "monocyte", "unsure")
    assert only_source(make_session, uploads).label_for("blood_cells") == "monocyte"
    give("blood_cells", "monocyte", "disagree")  # "not a monocyte": the label held is rejected
    source = only_source(make_session, uploads)
    assert source.expert_labels == () and not source.verified
    give("blood_cells", None, "disagree", "basophil")  # a correction of an abstention names one
    assert only_source(make_session, uploads).expert_labels == (("blood_cells", "basophil"),)


def test_per_panel_labels_reach_the_index_quiz_and_atlas(case, tiny_bundle, tmp_path):
    from ui.atlas import label_text
    from ui.quiz import pick_cell

    make_session, uploads, give = case
    give("blood_cells", "lymphocyte", "agree")
    give("b_all", "benign", "agree")
    source = only_source(make_session, uploads)
    index = update_index(tiny_bundle, tmp_path / "cache", [source])
    reloaded = load_index(tmp_path / "cache", tiny_bundle.weights_sha256)
    assert reloaded.items == index.items  # JSON gives the pairs back
    assert sum(pending_work(reloaded, [source])) == 0
    assert label_text(reloaded.items[0], load_panels()) == (
        "Benign \\(hematogones\\) (expert-verified, panel b\\_all); Lymphocyte (expert-verified, panel blood\\_cells)")
    panels = load_panels()
    assert pick_cell(panels["blood_cells"], [source], random.Random(0), 0).expert_class == "lymphocyte"
    assert pick_cell(panels["b_all"], [source], random.Random(0), 0).expert_class == "benign"
    assert pick_cell(panels["leukemia"], [source], random.Random(0), 0).expert_class is None  # not scored


def test_a_verdict_on_an_abstention_does_not_clear_the_expert_label(case):
    make_session, uploads, give = case
    give("blood_cells", "monocyte", "agree")
    give("leukemia", None, "disagree")  # later, on an abstention, and names no class
    source = only_source(make_session, uploads)
    assert (source.expert_labels, source.verified) == ((("blood_cells", "monocyte"),), True)
