"""Describe page's case cache (ui/cases.py): what a failure leaves behind."""
import io
import time

import pytest
from PIL import Image

from core.store import make_engine, make_sessionmaker
from tests.conftest import make_tiny_bundle
from ui import cases
from ui.resources import Store


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (seed * 40 % 256, 90, 160)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'f.sqlite'}")
    yield Store(engine, make_sessionmaker(engine), None, time.monotonic())
    engine.dispose()


def test_a_describing_failure_leaves_nothing_cached_and_the_next_run_describes(store, tmp_path, monkeypatch):
    bundle, cache = make_tiny_bundle(), {}
    inputs = [cases.Input("a.png", _png(1)), cases.Input("broken.png", b"not an image")]
    real = cases.describe_batch
    monkeypatch.setattr(cases, "describe_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        cases.describe_inputs(bundle, inputs, "blood_cells", store, tmp_path / "up", cache)
    assert [key[0] for key in cache] == [inputs[1].sha256]  # only the refused file, with its message
    monkeypatch.setattr(cases, "describe_batch", real)
    shown = cases.describe_inputs(bundle, inputs, "blood_cells", store, tmp_path / "up", cache)
    assert shown[0].description is not None and shown[0].prediction_id is not None
    assert shown[1].error and shown[1].description is None


def test_a_value_the_store_refuses_is_a_message_not_a_crash(store, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("confidence must be a finite number")

    monkeypatch.setattr(cases, "record_prediction", refuse)
    [case] = cases.describe_inputs(make_tiny_bundle(), [cases.Input("a.png", _png(2))], "blood_cells", store,
                                   tmp_path / "up", {})
    assert case.description is not None and case.prediction_id is None
    assert "could not be recorded (confidence must be a finite number)" in case.store_error


def test_a_confidence_is_never_shown_as_certainty():
    from ui.widgets import percent

    assert [percent(p) for p in (1.0, 0.997, 0.994, 0.5, 0.004, 0.0)] == [">99%", ">99%", "99%", "50%", "<1%", "0%"]


def test_the_score_chart_and_batch_table_never_read_as_certainty():
    import dataclasses

    from core.describe import describe
    from tests.conftest import draw_cell
    from ui.case_view import _answer_confidence
    from ui.widgets import score_chart

    bundle = make_tiny_bundle()
    panel = bundle.panels["blood_cells"]
    shown = describe(bundle, draw_cell(), "blood_cells")
    scores = {key: 0.0 for key in panel.keys} | {panel.keys[0]: 0.9996, panel.keys[1]: 0.0004}
    certain = dataclasses.replace(shown, scores=scores, confidence=0.9996, abstained=False, class_key=panel.keys[0])
    labels = dict(zip(score_chart(certain, panel).data[0].y, score_chart(certain, panel).data[0].text))
    assert labels[panel.classes[0].name] == ">99%" and labels[panel.classes[1].name] == "<1%"
    assert _answer_confidence(certain) == 0.999  # the table's bar: "0.999", not "1.000"
