"""Reading and checking what `training.calibrate` is given, before any image is embedded: the
--val folders and their panels, and where the class centroids come from (--train folders, or the
model's stored ones with --keep-centroids). Every refusal is a ValueError with one line for the user."""
from __future__ import annotations

import sys

from core.checkpoint import file_sha256
from core.data import LabelledImage, scan_class_folders
from core.panels import infer_panel, require_panel
from training.evaluate import match_folders


def class_items(bundle, folders) -> list[LabelledImage]:
    """The images of class folders, labelled with the class key each folder names, as evaluation
    reads them (`training.evaluate.match_folders`: "Neutrophil" is neutrophil). A
    FileNotFoundError for a missing folder."""
    return match_folders(bundle, [i for f in folders for i in scan_class_folders(f)])[0]


def check_centroid_classes(bundle, seen: set[str], val_sets, source: str, refusal: str) -> None:
    """Before the long passes: a ValueError when the classes with a centroid (`seen`) hold no class
    of a --val panel (its out-of-scope score would be infinite for every image, and the fit would
    fail); a warning for each val class without one (its cells will read as out of scope).
    `source` names where the centroids come from (the warning), `refusal` is the error with
    a {panel} field."""
    for val_items, panel in val_sets:
        if not seen & set(bundle.panels[panel].keys):
            raise ValueError(refusal.format(panel=panel))
        missing = sorted({i.label for i in val_items} - seen)
        if missing:
            print(f"warning: {source} has no images of {', '.join(missing)} (panel {panel}): those cells will "
                  "read as out of scope", file=sys.stderr)


def train_items(bundle, folders, val_sets) -> list[LabelledImage]:
    """The --train images, checked (`check_centroid_classes`) before the long centroid pass."""
    items = class_items(bundle, folders)
    check_centroid_classes(bundle, {i.label for i in items}, val_sets, "--train",
                           "--train holds no class folder of panel {panel}; give its training folders")
    return items


def centroid_source(bundle, args, val_sets) -> list[LabelledImage] | None:
    """The --train images for new centroids, or None with --keep-centroids (the stored ones are
    used); a ValueError when neither is possible."""
    if args.keep_centroids:
        if not bundle.centroids:
            raise ValueError("--keep-centroids: this model stores no class centroids; give --train")
        check_centroid_classes(bundle, set(bundle.centroids), val_sets, "the model's stored centroids",
                               "the model's stored centroids hold no class of panel {panel}; calibrate it with --train "
                               "(its training folders)")
        return None
    items = train_items(bundle, args.train, val_sets)
    warn_shared_images(items, val_sets)
    return items


def warn_shared_images(training: list[LabelledImage], val_sets) -> list[str]:
    """Warn (stderr) about --val images whose bytes are also a --train image, and return their
    paths. Such a cell is its own nearest reference cell, so the neighbour check and the held-out
    figures are a little optimistic on it (the Taleqani B-ALL splits share 7 pro-B images)."""
    by_size: dict[int, list] = {}
    for item in training:  # sizes first: only files of a size both sides have are hashed
        by_size.setdefault(item.path.stat().st_size, []).append(item.path)
    candidates = [v.path for items, _ in val_sets for v in items if v.path.stat().st_size in by_size]
    train_hashes = {file_sha256(path) for size in {c.stat().st_size for c in candidates} for path in by_size[size]}
    shared = [str(path) for path in candidates if file_sha256(path) in train_hashes]
    if shared:
        print(f"warning: {len(shared)} --val image(s) are byte-identical to --train images (e.g. {shared[0]}); "
              "each is its own nearest reference cell, so its neighbour check and the held-out figures are "
              "slightly optimistic", file=sys.stderr)
    return shared


def val_panels(bundle, args) -> list[tuple[list[LabelledImage], str]]:
    """(images, panel) of every --val folder, before any image is embedded: the panel --panel
    names or the one its class folders fit (`core.panels.infer_panel`, which refuses a tie). A
    ValueError when that fails, for a folder without images, for two folders of one panel, and for
    a class folder outside the panel (the fit needs every image's class in it: a stray folder
    would stop the run with a traceback after the centroids' long pass)."""
    if args.panel and len(args.panel) != len(args.val):
        raise ValueError(f"--panel names {len(args.panel)} panel(s) for {len(args.val)} --val folder(s); "
                         "name one per --val folder, in order")
    for name in args.panel or ():
        require_panel(bundle.panels, name)
    sets = []
    for k, folder in enumerate(args.val):
        items = class_items(bundle, [folder])
        if not items:
            raise ValueError(f"--val {folder}: no images found (expected one sub-folder per class)")
        labels = {i.label for i in items}
        panel = args.panel[k] if args.panel else infer_panel(bundle.panels, labels, f"class folders of {folder}")
        if panel is None:
            raise ValueError(f"no panel of this model holds any of the class folders of {folder} "
                             f"({', '.join(sorted(labels))}); pass --panel")
        outside = sorted(labels - set(bundle.panels[panel].keys))
        if outside:
            raise ValueError(f"the class folders {', '.join(outside)} of {folder} are not classes of panel "
                             f"{panel}; give each --val folder the classes of one panel")
        earlier = [f for f, (_, p) in zip(args.val, sets) if p == panel]
        if earlier:  # a panel holds one calibration: the second fit would silently replace the first
            raise ValueError(f"--val {earlier[0]} and {folder} are both panel {panel}; give one --val folder "
                             "per panel (put all of a panel's class folders in one folder)")
        sets.append((items, panel))
    return sets
