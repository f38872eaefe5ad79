import torch

from core.config import load_model_config
from core.loss import attribute_matching_loss, bidirectional_contrastive_loss, soft_target_cross_entropy
from core.model import DualEncoder


def test_image_embeddings_unit_norm_and_gradients_reach_every_trained_parameter():
    model = DualEncoder(load_model_config("tiny-test"))
    images = torch.rand(4, 3, 32, 32)
    emb = model.encode_image(images)
    assert emb.shape == (4, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    text = model.project_sentence_features(torch.randn(3, 384))
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    loss = bidirectional_contrastive_loss(emb, text, torch.tensor([0, 1, 2, 0]), torch.arange(3), model.scale())["loss"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, missing


def test_text_tower_encodes_offline_to_unit_norm():
    model = DualEncoder(load_model_config("tiny-test"))
    emb = model.encode_text(["A neutrophil with a segmented nucleus.", "A small lymphocyte."])
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not any(k.startswith("_sentence") for k in model.state_dict())  # frozen tower not saved


def test_loss_both_directions_and_multi_positive_targets():
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1.0, 0.1], [0, 1.0]]), dim=-1)
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1.0]]), dim=-1)
    groups = torch.tensor([0, 0, 1])
    good = bidirectional_contrastive_loss(image, text, groups, torch.tensor([0, 1]), torch.tensor(10.0))
    bad = bidirectional_contrastive_loss(image, text, groups, torch.tensor([1, 0]), torch.tensor(10.0))
    assert good["loss"] < bad["loss"]
    assert good["image_to_text"] > 0 and good["text_to_image"] > 0
    # text -> image: the target of sentence 0 is split evenly over the two images of class 0
    logits = torch.tensor([[5.0, 5.0, -5.0]])
    optimum = soft_target_cross_entropy(logits, torch.tensor([[True, True, False]]))
    skewed = soft_target_cross_entropy(torch.tensor([[9.0, 1.0, -5.0]]), torch.tensor([[True, True, False]]))
    assert optimum < skewed


def test_reweighting_changes_the_loss():
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    plain = bidirectional_contrastive_loss(image, text, groups, torch.arange(2), torch.tensor(10.0))["loss"]
    weighted = bidirectional_contrastive_loss(image, text, groups, torch.arange(2), torch.tensor(10.0),
                                              torch.tensor([0.5, 0.5, 0.5, 0.5, 2.0, 2.0]))["loss"]
    assert not torch.isclose(plain, weighted)


def test_attribute_loss_ignores_unknown_targets():
    image = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    phrases = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    slices = [slice(0, 2), slice(2, 5)]
    none = attribute_matching_loss(image, phrases, slices, torch.full((3, 2), -1), torch.tensor(10.0))
    assert float(none) == 0.0
    some = attribute_matching_loss(image, phrases, slices, torch.tensor([[0, 2], [1, -1], [-1, -1]]), torch.tensor(10.0))
    assert float(some) > 0


def test_logit_scale_is_clamped():
    model = DualEncoder(load_model_config("tiny-test"))
    with torch.no_grad():
        model.logit_scale.fill_(50.0)
    assert float(model.scale().detach()) <= 100.01
