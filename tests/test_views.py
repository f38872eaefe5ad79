"""Test-time views: each image embedded as the mean of its turned copies (core.model.encode_views),
a number the calibration fixes (training.calibrate --views) and describing reads from the sidecar."""
from __future__ import annotations

import pytest
import torch

from core.checkpoint import file_sha256, load_bundle, save_bundle
from core.describe import describe, embed_images
from core.model import dihedral_views, encode_views
from tests.conftest import draw_cell, make_tiny_bundle, write_class_tree
from training import calibrate


def test_dihedral_views_are_the_quarter_turns_and_their_mirrors():
    image = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    assert torch.equal(dihedral_views(image, 1)[0], image)
    assert torch.equal(dihedral_views(image, 2)[1], torch.rot90(image, 2, dims=(-2, -1)))
    four, eight = dihedral_views(image, 4), dihedral_views(image, 8)
    assert four.shape == (4, 2, 3, 4, 4) and torch.equal(eight[:4], four)
    assert torch.equal(eight[5], torch.rot90(image, 1, dims=(-2, -1)).flip(-1))
    with pytest.raises(ValueError, match="views must be one of"):
        dihedral_views(image, 3)


@pytest.mark.parametrize("views", [0, 3])
def test_encode_views_refuses_a_view_count_it_cannot_make_even_for_no_images(views):
    model = make_tiny_bundle().model
    for images in (torch.rand(2, 3, 32, 32), torch.rand(0, 3, 32, 32)):
        with pytest.raises(ValueError, match="views must be one of"):
            encode_views(model, images, views)


def test_the_mean_over_turns_does_not_change_when_the_image_is_turned():
    model = make_tiny_bundle().model
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        upright, turned = encode_views(model, images, 4), encode_views(model, torch.rot90(images, 1, (-2, -1)), 4)
        single = encode_views(model, images, 1)
    assert torch.allclose(upright, turned, atol=1e-5)  # the same four looks, in another order
    assert torch.allclose(upright.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(single, model.encode_image(images))


def test_a_batch_larger_than_one_pass_is_split_and_embeds_each_image_as_alone(monkeypatch):
    import core.model

    model = make_tiny_bundle().model
    images = torch.rand(5, 3, 32, 32)
    passes = []
    real = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda batch: passes.append(batch.shape[0]) or real(batch))
    monkeypatch.setattr(core.model, "FORWARD_ROWS", 8)  # 2 images of 4 views a pass
    with torch.no_grad():
        split = encode_views(model, images, 4)
        assert passes == [8, 8, 4]  # never more than FORWARD_ROWS rows in one forward
        alone = torch.cat([encode_views(model, image[None], 4) for image in images])
    assert torch.allclose(split, alone, atol=1e-5)


def test_the_sidecar_decides_the_views_and_old_calibrations_keep_their_id():
    bundle = make_tiny_bundle()
    bundle.sidecar["calibration"] = {"panels": {"blood_cells": {"temperature": 0.7}}}
    assert bundle.views == 1 and bundle.embedding_id == bundle.weights_sha256
    single_id = bundle.calibration_id
    image = draw_cell(48, kind=0, seed=0)
    one = embed_images(bundle, [image])[0]
    bundle.sidecar["calibration"]["views"] = 4
    assert bundle.views == 4 and bundle.embedding_id.endswith("+views4")
    assert bundle.calibration_id != single_id  # stored answers tell the two ways apart
    assert not torch.allclose(embed_images(bundle, [image])[0], one)
    assert describe(bundle, image).best_class in bundle.panels["blood_cells"].keys
    for odd in (3, 4.0, "4", True):  # a hand-edited sidecar: read as one view, never a crash
        bundle.sidecar["calibration"]["views"] = odd
        assert bundle.views == 1 and bundle.calibration_id == single_id
        describe(bundle, image)
    assert encode_views(bundle.model, torch.zeros(0, 3, 32, 32), 4).shape == (0, bundle.model.config.embed_dim)


def test_the_atlas_cache_of_one_weights_differs_by_views(tmp_path):
    from core.gallery import cache_folder

    bundle = make_tiny_bundle()
    bundle.sidecar["weights_sha256"] = "ab" * 32
    single = cache_folder(tmp_path, bundle.embedding_id, tmp_path / "gallery")
    bundle.sidecar["calibration"] = {"views": 4}
    four = cache_folder(tmp_path, bundle.embedding_id, tmp_path / "gallery")
    assert single != four and four.name.startswith(bundle.weights_sha256[:16] + "+views4-")
    assert single.name.startswith(bundle.weights_sha256[:16] + "-")  # single-view caches keep their folder


def test_calibrate_records_views_and_keep_centroids_refuses_another_number(tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    save_bundle(make_tiny_bundle(), model)
    keys = list(make_tiny_bundle().panels["blood_cells"].keys)
    tree = write_class_tree(tmp_path / "cells", {k: 4 for k in keys}, size=48)
    assert calibrate.main(["--checkpoint", str(model), "--train", str(tree), "--val", str(tree), "--views", "4",
                           "--cache-dir", str(tmp_path / "cache")]) == 0
    assert load_bundle(model).views == 4
    calibrated = load_bundle(model)
    calibrated.sidecar["calibration"]["attributes"] = {"cell_size": 0.5}  # phrase thresholds fitted at 4 views
    save_bundle(calibrated, model)
    before = file_sha256(model), model.with_suffix(".json").read_text()
    assert calibrate.main(["--checkpoint", str(model), "--train", str(tree), "--val", str(tree), "--views", "1",
                           "--cache-dir", str(tmp_path / "cache")]) == 2  # they would be kept unrefitted
    assert "--attributes" in capsys.readouterr().err
    assert (file_sha256(model), model.with_suffix(".json").read_text()) == before
    before = file_sha256(model), model.with_suffix(".json").read_text()
    assert calibrate.main(["--checkpoint", str(model), "--keep-centroids", "--val", str(tree), "--views", "1",
                           "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "embedded with 4 view(s)" in capsys.readouterr().err
    assert (file_sha256(model), model.with_suffix(".json").read_text()) == before  # nothing written
    assert calibrate.main(["--checkpoint", str(model), "--keep-centroids", "--val", str(tree),
                           "--cache-dir", str(tmp_path / "cache")]) == 0  # the model's own number
    assert load_bundle(model).views == 4
