"""Feedback review page: a re-opened case's verification line is the one the Describe page
shows for that description, i.e. of the same image, panel and model weights."""
from __future__ import annotations

import hashlib

from core.store import add_feedback, add_prediction, get_or_create_image
from core.uploads import store_image_copy
from tests.test_app import REVIEW_PAGE, picker, png_bytes, run_app

OLD, NEW = "a" * 64, "b" * 64  # weights sha256 of two models


def seed_two_models(env) -> None:
    """One image on one panel: the old model's 'neutrophil' agreed by Dr Old, then the new
    model's 'monocyte' answered 'unsure' by Dr New (no decided verdict on the new model)."""
    data = png_bytes(0, 3)
    sha = hashlib.sha256(data).hexdigest()
    stored = store_image_copy(env.uploads, sha, data, ".png")
    with env.sessionmaker.begin() as s:
        image = get_or_create_image(s, sha256=sha, original_name="case.png", n_bytes=len(data), width=96,
                                    height=96, stored_path=stored)
        for model, weights, cls, verdict, who in (("old", OLD, "neutrophil", "agree", "Dr Old"),
                                                  ("new", NEW, "monocyte", "unsure", "Dr New")):
            prediction = add_prediction(s, image, model_id=model, weights_sha256=weights, panel="blood_cells",
                                        class_key=cls, sentence=f"A {cls}.", confidence=0.8, abstained=False,
                                        abstain_reason=None, scores={cls: 0.8})
            add_feedback(s, prediction, verdict=verdict, reviewer=who)


def reopen(at, reviewer: str):
    opener = picker(at, "Re-open a case")
    opener.select_index(next(i for i, o in enumerate(opener.options) if f" by {reviewer} " in o)).run()
    assert not at.exception, at.exception
    return [m.value for m in [*at.success, *at.warning] if "Verified by" in m.value]


def test_reopened_case_shows_the_verification_of_its_own_model(app_env):
    seed_two_models(app_env)
    at = run_app()
    at.switch_page(REVIEW_PAGE).run()
    assert not at.exception, at.exception
    # the new model's description was never agreed with: Dr Old's verdict was on another answer
    assert reopen(at, "Dr New") == []
    assert any(c.value == "Not verified by an expert yet." for c in at.caption)
    verified = reopen(at, "Dr Old")  # the old model's own description keeps its verification
    assert len(verified) == 1 and "Verified by Dr Old" in verified[0] and "agrees" in verified[0]


def test_reopened_cases_are_named_by_the_loaded_models_panels(tiny_bundle):
    """The loaded model's sidecar names its classes (a custom model may name them otherwise
    than the shipped panels); panels it lacks, and everything without a model, come from
    the shipped file."""
    from dataclasses import replace

    from core.panels import load_panels
    from ui.review import naming_panels

    shipped = load_panels()
    blood = shipped["blood_cells"]
    renamed = replace(blood, classes=tuple(replace(c, name="Segmented neutrophil") if c.key == "neutrophil" else c
                                           for c in blood.classes))
    custom = {"blood_cells": renamed, "extra": replace(blood, name="extra", title="Extra")}
    bundle = replace(tiny_bundle, panels=custom)
    panels = naming_panels(bundle)
    assert panels["blood_cells"].cell_class("neutrophil").name == "Segmented neutrophil"
    assert panels["extra"] is custom["extra"] and panels["b_all"] == shipped["b_all"]
    assert naming_panels(None)["blood_cells"].cell_class("neutrophil").name == blood.cell_class("neutrophil").name
