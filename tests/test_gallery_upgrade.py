"""Gallery indexes written by earlier versions: a format-1 index (512 px decode bound, one
plain label per reviewed case) is upgraded in place, refusals made under other loader limits
are retried, labels are refreshed without embedding, and a malformed manifest reads as an
empty index instead of raising."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from core.gallery import load_index, pending_work, update_index
from core.gallery_sources import scan_folder
from tests.conftest import draw_cell, write_class_tree, write_format1_index

OLD_STRIP_REASON = ("strip.png: the image is 16x640 pixels, too long and narrow to describe (a side may be at "
                    "most 32 times the other).")


@pytest.fixture
def tree(tmp_path):
    """Three 64 px cells, a 600 px field (shrunk by a 512 px bound) and a 16 x 640 strip (40:1:
    refused by a 512 px bound as too narrow to decode; loaded under Describe's 1024, then refused
    as a strip Describe does not describe)."""
    root = write_class_tree(tmp_path / "gallery", {"neutrophil": 3})
    draw_cell(600, seed=5).save(root / "neutrophil" / "large.png")
    Image.new("RGB", (16, 640), (200, 120, 150)).save(root / "neutrophil" / "strip.png")
    return root


def test_a_format1_index_is_upgraded_retrying_old_refusals_and_reembedding_only_large_files(
        tiny_bundle, tree, tmp_path, counted):
    folder = tmp_path / "cache"
    sources = scan_folder(tree)
    fresh = update_index(tiny_bundle, folder, sources)
    strip = str((tree / "neutrophil" / "strip.png").resolve())
    assert len(fresh) == 4 and list(fresh.skipped) == [strip]
    write_format1_index(folder, refuse={strip: OLD_STRIP_REASON})
    old = load_index(folder, tiny_bundle.weights_sha256)
    assert len(old) == 4 and {i.max_side for i in old.items} == {512} and list(old.skipped) == [strip]
    # to embed: the strip (refused under other limits) and the 600 px field (decoded at 512 then);
    # without embedding: the three small cells, re-tagged (they decode to the same pixels)
    assert pending_work(old, sources) == (2, 3)

    counted.clear()
    upgraded = update_index(tiny_bundle, folder, sources)
    assert sum(counted) == 1 and upgraded.stats["embedded"] == 1 and upgraded.stats["reused"] == 3
    # retried under today's limits: loaded now, and refused with today's reason, not the old one
    assert list(upgraded.skipped) == [strip] and "40.0 times longer than wide" in upgraded.skipped[strip]["reason"]
    assert {i.max_side for i in upgraded.items} == {1024}
    assert json.loads((folder / "manifest.json").read_text())["format"] == 2  # a format-1 reader ignores it
    before = {i.path: row for row, i in enumerate(fresh.items)}
    for row, item in enumerate(upgraded.items):  # the small cells kept their rows as they were
        if item.path in before and item.size < 10_000:
            assert torch.allclose(upgraded.embeddings[row], fresh.embeddings[before[item.path]], atol=1e-3)
    reloaded = load_index(folder, tiny_bundle.weights_sha256)
    assert pending_work(reloaded, sources) == (0, 0)
    update_index(tiny_bundle, folder, sources)
    assert sum(counted) == 1  # nothing retried twice


def test_a_refusal_is_retried_when_the_loader_limits_change(tiny_bundle, tree, tmp_path, counted, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("HEMASCRIBE_MAX_PIXELS", "12000")  # the 600 x 600 field is over it
    index = update_index(tiny_bundle, folder, scan_folder(tree))
    assert len(index) == 3 and len(index.skipped) == 2  # the field, and the strip (refused as a strip)
    assert pending_work(index, scan_folder(tree)) == (0, 0)  # same file, same limits: not retried
    monkeypatch.delenv("HEMASCRIBE_MAX_PIXELS")
    assert pending_work(index, scan_folder(tree)) == (2, 0)  # both refused under other limits
    assert len(update_index(tiny_bundle, folder, scan_folder(tree))) == 4


def test_labels_and_removals_are_applied_without_embedding(tiny_bundle, tree, tmp_path, counted):
    folder = tmp_path / "cache"
    sources = scan_folder(tree)
    index = update_index(tiny_bundle, folder, sources)
    counted.clear()
    changed = dataclasses.replace(sources[0], key="1:1", label="monocyte")  # waits to be embedded again
    relabelled = dataclasses.replace(sources[1], label="basophil")
    new = dataclasses.replace(sources[2], path=str(tmp_path / "new.png"))
    listed = [changed, relabelled, new, *sources[4:]]  # sources[2] and [3] removed
    assert pending_work(index, listed) == (2, 4)  # changed + new; two relabels, two removals
    updated = update_index(tiny_bundle, folder, listed, embed=False)
    assert sum(counted) == 0 and len(updated) == 2 and list(updated.skipped) == [sources[4].path]  # the strip
    by_path = {i.path: i for i in updated.items}
    assert by_path[changed.path].label == "monocyte" and by_path[changed.path].key == sources[0].key
    assert by_path[relabelled.path].label == "basophil" and new.path not in by_path
    assert pending_work(load_index(folder, tiny_bundle.weights_sha256), listed) == (2, 0)


def _mutations():
    """Ways a manifest can be malformed: (name, function changing the parsed JSON in place)."""
    def item(**fields):
        return lambda m: m["items"][0].update(fields)
    return [
        ("expert_labels not pairs", item(expert_labels=[["blood_cells"]])),
        ("expert_labels not a list", item(expert_labels=5)),
        ("unknown field", item(surprise=1)),
        ("missing field", lambda m: m["items"][0].pop("path")),
        ("path not a string", item(path=7)),
        ("item not an object", lambda m: m["items"].__setitem__(0, 1)),
        ("items not a list", lambda m: m.__setitem__("items", 3)),
        ("skipped not an object", lambda m: m.__setitem__("skipped", [])),
        ("skipped entry without reason", lambda m: m.__setitem__("skipped", {"x": "oops"})),
        ("stats not an object", lambda m: m.__setitem__("stats", "x")),
        ("unknown format", lambda m: m.__setitem__("format", 3)),
        ("not an object", lambda m: m.clear()),
    ]


@pytest.mark.parametrize("name, mutate", _mutations(), ids=[name for name, _ in _mutations()])
def test_a_malformed_manifest_reads_as_an_empty_index(tiny_bundle, tree, tmp_path, name, mutate):
    folder = tmp_path / "cache"
    update_index(tiny_bundle, folder, scan_folder(tree))
    manifest = json.loads((folder / "manifest.json").read_text())
    mutate(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest if manifest else []))
    assert len(load_index(folder, tiny_bundle.weights_sha256)) == 0
    assert len(load_index(folder)) == 0
    assert len(update_index(tiny_bundle, folder, scan_folder(tree))) == 4  # rebuilt, not stuck
