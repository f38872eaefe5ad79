"""AppTests of the Atlas search and Teaching quiz pages: tiny random model, a gallery of
drawn cells, a temporary SQLite store and gallery cache. Nothing downloads."""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from core.morphology import has_morphology
from core.store import add_feedback, add_prediction, get_or_create_image, make_engine, make_sessionmaker
from core.uploads import store_image_copy
from tests.conftest import cell_png_bytes, write_class_tree

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
ATLAS_PAGE = "pages/3_Atlas_search.py"
QUIZ_PAGE = "pages/4_Teaching_quiz.py"
QUERY = "cell with a bilobed nucleus and orange granules"


def png_bytes(kind: int = 0, seed: int = 0) -> bytes:
    return cell_png_bytes(64, kind=kind, seed=seed)


@pytest.fixture
def env(tiny_model_path, tmp_path, monkeypatch):
    """Tiny model, fresh SQLite store, a gallery of 2 x 3 drawn cells, a gallery cache."""
    db_url = f"sqlite:///{tmp_path / 'feedback.sqlite'}"
    gallery = write_class_tree(tmp_path / "gallery", {"neutrophil": 3, "lymphocyte": 3})
    for name, value in {"MODEL": str(tiny_model_path), "DB_URL": db_url, "UPLOAD_DIR": str(tmp_path / "uploads"),
                        "SAMPLES_DIR": str(tmp_path / "samples"), "GALLERY_DIR": str(gallery),
                        "GALLERY_CACHE_DIR": str(tmp_path / "gallery_cache")}.items():
        monkeypatch.setenv(f"HEMASCRIBE_{name}", value)
    st.cache_resource.clear()
    st.cache_data.clear()
    engine = make_engine(db_url)
    yield SimpleNamespace(gallery=gallery, uploads=tmp_path / "uploads", sessionmaker=make_sessionmaker(engine),
                          cache=tmp_path / "gallery_cache")
    engine.dispose()
    st.cache_resource.clear()


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def captions(at: AppTest) -> list[str]:
    return [c.value for c in at.caption]


def add_reviewed_case(env, verdict: str = "agree", seed: int = 42) -> None:
    """A stored upload (a cell drawn with `seed`) with a prediction 'neutrophil' on the
    blood_cells panel and one expert verdict."""
    data = png_bytes(1, seed)
    sha = hashlib.sha256(data).hexdigest()
    stored = store_image_copy(env.uploads, sha, data, ".png")
    with env.sessionmaker.begin() as s:
        image = get_or_create_image(s, sha256=sha, original_name="case.png", n_bytes=len(data), width=64,
                                    height=64, stored_path=stored)
        prediction = add_prediction(s, image, model_id="tiny", weights_sha256="w", panel="blood_cells",
                                    class_key="neutrophil", sentence="s", confidence=0.7, abstained=False,
                                    abstain_reason=None, scores={"neutrophil": 0.7})
        add_feedback(s, prediction, verdict=verdict, reviewer="Dr T")


def test_atlas_without_gallery_or_reviews_says_what_to_do(env, monkeypatch):
    monkeypatch.delenv("HEMASCRIBE_GALLERY_DIR")
    at = open_page(ATLAS_PAGE)
    assert at.title[0].value == "Atlas search"
    assert any("No gallery yet" in i.value and "`HEMASCRIBE_GALLERY_DIR`" in i.value for i in at.info)
    assert not list(env.cache.glob("*/manifest.json"))  # nothing indexed, no empty cache written


def test_atlas_with_a_cache_folder_it_cannot_write_says_so(env, monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("HEMASCRIBE_GALLERY_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    at = open_page(ATLAS_PAGE)  # the first visit indexes automatically
    assert any("could not be written" in w.value and "GALLERY_CACHE_DIR" in w.value for w in at.warning)


def test_atlas_text_query_and_more_like_this(env):
    add_reviewed_case(env)
    at = open_page(ATLAS_PAGE)  # first visit indexes automatically
    assert any("7 images indexed" in c and "1 with an expert-verified label" in c for c in captions(at))
    at.text_input(key="atlas_query").input(QUERY).run()
    assert not at.exception, at.exception
    results = [c for c in captions(at) if "similarity -" in c]
    assert len(results) == 7
    scores = [float(c.split("**")[1]) for c in results]
    assert scores == sorted(scores, reverse=True)
    assert sum("(folder label)" in c for c in results) == 6
    assert sum("Neutrophil (expert-verified, panel blood\\_cells)" in c for c in results) == 1

    at.button(key="atlas_more_text_0").click().run()
    assert not at.exception, at.exception
    assert at.radio(key="atlas_image_source").value == "gallery"
    assert at.selectbox(key="atlas_pick").value is not None
    assert len([c for c in captions(at) if "similarity -" in c]) == 7 + 6  # the query image is left out


def test_atlas_query_survives_a_visit_to_another_page(env):
    at = open_page(ATLAS_PAGE)
    at.text_input(key="atlas_query").input(QUERY).run()
    at.slider(key="atlas_k").set_value(4).run()
    at.radio(key="atlas_image_source").set_value("gallery").run()
    at.selectbox(key="atlas_pick").select_index(1).run()
    picked = at.selectbox(key="atlas_pick").value
    at.switch_page("pages/2_Model_card.py").run()
    at.switch_page(ATLAS_PAGE).run()
    assert not at.exception, at.exception
    assert at.text_input(key="atlas_query").value == QUERY and at.slider(key="atlas_k").value == 4
    assert at.radio(key="atlas_image_source").value == "gallery" and at.selectbox(key="atlas_pick").value == picked
    assert len([c for c in captions(at) if "similarity -" in c]) == 4 + 4  # both result sets are back, k each


def test_atlas_does_not_search_with_a_picture_that_is_no_stained_cell(env):
    import io

    from PIL import Image, ImageDraw

    document = Image.new("RGB", (160, 160), "white")
    ImageDraw.Draw(document).text((10, 60), "Patient report: CBC normal", fill="black")
    buffer = io.BytesIO()
    document.save(buffer, "PNG")
    at = open_page(ATLAS_PAGE)
    at.file_uploader(key="atlas_upload").set_value(("report.png", buffer.getvalue(), "image/png")).run()
    assert not at.exception, at.exception
    assert any(w.value.startswith("Not searched. No stained cell is visible") for w in at.warning)
    assert not [c for c in captions(at) if "similarity -" in c]


def test_atlas_upload_and_reindex(env):
    at = open_page(ATLAS_PAGE)
    exact = (env.gallery / "lymphocyte" / "lymphocyte_1.png").read_bytes()
    at.file_uploader(key="atlas_upload").set_value(("query.png", exact, "image/png")).run()
    assert not at.exception, at.exception
    # the gallery holds these very bytes: named, and left out of its own results (it topped them at 1.000)
    assert any("is in the gallery as lymphocyte/lymphocyte_1.png;" in c.replace("\\", "") for c in captions(at))
    results = [c for c in captions(at) if "similarity -" in c]
    names = [c.replace("\\", "") for c in captions(at) if c.endswith(".png") and "/" in c.replace("\\", "")]
    assert len(results) == 5 and "lymphocyte/lymphocyte_1.png" not in names
    at.file_uploader(key="atlas_upload").set_value(("query.png", png_bytes(1, 99), "image/png")).run()
    assert len([c for c in captions(at) if "similarity -" in c]) == 6  # a new image: every gallery image
    assert not any("is in the gallery as" in c for c in captions(at))

    (env.gallery / "lymphocyte" / "extra.png").write_bytes(png_bytes(1, 7))
    (env.gallery / "lymphocyte" / "broken.png").write_bytes(b"not an image")
    at.button(key="atlas_reindex").click().run()
    assert not at.exception, at.exception
    status = [c for c in captions(at) if "images indexed" in c]
    assert "7 images indexed" in status[0] and "a strip Describe would not describe): 1." in status[0]


def test_atlas_picks_up_a_few_new_files_without_reindex_and_asks_for_many(env, monkeypatch):
    at = open_page(ATLAS_PAGE)
    assert any("6 images indexed" in c for c in captions(at))
    (env.gallery / "neutrophil" / "new.png").write_bytes(png_bytes(0, 9))
    (env.gallery / "neutrophil" / "broken.png").write_bytes(b"not an image")
    at.run()  # a rerun (or a browser refresh): the two files are seen, the readable one embedded
    assert not at.exception, at.exception
    assert any("7 images indexed" in c and "a strip Describe would not describe): 1." in c for c in captions(at))
    at.run()  # the unreadable file is not retried on every rerun
    assert not any("added or changed" in i.value for i in at.info)
    monkeypatch.setattr("ui.atlas.AUTO_REINDEX_MAX", 1)
    for i in range(2):
        (env.gallery / "lymphocyte" / f"more_{i}.png").write_bytes(png_bytes(1, 20 + i))
    at.run()
    assert any("2 gallery images were added or changed" in i.value for i in at.info)
    assert any("7 images indexed" in c for c in captions(at))


def test_atlas_applies_every_new_label_at_once_even_when_too_many_files_wait(env, monkeypatch):
    """An index written before labels were kept per panel (format 1: one plain label per reviewed
    case) shows each panel's expert label after the automatic update, whatever the number of
    relabelled cases; only embedding is capped."""
    from tests.conftest import write_format1_index

    for seed in (42, 43):
        add_reviewed_case(env, seed=seed)
    at = open_page(ATLAS_PAGE)
    assert any("8 images indexed" in c for c in captions(at))
    write_format1_index(next(env.cache.iterdir()))
    monkeypatch.setattr("ui.atlas.AUTO_REINDEX_MAX", 1)  # 2 relabelled cases and 2 new files: more than 1
    for i in range(2):
        (env.gallery / "lymphocyte" / f"more_{i}.png").write_bytes(png_bytes(1, 20 + i))
    at.text_input(key="atlas_query").input(QUERY).run()
    assert not at.exception, at.exception
    results = [c for c in captions(at) if "similarity -" in c]
    reviewed = [c for c in results if "expert" in c]
    assert len(reviewed) == 2 and all("Neutrophil (expert-verified, panel blood\\_cells)" in c for c in reviewed)
    assert not any("no expert label" in c for c in captions(at))
    assert any("2 gallery images were added or changed" in i.value for i in at.info)  # not embedded yet
    assert any("8 images indexed" in c and "2 reviewed cases (2 with an expert-verified label)" in c
               for c in captions(at))


def strip_png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 150)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_atlas_lists_a_strip_describe_would_not_describe_as_skipped_with_the_reason(env):
    """A 16 x 1024 reviewed strip was ranked 11th of 12 for a text query (browser test); the
    atlas holds what Describe describes, and says why it left the rest out."""
    (env.gallery / "neutrophil" / "strip.png").write_bytes(strip_png(16, 1024))
    at = open_page(ATLAS_PAGE)
    assert any("6 images indexed" in c and "a strip Describe would not describe): 1" in c for c in captions(at))
    assert any("strip.png: The image is 64.0 times longer than wide" in t.value for t in at.text)
    at.text_input(key="atlas_query").input(QUERY).run()
    assert not at.exception, at.exception
    results = [c for c in captions(at) if "similarity -" in c]
    assert len(results) == 6 and not any("strip.png" in c for c in captions(at))


def test_thumbnail_is_square_for_what_describe_accepts_and_a_reason_otherwise(tmp_path):
    from PIL import Image

    from core.imageio import ImageRejected, load_image_path
    from ui.atlas import thumbnail

    (tmp_path / "strip.png").write_bytes(strip_png(16, 1024))
    (tmp_path / "longer.png").write_bytes(strip_png(17, 1089))
    tile = thumbnail(str(tmp_path / "strip.png"), "a")
    assert isinstance(tile, Image.Image) and tile.size == (224, 224)  # padded: the grid keeps its rows
    with pytest.raises(ImageRejected) as refused:
        load_image_path(tmp_path / "longer.png")
    assert thumbnail(str(tmp_path / "longer.png"), "b") == str(refused.value)  # Describe's own sentence


def test_quiz_choose_then_write(env):
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["quiz_seed"] = 1234
    at.switch_page(QUIZ_PAGE).run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Teaching quiz"
    assert len(at.get("image")) == 1  # the cell is shown
    assert at.metric[0].value == "0 / 0"
    shown = at.session_state["quiz_cell"].source.path
    at.run()  # a rerun keeps the same cell
    assert at.session_state["quiz_cell"].source.path == shown

    at.selectbox(key="quiz_choice_blood_cells_0").select("neutrophil").run()
    at.button(key="quiz_check").click().run()
    assert not at.exception, at.exception
    assert at.metric[0].value in ("0 / 1", "1 / 1")
    assert any("Expert label:" in m.value and "gallery folder label" in m.value for m in at.markdown)
    assert any(m.value.startswith("**Model") for m in at.markdown) or at.warning
    answered = at.session_state["quiz_reveal"]["description"].class_key
    # morphology only for a white cell the model answered for (WBCAtt's five types)
    assert any("Morphology (model):" in m.value for m in at.markdown) == has_morphology(answered)
    assert not [b for b in at.button if b.key == "quiz_check"]  # the reveal replaced the form: no second score

    at.button(key="quiz_next").click().run()
    at.radio(key="quiz_mode").set_value("write").run()
    at.text_area(key="quiz_text_1").input("round cell with a large dense nucleus").run()
    at.button(key="quiz_check").click().run()
    assert not at.exception, at.exception
    assert at.metric[0].value.endswith("/ 2")
    assert any("Nearest panel sentence:" in m.value for m in at.markdown)


def test_quiz_without_gallery(env, monkeypatch):
    monkeypatch.delenv("HEMASCRIBE_GALLERY_DIR")
    at = open_page(QUIZ_PAGE)
    assert any("No gallery images to quiz on" in i.value for i in at.info)


def test_quiz_answered_cell_is_not_scored_again_after_a_panel_round_trip(env):
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["quiz_seed"] = 1234
    at.switch_page(QUIZ_PAGE).run()
    at.selectbox(key="quiz_choice_blood_cells_0").select("neutrophil").run()
    at.button(key="quiz_check").click().run()
    assert at.metric[0].value.endswith("/ 1")
    at.selectbox(key="quiz_panel").select("b_all").run()
    at.selectbox(key="quiz_panel").select("blood_cells").run()
    assert not at.exception, at.exception
    # a new round: the answered round-0 cell cannot come back unlocked and be scored twice
    assert at.session_state["quiz_round"] >= 1 and at.session_state["quiz_reveal"] is None
    assert not [s for s in at.selectbox if s.key == "quiz_choice_blood_cells_0"]
    assert at.metric[0].value.endswith("/ 1")


def test_quiz_offers_only_validated_panels(env):
    """The leukaemia panel has no labelled cell to score and no image to validate it: no quiz."""
    at = open_page(QUIZ_PAGE)
    options = at.selectbox(key="quiz_panel").options
    assert len(options) == 2 and not any("originating study" in o for o in options)


def write_first_answer(text: str) -> AppTest:
    """The quiz with a seeded session, `text` written as the first round's answer and checked."""
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["quiz_seed"] = 1234
    at.switch_page(QUIZ_PAGE).run()
    at.radio(key="quiz_mode").set_value("write").run()
    at.text_area(key="quiz_text_0").input(text).run()
    at.button(key="quiz_check").click().run()
    assert not at.exception, at.exception
    return at


def test_quiz_refuses_a_written_answer_without_morphology_words_then_scores_a_real_one(env):
    """"no idea" lands on some class at a similarity as high as a real description's, so it is
    refused by vocabulary: not scored, round not used up, the form left open to rewrite."""
    at = write_first_answer("no idea")
    assert any("uses no morphology word the model knows" in w.value and "nucleus" in w.value for w in at.warning)
    assert at.metric[0].value == "0 / 0"
    assert at.session_state["quiz_answer"] is None and at.session_state["quiz_round"] == 0
    assert not any("Nearest panel sentence:" in m.value for m in at.markdown)  # no reveal
    assert not at.text_area(key="quiz_text_0").disabled and not at.button(key="quiz_check").disabled

    at.text_area(key="quiz_text_0").input("large cell with bilobed nucleus").run()
    at.button(key="quiz_check").click().run()
    assert not at.exception, at.exception
    assert at.metric[0].value in ("0 / 1", "1 / 1")
    assert not any("uses no morphology word" in w.value for w in at.warning)
    assert any("Nearest panel sentence:" in m.value for m in at.markdown)
    assert at.session_state["quiz_answer"]["text"] == "large cell with bilobed nucleus"
    # the reveal replaces the form at once: no box left to edit (its text would be ignored) and the
    # answer shown is the one scored
    assert not [t for t in at.text_area if t.key == "quiz_text_0"]
    assert not [b for b in at.button if b.key == "quiz_check"]
    assert any("**You wrote:** large cell with bilobed nucleus" in m.value for m in at.markdown)
    at.button(key="quiz_next").click().run()
    assert at.radio(key="quiz_mode").value == "write"  # a learner who writes keeps writing


def test_quiz_refuses_an_answer_that_says_what_the_cell_is_not(env):
    """"not a neutrophil" lands on the neutrophil sentence, so it was scored correct on a neutrophil."""
    at = write_first_answer("not a neutrophil")
    assert any("says what the cell is not (neutrophil)" in w.value for w in at.warning)
    assert at.metric[0].value == "0 / 0" and at.session_state["quiz_answer"] is None
    assert not at.text_area(key="quiz_text_0").disabled


def test_quiz_says_it_cannot_grade_terms_the_model_was_not_trained_on(env):
    """"myeloblast" landed on the neutrophil sentence and was scored correct on a neutrophil."""
    at = write_first_answer("myeloblast")
    assert any("was not trained on the word(s) myeloblast" in w.value for w in at.warning)
    assert at.metric[0].value == "0 / 0" and at.session_state["quiz_answer"] is None
    at.text_area(key="quiz_text_0").input("myeloblast with a large round nucleus").run()  # known words beside it
    at.button(key="quiz_check").click().run()
    assert any("was not trained on the word(s) myeloblast" in w.value for w in at.warning)
    assert at.metric[0].value == "0 / 0" and at.session_state["quiz_answer"] is None


def test_atlas_does_not_search_with_a_strip_describe_would_not_describe(env):
    """A 16 x 1024 query ranked immature granulocytes at 0.94 with no warning (browser test)."""
    at = open_page(ATLAS_PAGE)
    at.file_uploader(key="atlas_upload").set_value(("strip.png", strip_png(16, 1024), "image/png")).run()
    assert not at.exception, at.exception
    assert any("Not searched. The image is 64.0 times longer than wide" in w.value for w in at.warning)
    assert not [c for c in captions(at) if "similarity -" in c]  # no neighbours listed


def test_the_quiz_never_draws_a_strip_describe_would_not_describe(tmp_path):
    import random

    from core.gallery_sources import scan_folder
    from core.panels import load_panels
    from ui.quiz import pick_cell

    (tmp_path / "neutrophil").mkdir()
    (tmp_path / "neutrophil" / "strip.png").write_bytes(strip_png(16, 1024))
    sources = scan_folder(tmp_path)
    assert len(sources) == 1 and pick_cell(load_panels()["blood_cells"], sources, random.Random(0), 0) is None


@pytest.mark.parametrize("threshold, flagged", [(-1e9, True), (1e9, False)])
def test_quiz_reveal_says_when_the_models_answer_is_atypical(env, tmp_path, monkeypatch, threshold, flagged):
    from tests.conftest import save_calibrated_tiny

    model = save_calibrated_tiny(tmp_path / "typical.safetensors", band_threshold=threshold)
    monkeypatch.setenv("HEMASCRIBE_MODEL", str(model))
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["quiz_seed"] = 1234
    at.switch_page(QUIZ_PAGE).run()
    at.selectbox(key="quiz_choice_blood_cells_0").select("neutrophil").run()
    at.button(key="quiz_check").click().run()
    assert not at.exception, at.exception
    assert any(m.value.startswith("**Model:**") for m in at.markdown)  # answered: min_confidence 0
    notes = [c for c in captions(at) if c.startswith("**Atypical image.** ")]
    assert len(notes) == int(flagged)
    assert not flagged or "(90 of 96), against 98% for the more typical ones" in notes[0]
