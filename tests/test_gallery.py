"""Gallery index: incremental updates, the on-disk cache, queries, reviewed cases."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from core.gallery import cache_folder, load_index, search_image, search_text, update_index
from core.gallery_sources import REVIEWED, list_sources, reviewed_sources, scan_folder, synthetic_hashes
from core.imageio import load_image_path
from core.store import add_feedback, add_prediction, get_or_create_image, make_engine, make_sessionmaker
from tests.conftest import draw_cell, write_class_tree


@pytest.fixture
def tree(tmp_path):
    return write_class_tree(tmp_path / "gallery", {"neutrophil": 3, "lymphocyte": 2})


def test_index_reload_and_incremental_update(tiny_bundle, tree, tmp_path, counted):
    folder = tmp_path / "cache"
    index = update_index(tiny_bundle, folder, scan_folder(tree), batch_size=4)
    assert len(index) == 5 and sum(counted) == 5 and index.embeddings.shape == (5, 32)
    assert {i.label for i in index.items} == {"neutrophil", "lymphocyte"}
    assert all(len(i.sha256) == 64 and i.source == "folder" for i in index.items)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["weights_sha256"] == tiny_bundle.weights_sha256
    assert len(list(folder.glob("embeddings-*.npy"))) == 1

    reloaded = load_index(folder, tiny_bundle.weights_sha256)  # a restart: nothing embedded
    assert [i.path for i in reloaded.items] == [i.path for i in index.items]
    assert torch.allclose(reloaded.embeddings, index.embeddings, atol=1e-3)
    again = update_index(tiny_bundle, folder, scan_folder(tree))
    assert sum(counted) == 5 and again.stats == {"embedded": 0, "reused": 5, "removed": 0, "refused": 0, "pending": 0}

    draw_cell(64, kind=1, seed=9).save(tree / "lymphocyte" / "new.png")
    (tree / "neutrophil" / "neutrophil_0.png").unlink()
    updated = update_index(tiny_bundle, folder, scan_folder(tree))
    assert sum(counted) == 6  # only the new file was embedded
    assert updated.stats == {"embedded": 1, "reused": 4, "removed": 1, "refused": 0, "pending": 0}
    names = {i.name for i in load_index(folder, tiny_bundle.weights_sha256).items}
    assert "lymphocyte/new.png" in names and "neutrophil/neutrophil_0.png" not in names
    assert len(list(folder.glob("embeddings-*.npy"))) == 1  # the stale matrix was removed

    # a changed file (new size / mtime) is embedded again
    target = tree / "lymphocyte" / "new.png"
    draw_cell(80, kind=0, seed=3).save(target)
    os.utime(target, ns=(1, 1))
    update_index(tiny_bundle, folder, scan_folder(tree))
    assert sum(counted) == 7


@pytest.mark.skipif(os.name != "posix", reason="the advisory lock is POSIX flock")
def test_another_process_holding_the_folder_lock_makes_an_update_wait(tiny_bundle, tree, tmp_path):
    import fcntl
    import threading

    folder = tmp_path / "cache"
    folder.mkdir()
    # flock conflicts between two opens of the file, as between two server processes
    with open(folder / ".lock", "a") as other_process:
        fcntl.flock(other_process, fcntl.LOCK_EX)
        done = []
        worker = threading.Thread(target=lambda: done.append(update_index(tiny_bundle, folder, scan_folder(tree))))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not (folder / "manifest.json").exists()  # waiting, nothing written
    worker.join(timeout=60)
    assert len(done[0]) == 5 and (folder / "manifest.json").is_file()


def test_interrupted_indexing_resumes(tiny_bundle, tree, tmp_path, counted):
    folder = tmp_path / "cache"

    def leave_page(done, total):
        if done >= 3:
            raise KeyboardInterrupt  # as Streamlit stops a script whose user navigated away

    with pytest.raises(KeyboardInterrupt):
        update_index(tiny_bundle, folder, scan_folder(tree), leave_page, batch_size=1, commit_every=2)
    partial = load_index(folder, tiny_bundle.weights_sha256)
    assert len(partial) == 2 and partial.stats["pending"] == 3  # the first commit survived, and says so
    done = update_index(tiny_bundle, folder, scan_folder(tree))
    assert len(done) == 5 and done.stats["embedded"] == 3 and done.stats["reused"] == 2
    assert load_index(folder, tiny_bundle.weights_sha256).stats["pending"] == 0


def test_new_model_gets_new_cache_and_other_model_index_is_not_used(tiny_bundle, tree, tmp_path):
    first = cache_folder(tmp_path, "a" * 64, tree)
    assert first != cache_folder(tmp_path, "b" * 64, tree) != cache_folder(tmp_path, "a" * 64, tmp_path)
    folder = tmp_path / "cache"
    update_index(tiny_bundle, folder, scan_folder(tree))
    assert len(load_index(folder, "0" * 64)) == 0  # made by another model: ignored


def test_broken_files_are_skipped_counted_and_not_retried(tiny_bundle, tree, tmp_path, counted):
    (tree / "neutrophil" / "broken.png").write_bytes(b"not an image at all")
    (tree / "neutrophil" / "empty.jpg").write_bytes(b"")
    (tree / "notes.txt").write_text("ignored: not an image suffix")
    folder = tmp_path / "cache"
    index = update_index(tiny_bundle, folder, scan_folder(tree))
    assert len(index) == 5 and index.stats["refused"] == 2 and len(index.skipped) == 2
    assert all(entry["reason"] for entry in index.skipped.values())
    again = update_index(tiny_bundle, folder, scan_folder(tree))
    assert again.stats["embedded"] == 0 and len(again.skipped) == 2 and sum(counted) == 5


def test_pending_work_says_what_an_update_would_change(tiny_bundle, tree, tmp_path):
    import dataclasses

    from core.gallery import pending_work

    (tree / "neutrophil" / "broken.png").write_bytes(b"not an image")
    sources = scan_folder(tree)
    index = update_index(tiny_bundle, tmp_path / "cache", sources)
    assert sum(pending_work(index, sources)) == 0  # the unreadable file is known, not new
    twice = sources + [dataclasses.replace(sources[0], key="sha256:" + "0" * 64)]  # listed again, another key
    assert sum(pending_work(index, twice)) == 0  # the first listing counts, as the index reads it
    verified = [dataclasses.replace(sources[0], label="monocyte", verified=True), *sources[1:]]
    assert sum(pending_work(index, verified)) == 1  # an expert's new verdict: same file, new label
    draw_cell(64, seed=9).save(tree / "lymphocyte" / "new.png")
    (tree / "neutrophil" / "neutrophil_0.png").unlink()
    assert sum(pending_work(index, scan_folder(tree))) == 2  # one new, one gone


def test_exact_duplicate_is_its_own_top1(tiny_bundle, tree, tmp_path):
    index = update_index(tiny_bundle, tmp_path / "cache", scan_folder(tree))
    for row, item in enumerate(index.items):
        hits = search_image(tiny_bundle, index, load_image_path(item.path).image, k=3)
        assert hits[0].item.path == item.path and hits[0].row == row
        assert hits[0].similarity > 0.99 and hits[0].similarity >= hits[1].similarity >= hits[2].similarity
    excluded = search_image(tiny_bundle, index, load_image_path(index.items[0].path).image, k=10, exclude=0)
    assert len(excluded) == 4 and all(h.row != 0 for h in excluded)


def test_search_text_orders_by_cosine(tiny_bundle, tree, tmp_path):
    index = update_index(tiny_bundle, tmp_path / "cache", scan_folder(tree))
    query = "cell with a bilobed nucleus and orange granules"
    hits = search_text(tiny_bundle, index, query, k=3)
    assert len(hits) == 3
    expected = index.embeddings @ tiny_bundle.model.encode_text([query])[0].detach()
    assert [h.row for h in hits] == expected.argsort(descending=True)[:3].tolist()
    assert search_text(tiny_bundle, index, "   ", k=3) == []


def test_reviewed_cases_join_with_expert_labels(tiny_bundle, tree, tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'fb.sqlite'}")
    make_session = make_sessionmaker(engine)
    uploads = tmp_path / "uploads"
    verdicts = {"a": ("agree", None), "b": ("disagree", "monocyte"), "c": ("unsure", None), "d": None}
    with make_session.begin() as s:
        for seed, (name, verdict) in enumerate(verdicts.items()):
            path = uploads / f"{name}.png"
            path.parent.mkdir(exist_ok=True)
            draw_cell(64, seed=seed).save(path)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            image = get_or_create_image(s, sha256=sha, original_name=f"{name}.png", n_bytes=1,
                                        width=64, height=64, stored_path=f"{name}.png")
            prediction = add_prediction(s, image, model_id="m", weights_sha256="w", panel="blood_cells",
                                        class_key="neutrophil", sentence="s", confidence=0.9, abstained=False,
                                        abstain_reason=None, scores={"neutrophil": 0.9})
            if verdict:
                add_feedback(s, prediction, verdict=verdict[0], reviewer="Dr T", corrected_class=verdict[1])
    samples = tmp_path / "samples"  # the GAN's drawings: "a" has the same bytes as synthetic_0.png
    samples.mkdir()
    (samples / "synthetic_0.png").write_bytes((uploads / "a.png").read_bytes())
    (samples / "real_0.png").write_bytes((uploads / "b.png").read_bytes())  # not named synthetic_*: kept
    with make_session() as s:
        reviewed = reviewed_sources(s, uploads)
        combined = list_sources(tree, uploads, s)
        without_drawn = list_sources(None, uploads, s, synthetic_hashes(samples))
    engine.dispose()
    assert [(r.name, r.label_for("blood_cells"), r.verified) for r in reviewed] == [
        ("a.png", "neutrophil", True), ("b.png", "monocyte", True), ("c.png", None, False)]  # d: never reviewed
    assert all(r.label is None for r in reviewed)  # expert labels are per panel, never a folder label
    assert [r.name for r in without_drawn] == ["b.png", "c.png"]  # an Agree on a drawn image verifies no cell
    assert all(r.source == REVIEWED and r.key.startswith("sha256:") for r in reviewed)
    assert len(combined) == 8
    index = update_index(tiny_bundle, tmp_path / "cache", combined)
    assert sum(i.verified for i in index.items) == 2


def test_gallery_finds_every_file_the_evaluation_scan_counts(tiny_bundle, tmp_path):
    from core.data import IMAGE_SUFFIXES, scan_class_folders

    formats = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".tif": "TIFF",
               ".tiff": "TIFF", ".bmp": "BMP", ".dib": "BMP", ".gif": "GIF", ".webp": "WEBP"}
    assert set(formats) == IMAGE_SUFFIXES  # a suffix added to core.data needs a line here
    folder = tmp_path / "gallery" / "neutrophil"
    folder.mkdir(parents=True)
    for i, (suffix, fmt) in enumerate(sorted(formats.items())):
        draw_cell(48, seed=i).save(folder / f"cell{suffix}", format=fmt)
    sources = scan_folder(tmp_path / "gallery")
    assert sorted(s.name for s in sources) == sorted(f"neutrophil/{i.path.name}"
                                                     for i in scan_class_folders(tmp_path / "gallery"))
    assert {os.path.splitext(s.path)[1].lower() for s in sources} == IMAGE_SUFFIXES
    index = update_index(tiny_bundle, tmp_path / "cache", sources)
    assert len(index) == len(IMAGE_SUFFIXES) and index.stats["refused"] == 0


def test_gallery_indexes_exactly_what_describe_describes(tiny_bundle, tmp_path):
    """The Describe page's rules, with its reasons: what its loader refuses (a side over 64 times
    the other; the gallery once decoded at 512 px and refused anything over 32 times) and the
    strips over 3:1 it does not describe (a text search ranked one among the cells)."""
    from core.imageio import ImageRejected
    from core.reliability import framing_problem

    folder = tmp_path / "gallery" / "neutrophil"
    folder.mkdir(parents=True)
    for width, height in [(16, 1024), (1024, 16), (17, 1089), (15, 300), (300, 300), (300, 100), (320, 100)]:
        draw_cell(64).resize((width, height)).save(folder / f"{width}x{height}.png")  # a stained cell, stretched
    sources = scan_folder(tmp_path / "gallery")
    index = update_index(tiny_bundle, tmp_path / "cache", sources)
    reasons = {}
    for src in sources:
        try:
            size = load_image_path(src.path).image.size
        except ImageRejected as error:
            reasons[src.path] = str(error)
            continue
        if framing_problem(size):
            reasons[src.path] = f"{Path(src.path).name}: {framing_problem(size)}"
    assert {Path(i.path).name for i in index.items} == {"300x300.png", "300x100.png"}  # 3:1 is described
    assert {p: e["reason"] for p, e in index.skipped.items()} == reasons and len(reasons) == 5


def test_an_image_that_is_both_a_gallery_file_and_a_reviewed_case_is_one_hit():
    from core.gallery_index import GalleryIndex, GalleryItem

    def item(name, sha, source="folder", verified=False):
        return GalleryItem(path=f"/g/{name}", key="1:1", size=1, mtime_ns=1, label=None, source=source,
                           verified=verified, name=name, sha256=sha)

    items = (item("mono/a.png", "A"), item("case.png", "A", REVIEWED, verified=True), item("b.png", "B"),
             item("c.png", "C"))
    embeddings = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    index = GalleryIndex(items, embeddings, "w")
    hits = index.nearest(torch.tensor([1.0, 0.0]), 2)
    assert [h.item.name for h in hits] == ["case.png", "b.png"]  # once, as the expert-verified copy
    assert [h.item.name for h in index.nearest(torch.tensor([1.0, 0.0]), 5, exclude=0)] == ["b.png", "c.png"]
    from core.gallery_index import distinct_items  # the Atlas picker offers it once too

    assert [i.path for i in distinct_items(items)] == ["/g/case.png", "/g/b.png", "/g/c.png"]


def test_a_picture_describe_would_refuse_is_not_indexed(tiny_bundle, tree, tmp_path):
    from PIL import Image, ImageDraw

    document = Image.new("RGB", (120, 120), "white")
    ImageDraw.Draw(document).text((8, 50), "lab report", fill="black")
    document.save(tree / "neutrophil" / "report.png")
    index = update_index(tiny_bundle, tmp_path / "cache", scan_folder(tree))
    assert len(index) == 5 and "report.png" not in {Path(i.path).name for i in index.items}
    [reason] = [entry["reason"] for path, entry in index.skipped.items() if path.endswith("report.png")]
    assert reason.startswith("report.png: No stained cell is visible")
