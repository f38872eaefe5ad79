"""Recording a described case in the feedback store (no streamlit here, so the latency
benchmark in ``training/bench_app.py`` times exactly what the app does)."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from core.describe import Description
from core.imageio import LoadedImage
from core.store import add_prediction, get_or_create_image
from core.uploads import store_image_copy


def uncertain_text(result: Description) -> str:
    """What the store keeps as the 'sentence' of an abstention: the Uncertain state shown."""
    return f"Uncertain: {result.abstain_reason or 'no reason given'}"


def record_prediction(make_session: sessionmaker[Session], upload_dir: Path, data: bytes,
                      loaded: LoadedImage, result: Description) -> tuple[int, int]:
    """Store the image copy (named by content hash) and the image + prediction rows in one
    transaction; returns (image_id, prediction_id). Raises SQLAlchemyError / OSError."""
    stored = store_image_copy(upload_dir, loaded.sha256, data, Path(loaded.file_name).suffix)
    with make_session.begin() as s:
        width, height = loaded.original_size
        image = get_or_create_image(s, sha256=loaded.sha256, original_name=loaded.file_name,
                                    n_bytes=loaded.n_bytes, width=width, height=height, stored_path=stored)
        prediction = add_prediction(
            s, image, model_id=result.model_id, weights_sha256=result.weights_sha256, panel=result.panel,
            class_key=result.class_key, sentence=result.sentence or uncertain_text(result),
            confidence=result.confidence, abstained=result.abstained, abstain_reason=result.abstain_reason,
            scores=result.scores, atypical=result.atypical, out_of_scope_score=result.out_of_scope_score,
            calibration_id=result.calibration_id)
        return image.id, prediction.id
