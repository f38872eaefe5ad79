"""Atlas search page pieces: the gallery index status and (re)index button, the free-text
search, the image search, and the grid of results shown by both.

Every shown string that comes from a file or a user (names, labels, queries) goes through
`md_escape` or `st.text`: never rendered as HTML or live Markdown.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st
from PIL import Image, ImageOps

from core.checkpoint import ModelBundle
from core.panels import Panel
from core.gallery import GalleryIndex, GalleryItem, Hit, pending_work, search_image, search_text, update_index
from core.gallery_index import distinct_items
from core.gallery_sources import REVIEWED
from core.imageio import ImageRejected, load_image_bytes, load_image_path
from core.preprocess import to_model_input
from core.reliability import content_problems, framing_problem
from ui import resources
from ui.cases import UPLOAD_TYPES
from ui.widgets import class_name, framed, label_name, md_escape, remember_choice, restore_widget

COLUMNS = 4  # result grid width
PICK_MAX = 2000  # gallery images offered in the picker; "More like this" reaches the others
AUTO_REINDEX_MAX = 50  # files added or changed since the last index that are embedded on sight (labels: all)
QUERY_ROW = "atlas_query_path"  # plain session key: the gallery image whose neighbours are shown
EXAMPLE = "cell with a bilobed nucleus and orange granules"


@st.cache_data(max_entries=512, show_spinner=False)
def thumbnail(path: str, key: str, size: int = 224) -> Image.Image | str:
    """A square tile of a gallery image, at most `size` px (a long narrow strip is padded with
    white, so it neither towers over the grid nor vanishes), or the sentence saying why the
    image cannot be shown. `key` (size:mtime or sha256) makes a changed file a new cache entry."""
    del key  # part of the cache key only
    try:
        # the Describe page's loader with its own limits: a smaller max_side would refuse strips
        # that Describe accepts (the long-and-narrow limit is max_side / min_side)
        image = load_image_path(path).image
    except ImageRejected as error:
        return str(error)
    image.thumbnail((size, size))
    return ImageOps.pad(image, (max(image.size),) * 2, color="white")


def label_text(item: GalleryItem, panels: dict[str, Panel]) -> str:
    """'Neutrophil (folder label)', 'no label', or a reviewed case's expert label on each panel,
    by class name: 'Benign (hematogones) (expert-verified, panel b_all); Lymphocyte
    (expert-verified, panel blood_cells)' (escaped). Each panel's label answers that panel's
    question; none replaces another."""
    if item.source == REVIEWED:
        if not item.expert_labels:
            return "no expert label"
        return "; ".join(f"{md_escape(class_name(panels[panel], label) if panel in panels else label)} "
                         f"(expert-verified, panel {md_escape(panel)})" for panel, label in item.expert_labels)
    return "no label" if item.label is None else md_escape(label_name(panels, item.label)) + " (folder label)"


def _no_gallery_message(gallery_dir: Path | None) -> str:
    if gallery_dir is None:
        return ("No gallery yet: no gallery folder is set and no case has been reviewed. Set "
                "`HEMASCRIBE_GALLERY_DIR` to a folder of cell images (sub-folders named after a class give "
                "labels), or review cases on the Describe page: reviewed cases join the gallery.")
    return (f"The gallery folder {md_escape(gallery_dir)} holds no images and no case has been reviewed yet. "
            "Add images (sub-folders named after a class give labels), then press Re-index.")


def reindex(bundle: ModelBundle, sources: list, embed: bool = True) -> GalleryIndex | None:
    """Update the index on disk from the listed `sources` (with a progress bar when embedding);
    None, after a warning, when the cache folder cannot be written (the index on disk is kept)."""
    bar = st.progress(0.0, text=f"Indexing {len(sources)} gallery images...") if embed else None

    def progress(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"Embedding new or changed images: {done} / {total}")

    folder = resources.gallery_folder(bundle)
    try:
        return update_index(bundle, folder, sources, progress if embed else None, embed=embed)
    except OSError as error:  # e.g. a read-only disk or a cache path under a file
        st.warning(f"The gallery index could not be written to {md_escape(folder)} "
                   f"({md_escape(error.strerror or error)}): it is not updated. Set `HEMASCRIBE_GALLERY_CACHE_DIR` "
                   "to a folder this server can write.")
        return None
    finally:
        if bar is not None:
            bar.empty()


def gallery_section(bundle: ModelBundle) -> GalleryIndex | None:
    """Index status and the Re-index button; indexes automatically the first time. None
    (after saying why) when the gallery is empty."""
    current = resources.settings()
    if current.gallery_dir is not None and not current.gallery_dir.is_dir():
        st.warning(f"The gallery folder {md_escape(current.gallery_dir)} does not exist or is not a folder.")
    index = resources.get_gallery(bundle)
    clicked = st.button("Re-index gallery", key="atlas_reindex",
                        help="Embeds new or changed images only; removed images leave the index.")
    sources = resources.gallery_sources()  # stat only: cheap even for 20,000 files
    # a plan outside the folder lock, to decide what to do; update_index plans again under the
    # lock, since another session may have updated the index in between (stats only: cheap)
    to_embed, to_refresh = pending_work(index, sources)
    # First visit, an indexing that was interrupted (its user left the page), or a few files
    # added or changed since (embedding only those takes seconds): carry on.
    if clicked or index.updated_at is None or index.stats.get("pending") or 0 < to_embed <= AUTO_REINDEX_MAX:
        if index.updated_at is None and not sources:
            st.info(_no_gallery_message(current.gallery_dir))
            return None
        index = reindex(bundle, sources) or index
    else:
        if to_refresh:
            # New labels (an expert's verdicts; an index written before labels were kept per panel)
            # and removed files need no embedding: applied whatever their number, so a label is never
            # shown stale while many files wait for Re-index. Each panel's label comes from that panel.
            index = reindex(bundle, sources, embed=False) or index
        if to_embed:
            st.info(f"{to_embed} gallery images were added or changed since the last index, or were read by an "
                    "earlier version: press Re-index to embed them.")
    if not resources.get_store().available:
        st.caption("The feedback database is unavailable: reviewed cases are not in the gallery.")
    if not len(index):
        st.info(_no_gallery_message(current.gallery_dir))
        return None
    _status_caption(index)
    return index


def _status_caption(index: GalleryIndex) -> None:
    reviewed = sum(i.source == REVIEWED for i in index.items)
    verified = sum(i.verified for i in index.items)
    text = (f"{len(index)} images indexed: {len(index) - reviewed} from the gallery folder, {reviewed} reviewed "
            f"cases ({verified} with an expert-verified label).")
    if index.skipped:
        text += f" Files left out (unreadable, or a strip Describe would not describe): {len(index.skipped)}."
    if index.stats.get("embedded"):
        text += f" Last update embedded {index.stats['embedded']} new or changed images."
    st.caption(text)
    if index.skipped:
        with st.expander("Skipped files"):
            st.text("\n".join(entry["reason"] for entry in list(index.skipped.values())[:200]))


def _more_like(path: str) -> None:
    st.session_state[QUERY_ROW] = path
    st.session_state["atlas_image_source"] = "gallery"
    st.session_state["atlas_pick"] = path


def result_grid(hits: list[Hit], prefix: str, panels: dict[str, Panel]) -> None:
    """Thumbnails with similarity, label and name; a 'More like this' button each."""
    for start in range(0, len(hits), COLUMNS):
        for offset, (column, hit) in enumerate(zip(st.columns(COLUMNS), hits[start:start + COLUMNS])):
            with column:
                image = thumbnail(hit.item.path, hit.item.key)
                if isinstance(image, str):  # e.g. changed or removed since it was indexed
                    st.caption(f"Not shown: {md_escape(image)}")
                else:
                    st.image(image, width="stretch")
                st.caption(f"**{hit.similarity:.3f}** similarity - {label_text(hit.item, panels)}")
                st.caption(md_escape(hit.item.name))
                st.button("More like this", key=f"atlas_more_{prefix}_{start + offset}",
                          on_click=_more_like, args=(hit.item.path,))


def text_search(bundle: ModelBundle, index: GalleryIndex) -> None:
    """Free-text query box and its results."""
    st.subheader("Search by description")
    # restored after a visit to another page (see restore_widget), so the results come back too
    query = st.text_input("Describe the cell you are looking for", key=restore_widget("atlas_query"),
                          max_chars=300, placeholder=EXAMPLE)
    k = st.slider("Number of results", 4, 48, step=4, key=restore_widget("atlas_k", range(4, 49, 4), 12))
    remember_choice("atlas_query", query)
    remember_choice("atlas_k", k)
    if not query.strip():
        st.caption(f'Try e.g. "{EXAMPLE}".')
        return
    with st.spinner("Searching..."):
        hits = search_text(bundle, index, query, k)
    st.caption("Similarity is the cosine between the query and each image in the model's shared space; "
               "it ranks images, it is not a probability.")
    result_grid(hits, "text", bundle.panels)


def _query_image(index: GalleryIndex) -> tuple[Image.Image | None, int | None]:
    """The query image from an upload or the gallery, and its gallery row (None: upload)."""
    source = st.radio("Query image", ["upload", "gallery"], horizontal=True,
                      key=restore_widget("atlas_image_source", ["upload", "gallery"]),
                      format_func={"upload": "Upload an image", "gallery": "Pick a gallery image"}.get)
    remember_choice("atlas_image_source", source)
    if source == "upload":
        upload = st.file_uploader("Cell image", type=UPLOAD_TYPES, key="atlas_upload")
        if upload is None:
            return None, None
        return _uploaded_query(index, upload.getvalue(), upload.name)
    rows = {item.path: row for row, item in enumerate(index.items)}
    # one entry per distinct image, as the results show it (a reviewed case may also be a gallery file)
    options = [item.path for item in distinct_items(index.items[:PICK_MAX])]
    chosen = st.session_state.get(QUERY_ROW)
    if chosen in rows and chosen not in options:
        options.append(chosen)
    if len(index) > PICK_MAX:
        st.caption(f"The first {PICK_MAX} gallery images are listed; 'More like this' reaches any image.")
    path = st.selectbox("Gallery image", options, index=None, key=restore_widget("atlas_pick", options),
                        placeholder="Choose an image",
                        format_func=lambda p: index.items[rows[p]].name if p in rows else p)
    remember_choice("atlas_pick", path)
    if path is None or path not in rows:
        return None, None
    st.session_state[QUERY_ROW] = path
    try:
        return load_image_path(path).image, rows[path]
    except ImageRejected as error:
        st.error(md_escape(error))
        return None, None


def _uploaded_query(index: GalleryIndex, data: bytes, name: str) -> tuple[Image.Image | None, int | None]:
    """The uploaded image, and its gallery row when the gallery holds the same bytes (left out
    of its own results like a picked gallery image: it would top them at similarity 1.000)."""
    try:
        loaded = load_image_bytes(data, name)
    except ImageRejected as error:
        st.error(md_escape(error))
        return None, None
    row = index.row_of_content(loaded.sha256)  # the hash of the uploaded bytes, as the index keeps it
    if row is not None:
        st.caption(f"This image is in the gallery as {md_escape(index.items[row].name)}; it is left out of "
                   "its own results.")
    return loaded.image, row


def image_search(bundle: ModelBundle, index: GalleryIndex) -> None:
    """Upload or pick an image; show its nearest gallery neighbours (itself excluded)."""
    st.subheader("Search by image")
    image, row = _query_image(index)
    if image is None:
        return
    left, right = st.columns([1, 3])
    left.image(framed(image), caption="Query image", width=200)
    strip = framing_problem(image.size)
    if strip:  # the Describe page's rule: its centre square, all the model reads, is a sliver of it
        right.warning(f"Not searched. {strip}")
        return
    # Describe's content check too: the "neighbours" of a document or a blank are no answer
    problem = content_problems(to_model_input([image], bundle.model.config.image_size))[0]
    if problem:
        right.warning(f"Not searched. {problem}")
        return
    with right:
        with st.spinner("Searching..."):
            hits = search_image(bundle, index, image, st.session_state.get("atlas_k", 12), exclude=row)
        if not hits:
            st.caption("No other image in the gallery.")
    result_grid(hits, "image", bundle.panels)
