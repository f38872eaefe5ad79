"""The dual encoder: an image tower and a text tower projected into one embedding space.

Image tower: open_clip's ``TimmModel`` around a timm trunk trained from scratch (no
download), batch norm swapped for group norm (see `core.norm`), and per-image
standardisation in front so a stain's overall hue and brightness are removed before the
trunk sees the pixels. Text tower: see `core.text_tower`; loaded lazily, because describing
an image only needs the sentence embeddings that the checkpoint already stores.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import ModelConfig
from core.norm import batchnorm_to_groupnorm
from core.text_tower import FrozenSentenceEncoder, PrecomputedSentenceEncoder, make_text_projection


def standardize_per_image(images: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Each image's channels to zero mean, unit variance (its own statistics only)."""
    mean = images.mean(dim=(2, 3), keepdim=True)
    std = images.std(dim=(2, 3), keepdim=True)
    return (images - mean) / (std + eps)


def build_image_tower(config: ModelConfig) -> nn.Module:
    """open_clip TimmModel with a randomly initialised trunk and a linear projection."""
    from open_clip.timm_model import TimmModel

    tower = TimmModel(config.vision_timm_model, embed_dim=config.embed_dim,
                      image_size=config.image_size, pool="avg", proj="linear", pretrained=False)
    if config.vision_norm == "groupnorm":
        batchnorm_to_groupnorm(tower)
    return tower


class DualEncoder(nn.Module):
    """CLIP-style dual encoder. Public face: `encode_image`, `encode_text`,
    `project_sentence_features` and `logit_scale` (clamped like CLIP)."""

    def __init__(self, config: ModelConfig, text_model_override: str | None = None,
                 sentence_features: str | None = None):
        super().__init__()
        self.config = config
        self.visual = build_image_tower(config)
        self.text_projection = make_text_projection(config.text_width, config.embed_dim, config.text_proj)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        if config.center_text_features:
            # All cell descriptions share a large "blood cell sentence" component (mean cosine
            # 0.57 between class sentences in all-MiniLM-L6-v2); removing it lets the classes
            # start nearly orthogonal. Set by training from its sentence bank, saved with the model.
            self.register_buffer("text_feature_mean", torch.zeros(config.text_width))
        self._text_model_name = text_model_override or config.text_model
        self._sentence_features = sentence_features  # a file of precomputed features, used instead
        self._sentence_encoder = None  # loaded on first use

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at exp(max_logit_scale) so it cannot run away."""
        return self.logit_scale.clamp(max=self.config.max_logit_scale).exp()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, S, S) float images in [0, 1] -> (B, embed_dim) embeddings."""
        if self.config.per_image_standardize:
            images = standardize_per_image(images)
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def sentence_encoder(self) -> FrozenSentenceEncoder | PrecomputedSentenceEncoder:
        """The frozen pretrained text encoder (or its precomputed features), loaded on first call."""
        if self._sentence_encoder is None:
            encoder = self._load_sentence_encoder()
            if encoder.width != self.config.text_width:
                raise ValueError(f"Text model {self._text_model_name!r} gives {encoder.width}-d "
                                 f"features; this model was trained on {self.config.text_width}-d.")
            # kept outside the module tree so state_dict() holds only trained weights
            object.__setattr__(self, "_sentence_encoder", encoder)
        return self._sentence_encoder

    def _load_sentence_encoder(self) -> FrozenSentenceEncoder | PrecomputedSentenceEncoder:
        if not self._sentence_features:
            return FrozenSentenceEncoder(self._text_model_name, self.config.text_pooler)
        encoder = PrecomputedSentenceEncoder(self._sentence_features)
        if (encoder.text_model, encoder.pooler) != (self._text_model_name, self.config.text_pooler):
            raise ValueError(f"{self._sentence_features} holds {encoder.text_model!r} ({encoder.pooler}) features; "
                             f"this model needs {self._text_model_name!r} ({self.config.text_pooler}).")
        return encoder

    def project_sentence_features(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Frozen sentence features (N, text_width) -> (N, embed_dim) embeddings."""
        # the frozen encoder lives outside the module tree (on the CPU) while the projection
        # follows `.to(device)`: bring its features to the projection's device
        features = features.to(self.logit_scale.device)
        if self.config.center_text_features:
            features = features - self.text_feature_mean
        projected = self.text_projection(features)
        return F.normalize(projected, dim=-1) if normalize else projected

    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Sentences -> (N, embed_dim) embeddings (loads the text model on first use)."""
        return self.project_sentence_features(self.sentence_encoder()(texts), normalize)


VIEW_COUNTS = (1, 2, 4, 8)


def dihedral_views(images: torch.Tensor, views: int) -> torch.Tensor:
    """(B, 3, S, S) -> (views, B, 3, S, S): the images turned by 0/180 degrees (2 views), by each
    quarter turn (4), and those mirrored too (8). A cell on a slide has no up and no handedness."""
    if views not in VIEW_COUNTS:
        raise ValueError(f"views must be one of {VIEW_COUNTS}, not {views!r}")
    turns = (0, 2) if views == 2 else range(min(views, 4))
    turned = [torch.rot90(images, k, dims=(-2, -1)) for k in turns]
    if views == 8:
        turned += [view.flip(-1) for view in turned]
    return torch.stack(turned)


FORWARD_ROWS = 64  # images x views per forward pass: bounds a batch's activations (peak memory)


def encode_views(model: DualEncoder, images: torch.Tensor, views: int = 1) -> torch.Tensor:
    """Unit-norm embeddings (B, D) of float images, averaged over `views` turned copies of each
    (`dihedral_views`); 1 view is `model.encode_image`. The copies go through the tower in
    passes of at most `FORWARD_ROWS` rows: every image is embedded on its own (group norm and
    per-image standardisation look at no other image), so the split changes no result, and a batch
    of 64 images at 4 views no longer holds 256 images' activations at once (c20 at 4 views,
    `training.benchmark` on 2 cores: peak memory 1.47 -> 1.23 GB, the same as at 1 view, and about
    90 -> 92-117 images/s over 13 runs, median 106, the smaller passes fitting the CPU's caches).

    Why views: training turns and mirrors every cell, so each turn is an equally good look at it;
    their mean embedding varies less than any one of them. Measured on v18 (4 turns against 1):
    PBC val 0.962 -> 0.964, B-ALL 0.983 -> 0.986, the other lab (BCCD) 0.464 -> 0.510; each image
    costs 4 forward passes."""
    if views not in VIEW_COUNTS:  # checked here too: an empty batch never reaches dihedral_views
        raise ValueError(f"views must be one of {VIEW_COUNTS}, not {views!r}")
    if images.shape[0] == 0:  # nothing to embed (and no per-image statistics of nothing to take)
        return images.new_zeros((0, model.config.embed_dim))
    per_pass = max(1, FORWARD_ROWS // views)
    return torch.cat([_encode_turned(model, chunk, views) for chunk in images.split(per_pass)])


def _encode_turned(model: DualEncoder, images: torch.Tensor, views: int) -> torch.Tensor:
    if views == 1:
        return model.encode_image(images)
    stacked = dihedral_views(images, views)
    embeddings = model.encode_image(stacked.flatten(0, 1)).view(views, images.shape[0], -1)
    return F.normalize(embeddings.mean(dim=0), dim=-1)
