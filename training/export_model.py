"""Export a trained dual encoder as the shipped format: safetensors weights plus a JSON
sidecar holding panels, prototypes, provenance (command, data counts and fingerprint) and the
last epoch's metrics. Called by `training.train --export`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from core.bank import attribute_prototypes, panel_prototypes
from core.checkpoint import ModelBundle, save_bundle
from core.data import class_counts, data_fingerprint
from core.model import DualEncoder
from core.panels import PANELS_FILE
from training.checkpointing import read_metrics
from training.pack_data import packed_provenance


def export(model: DualEncoder, panels, phrases, train_items, args, out: Path, average=None,
           init_from: dict | None = None) -> None:
    """Write the safetensors model + sidecar with class prototypes and provenance (`init_from`: the
    model the run started from, train --init-from); with a weight average (training.ema), its
    weights are the ones shipped. Leaves `model` on the CPU in eval mode (the product describes on
    the CPU; called once, at the end of training)."""
    if average is not None:
        model.load_state_dict(average.shadow.state_dict())
    model.eval().cpu()
    metrics = read_metrics(out)
    raw_panels = json.loads(PANELS_FILE.read_text())
    sidecar = {
        "model_id": f"{model.config.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        "panels": raw_panels,
        "attribute_phrases": phrases,
        "trained_classes": sorted({i.label for i in train_items}),
        "training": {"command": "python -m training.train " + " ".join(sys.argv[1:]),
                     "data_counts": class_counts(train_items), "data_sha256": data_fingerprint(train_items),
                     "epochs": args.epochs, "seed": args.seed, "balance": args.balance,
                     "precision": args.precision,  # resolved: `auto` differs between machines
                     "final_epoch_metrics": metrics[-1] if metrics else {},
                     # trained on a pack (training.pack_data): its sources and their fingerprints
                     "packed_from": packed_provenance(args.data),
                     # fine-tuned from another exported model (train --init-from)
                     "init_from": init_from},
        "text_model_sha256": model.sentence_encoder().weights_sha256,
    }
    bundle = ModelBundle(model, sidecar, {}, panel_prototypes(model, panels), attribute_prototypes(model, phrases))
    path = save_bundle(bundle, args.export)
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
