"""Read side of the feedback store: history, review table, agreement statistics, CSV.

The pure helpers (`agreement_summary`, `expert_confusion`, `rows_to_csv`) take the rows
returned by `feedback_table`, so the UI queries once and derives everything else.
"""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

import core.store as st

DECIDED = ("agree", "disagree")
ABSTAINED_LABEL = "(abstained)"
CSV_COLUMNS = (
    "feedback_id", "prediction_id", "image_id", "created_at", "reviewer", "verdict",
    "model_class", "corrected_class", "expert_class", "confidence", "panel", "model_id",
    "abstained", "sentence", "corrected_sentence", "comment", "original_name", "sha256",
    "atypical", "out_of_scope_score", "calibration_id",  # added in session 13: last, so older columns keep their place
)
# how an answer stood against the atypical band (core.typicality), in agreement_summary
# (None: an answer of a model without a fitted band, or stored before the mark was recorded)
TYPICALITY_LABELS = {False: "typical", True: "atypical", None: "not marked"}


def _utc(dt: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; they were written as UTC.
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def expert_class(verdict: str, model_class: str | None, corrected_class: str | None) -> str | None:
    """The class the expert vouches for: the model's on agree, the correction on disagree."""
    if verdict == "agree":
        return model_class
    if verdict == "disagree":
        return corrected_class
    return None


def _prediction_event(p) -> dict:
    return {
        "kind": "prediction", "id": p.id, "created_at": _utc(p.created_at),
        "model_id": p.model_id, "weights_sha256": p.weights_sha256, "panel": p.panel,
        "class_key": p.class_key, "sentence": p.sentence, "confidence": p.confidence,
        "abstained": p.abstained, "abstain_reason": p.abstain_reason, "atypical": p.atypical,
        "scores": json.loads(p.scores_json),
    }


def _feedback_event(f, model_class: str | None) -> dict:
    return {
        "kind": "feedback", "id": f.id, "prediction_id": f.prediction_id,
        "created_at": _utc(f.created_at), "reviewer": f.reviewer, "verdict": f.verdict,
        "model_class": model_class, "corrected_class": f.corrected_class,
        "expert_class": expert_class(f.verdict, model_class, f.corrected_class),
        "corrected_sentence": f.corrected_sentence, "comment": f.comment,
    }


def image_history(s: Session, sha256: str) -> list[dict]:
    """Every prediction and feedback row for one image, oldest first ([] if unknown)."""
    image = s.scalar(select(st.ImageRecord).where(st.ImageRecord.sha256 == sha256))
    if image is None:
        return []
    preds = s.scalars(select(st.PredictionRecord)
                      .where(st.PredictionRecord.image_id == image.id)).all()
    model_class = {p.id: p.class_key for p in preds}
    feedback = s.scalars(select(st.FeedbackRecord)
                         .where(st.FeedbackRecord.image_id == image.id)).all()
    events = [_prediction_event(p) for p in preds]
    events += [_feedback_event(f, model_class.get(f.prediction_id)) for f in feedback]
    # A prediction always precedes its feedback; ids break ties within equal timestamps.
    events.sort(key=lambda e: (e["created_at"], e["kind"] == "feedback", e["id"]))
    return events


def latest_verification(s: Session, image_id: int, panel: str | None = None,
                        weights_sha256: str | None = None, answer: tuple[str | None, bool] | None = None) -> dict | None:
    """The most recent agree/disagree on this image (who, when, verdict, classes, corrected
    sentence) or None; with `panel` (and `weights_sha256`), only on the predictions of that panel
    (and model), and with `answer` ((class key, abstained) of the answer shown), only on
    predictions that gave that answer: "agrees with the model" means the answer shown, not
    another panel's or model's, nor what the same weights said under an earlier calibration."""
    F, P = st.FeedbackRecord, st.PredictionRecord
    query = (select(F, P.class_key).join(P, F.prediction_id == P.id)
             .where(F.image_id == image_id, F.verdict.in_(DECIDED)))
    if panel is not None:
        query = query.where(P.panel == panel)
    if weights_sha256 is not None:
        query = query.where(P.weights_sha256 == weights_sha256)
    if answer is not None:
        class_key, abstained = answer
        query = query.where(P.class_key.is_(None) if class_key is None else P.class_key == class_key,
                            P.abstained == bool(abstained))
    row = s.execute(query.order_by(F.created_at.desc(), F.id.desc()).limit(1)).first()
    if row is None:
        return None
    f, model_class = row
    return {
        "feedback_id": f.id, "prediction_id": f.prediction_id, "reviewer": f.reviewer,
        "created_at": _utc(f.created_at), "verdict": f.verdict, "model_class": model_class,
        "corrected_class": f.corrected_class, "corrected_sentence": f.corrected_sentence,
        "expert_class": expert_class(f.verdict, model_class, f.corrected_class),
    }


def feedback_table(s: Session, *, reviewer: str | None = None, verdict: str | None = None, panel: str | None = None,
                   class_key: str | None = None, model_id: str | None = None) -> list[dict]:
    """One row per feedback with its prediction and image, oldest first.

    Filters are exact matches; `class_key` filters on the model's class, `model_id` on the model
    that described the image.
    """
    F, P, I = st.FeedbackRecord, st.PredictionRecord, st.ImageRecord
    q = (select(F, P, I).join(P, F.prediction_id == P.id).join(I, F.image_id == I.id)
         .order_by(F.created_at, F.id))
    if reviewer is not None:
        q = q.where(F.reviewer == reviewer.strip())
    if verdict is not None:
        q = q.where(F.verdict == verdict)
    if panel is not None:
        q = q.where(P.panel == panel)
    if class_key is not None:
        q = q.where(P.class_key == class_key)
    if model_id is not None:
        q = q.where(P.model_id == model_id)
    return [_table_row(f, p, i) for f, p, i in s.execute(q)]


def _table_row(f, p, i) -> dict:
    return {
        "feedback_id": f.id, "prediction_id": p.id, "image_id": i.id,
        "created_at": _utc(f.created_at), "reviewer": f.reviewer, "verdict": f.verdict,
        "model_class": p.class_key, "corrected_class": f.corrected_class,
        "expert_class": expert_class(f.verdict, p.class_key, f.corrected_class),
        "confidence": p.confidence, "panel": p.panel, "model_id": p.model_id,
        "weights_sha256": p.weights_sha256, "abstained": p.abstained, "atypical": p.atypical,
        "out_of_scope_score": p.out_of_scope_score, "calibration_id": p.calibration_id, "sentence": p.sentence,
        "corrected_sentence": f.corrected_sentence, "comment": f.comment,
        "original_name": i.original_name, "sha256": i.sha256,
    }


def _rate(agree: int, disagree: int) -> float | None:
    return agree / (agree + disagree) if agree + disagree else None


def latest_opinions(rows: list[dict]) -> list[dict]:
    """The rows (oldest first, as `feedback_table` gives them) less those a later row of the same
    reviewer on the same description replaces (same image, panel, weights and calibration): a
    verdict clicked twice, or changed, counts once, as it stands now. The store keeps them all."""
    latest = {}
    for row in rows:
        key = (row["reviewer"], row["image_id"], row["panel"], row["weights_sha256"], row["calibration_id"])
        latest[key] = row["feedback_id"]
    kept = set(latest.values())
    return [row for row in rows if row["feedback_id"] in kept]


def agreement_summary(rows: list[dict]) -> dict:
    """Agreement rate among agree+disagree (unsure excluded), overall and per model class.

    The overall rate is over the cases the model answered: an Agree on an Uncertain case agrees
    that it should not answer, which says nothing of its sentences. Verdicts on abstentions count
    under '(abstained)' (and `n_on_abstentions`). Rates are None where nothing was decided.
    """
    verdicts = Counter(r["verdict"] for r in rows)
    on_answers = Counter(r["verdict"] for r in rows if r["model_class"])
    per: dict[str, Counter] = {}
    for r in rows:
        per.setdefault(r["model_class"] or ABSTAINED_LABEL, Counter())[r["verdict"]] += 1
    per_class = {
        cls: {"n": sum(c.values()), "n_agree": c["agree"], "n_disagree": c["disagree"],
              "n_unsure": c["unsure"], "agreement_rate": _rate(c["agree"], c["disagree"])}
        for cls, c in sorted(per.items())
    }
    return {
        "n_feedback": len(rows), "n_agree": verdicts["agree"],
        "n_disagree": verdicts["disagree"], "n_unsure": verdicts["unsure"],
        "n_decided": verdicts["agree"] + verdicts["disagree"],
        "agreement_rate": _rate(on_answers["agree"], on_answers["disagree"]),
        "n_on_abstentions": sum(1 for r in rows if not r["model_class"]),
        "per_class": per_class,
        "by_typicality": agreement_by_typicality(rows),
    }


def agreement_by_typicality(rows: list[dict]) -> dict[str, dict]:
    """Agreement on the answered cases split by whether the answer was marked atypical:
    {"typical" | "atypical" | "not marked": {n, n_agree, n_disagree, n_unsure, agreement_rate}},
    only the groups that occur. At home, answers in the band were right less often (the sidecar's
    held-out accuracies); on another lab's slides this shows whether the mark still means that."""
    groups: dict[str, Counter] = {}
    for r in rows:
        if r["model_class"]:  # abstentions are never marked
            groups.setdefault(TYPICALITY_LABELS[r.get("atypical")], Counter())[r["verdict"]] += 1
    return {label: {"n": sum(c.values()), "n_agree": c["agree"], "n_disagree": c["disagree"],
                    "n_unsure": c["unsure"], "agreement_rate": _rate(c["agree"], c["disagree"])}
            for label in TYPICALITY_LABELS.values() if (c := groups.get(label))}


def expert_confusion(rows: list[dict]) -> tuple[list[str], list[list[int]]]:
    """(labels, matrix) with matrix[i][j] = rows where expert said labels[i], model labels[j].

    Only rows where both classes are known count (unsure, abstained, or a disagree without
    a corrected class carry no pair).
    """
    pairs = [(r["expert_class"], r["model_class"]) for r in rows
             if r.get("expert_class") and r.get("model_class")]
    labels = sorted({c for pair in pairs for c in pair})
    index = {c: k for k, c in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for expert, model in pairs:
        matrix[index[expert]][index[model]] += 1
    return labels, matrix


def _csv_cell(value) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    # Spreadsheet formula injection: free text starting with = + - @ would be executed.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def rows_to_csv(rows: list[dict]) -> str:
    """CSV text of feedback_table rows (fixed column order, header even when empty)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([_csv_cell(r.get(col)) for col in CSV_COLUMNS])
    return buf.getvalue()
