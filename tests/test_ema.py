"""The weight average used by training: it follows the weights, warms up, and round-trips."""
import torch

from training.ema import WeightAverage


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GroupNorm(1, 3))


def test_average_moves_toward_current_weights_and_warms_up():
    model = _model()
    average = WeightAverage(model, decay=0.999)
    start = average.shadow[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update(model)
    # first update: decay min(0.999, 2/11) -> the average moves 9/11 of the way
    moved = average.shadow[0].weight - start
    assert torch.allclose(moved, torch.full_like(moved, 9 / 11), atol=1e-5)
    for _ in range(200):
        average.update(model)
    assert torch.allclose(average.shadow[0].weight, model[0].weight, atol=1e-2)


def test_average_is_a_separate_frozen_copy_and_round_trips():
    model = _model()
    average = WeightAverage(model, decay=0.9)
    assert all(not p.requires_grad for p in average.shadow.parameters())
    with torch.no_grad():
        model[0].bias.fill_(3.0)
    average.update(model)
    assert not torch.equal(average.shadow[0].bias, model[0].bias)
    restored = WeightAverage(_model(), decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert restored.steps == 1
    assert torch.equal(restored.shadow[0].bias, average.shadow[0].bias)
