"""The class-conditional GAN of issue 4: tiny random networks, a few CPU steps, the CLIs on
drawn images. Everything runs in seconds."""
import argparse
import json

import pytest
import torch
from PIL import Image

from core.checkpoint import ModelLoadError
from core.data import scan_class_folders
from core.gan import Discriminator, GanConfig, Generator, generate, standing_stats
from core.gan_checkpoint import load_gan, save_gan
from tests.conftest import write_class_tree
from training import gan_ablation, gan_quality, gan_sample, train_gan
from training.ablation_report import verdict, write_report
from training.diffaugment import POLICIES, diff_augment
from training.train import load_items

TINY = dict(z_dim=16, g_channels=8, d_channels=8, embed_dim=8, max_channels=32)
STEP_ARGS = argparse.Namespace(ema=0.9, g_lr=1e-3, d_lr=1e-3, diffaugment=list(POLICIES), device="cpu")


def tiny(size=32, n_classes=3):
    torch.manual_seed(0)
    config = GanConfig(n_classes, size, **TINY)
    return Generator(config), Discriminator(config)


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_and_range(size):
    g, d = tiny(size)
    images = g(torch.randn(4, 16), torch.tensor([0, 1, 2, 0]))
    assert images.shape == (4, 3, size, size) and images.abs().max() <= 1
    assert d(images, torch.tensor([0, 1, 2, 0])).shape == (4,)


@torch.no_grad()
def test_class_condition_is_respected():
    g, d = tiny()
    g.eval()
    z = torch.randn(1, 16).repeat(2, 1)
    a, b = g(z, torch.tensor([0, 1]))
    assert (a - b).abs().mean() > 1e-4  # same noise, other class: another image
    x = torch.rand(1, 3, 32, 32).repeat(2, 1, 1, 1) * 2 - 1
    d.eval()
    scores = d(x, torch.tensor([0, 1]))
    phi = d.features(x[:1])[0]
    projection = (d.embed.weight[0] - d.embed.weight[1]) @ phi
    assert scores[0] - scores[1] == pytest.approx(float(projection), rel=1e-4, abs=1e-5)
    assert abs(float(scores[0] - scores[1])) > 1e-6


def test_a_few_training_steps_are_finite():
    config = GanConfig(2, 32, **TINY)
    (g, d, ema), (opt_g, opt_d) = train_gan.build(config, STEP_ARGS)
    before = [p.clone() for p in g.parameters()]
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0] * 8 + [1] * 2)
    for _ in range(3):
        x, y = train_gan.real_batch(images, labels, 6, True, rng)
        losses = train_gan.train_step(g, d, ema, opt_g, opt_d, x, y, STEP_ARGS, rng)
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, g.parameters()))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in d.parameters())
    standing_stats(ema, batches=2, batch_size=4)
    assert torch.isfinite(generate(ema, 1, 3, seed=0)).all()


def test_diffaugment_keeps_shape_and_passes_gradients():
    x = (torch.rand(3, 3, 32, 32) * 2 - 1).requires_grad_(True)
    for policy in [(p,) for p in POLICIES] + [POLICIES]:
        out = diff_augment(x, policy, torch.Generator().manual_seed(1))
        assert out.shape == x.shape and torch.isfinite(out).all()
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError):
        diff_augment(x, ("rotate",))


def test_checkpoint_round_trip_and_sha256(tmp_path):
    g, d = tiny()
    path = save_gan(tmp_path / "gan.safetensors", g, d, None, {"classes": ["a", "b", "c"], "step": 7, "seed": 0})
    loaded = load_gan(path)
    assert loaded.classes == ["a", "b", "c"] and loaded.sidecar["step"] == 7 and loaded.label("b") == 1
    g.eval()
    z, y = torch.randn(2, 16), torch.tensor([0, 2])
    assert torch.allclose(g(z, y), loaded.generator(z, y))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        load_gan(path)


def test_train_resume_and_sample_cli(tmp_path):
    data = write_class_tree(tmp_path / "data", {"basophil": 5, "lymphocyte": 5}, size=40)
    run = tmp_path / "run"
    common = ["--data", str(data), "--out", str(run), "--size", "32", "--batch-size", "4", "--g-channels", "8",
              "--d-channels", "8", "--cache-dir", "", "--log-every", "1", "--checkpoint-every", "2"]
    assert train_gan.main(common + ["--steps", "2"]) == 0
    for name in ("gan.safetensors", "gan.json", "optim.pt", "grid.png", "samples/basophil.png", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert train_gan.main(common + ["--steps", "3", "--resume"]) == 0
    sidecar = json.loads((run / "gan.json").read_text())
    assert sidecar["step"] == 3 and sidecar["classes"] == ["basophil", "lymphocyte"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    weights = (run / "gan.safetensors").read_bytes()
    assert train_gan.main(common + ["--steps", "1"]) == 2  # neither --resume nor --overwrite: the GAN is kept
    assert (run / "gan.safetensors").read_bytes() == weights

    out = tmp_path / "synthetic"
    assert gan_sample.main(["--checkpoint", str(run / "gan.safetensors"), "--class", "basophil", "--n", "3",
                            "--out", str(out), "--size", "48"]) == 0
    files = sorted((out / "basophil").glob("*.png"))
    assert [f.name for f in files] == [f"synthetic_basophil_{i}.png" for i in range(3)]
    with Image.open(files[0]) as image:
        assert image.size == (48, 48)
        assert image.text["synthetic"] == "true" and image.text["generator"] == sidecar["weights_sha256"]
    assert [i.label for i in scan_class_folders(out)] == ["basophil"] * 3  # usable as --synthetic


def test_frechet_distance():
    torch.manual_seed(0)
    a = torch.randn(400, 4)
    assert gan_quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert gan_quality.frechet_distance(a, a + 2.0) == pytest.approx(16.0, rel=1e-6)


def test_quality_report_on_a_tiny_classifier(tmp_path, tiny_bundle):
    g, d = tiny(n_classes=2)
    path = save_gan(tmp_path / "gan.safetensors", g, d, None, {"classes": ["basophil", "lymphocyte"], "step": 0})
    real = write_class_tree(tmp_path / "real", {"basophil": 6, "lymphocyte": 6}, size=40)
    args = gan_quality.parse_args(["--checkpoint", str(path), "--classifier", "x", "--real", str(real), "--n", "4"])
    result = gan_quality.assess(load_gan(path), tiny_bundle, args)
    assert result["panel"] == "blood_cells" and "NOT Inception FID" in result["note"]
    row = result["per_class"]["basophil"]
    assert 0 <= row["fidelity"] <= 1 and 0 <= row["abstain_rate"] <= 1 and row["n_real"] == 3
    assert row["frechet"] >= 0 and result["overall"]["frechet_real_vs_real"] >= 0


def test_quality_refuses_a_tie_between_panels_until_panel_names_one(tmp_path, tiny_model_path, capsys):
    """The rule of training.evaluate: the old one silently scored against the smaller panel (b_all)."""
    g, d = tiny(n_classes=2)
    path = save_gan(tmp_path / "gan.safetensors", g, d, None, {"classes": ["basophil", "pre_b"], "step": 0})
    real = write_class_tree(tmp_path / "real", {"basophil": 4, "pre_b": 4}, size=40)
    argv = ["--checkpoint", str(path), "--classifier", str(tiny_model_path), "--real", str(real), "--n", "2",
            "--json", str(tmp_path / "quality.json")]
    assert gan_quality.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "GAN's classes fit panels blood_cells and b_all equally" in err
    assert "--panel" in err and not (tmp_path / "quality.json").exists()
    assert gan_quality.main([*argv, "--panel", "b_all"]) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    assert result["panel"] == "b_all" and result["per_class"]["basophil"]["fidelity"] is None
    assert 0 <= result["per_class"]["pre_b"]["fidelity"] <= 1


def test_ablation_view_keeps_the_selected_real_images(tmp_path):
    data = write_class_tree(tmp_path / "data", {"basophil": 6, "lymphocyte": 9, "monocyte": 8}, size=24)
    items = load_items([str(data)], 7, ["basophil=2"], 1)
    gan_ablation.build_view(items, tmp_path / "view")  # raises unless it reproduces `items`
    counts = gan_ablation.synthetic_counts({"basophil": 2, "lymphocyte": 7, "monocyte": 7}, {"basophil": 2}, 1.0, 7)
    assert counts == {"basophil": 5}


def test_ablation_report_from_made_up_results(tmp_path):
    def result(acc, f1, recall):
        return {"accuracy": acc, "macro_f1": f1, "per_class": {"basophil": {"recall": recall}}}
    results = {"reweight": {0: result(0.9, 0.80, 0.5), 1: result(0.9, 0.82, 0.6)},
               "gan": {0: result(0.91, 0.85, 0.7), 1: result(0.92, 0.87, 0.8)}}
    report = tmp_path / "docs" / "ablation.md"
    table = write_report(results, ["basophil"], {"val": "val", "settings": {"epochs": 1}}, ["python -m x"], report)
    text = report.read_text()
    assert "| gan | 0,1 | 0.9150 ± 0.0071" in text and "recall basophil" in text
    assert "Verdict: gan beats reweight" in text and report.with_suffix(".png").is_file()
    assert "does not beat" in verdict({**table, "gan": {**table["gan"], "macro_f1": (0.7, 0.0)}})
    # the model card shows the table and the verdict of this very report
    from ui.model_card import ablation_summary
    shown_table, shown_verdict = ablation_summary(report)
    assert shown_table.startswith("| mode |") and "| gan | 0,1 |" in shown_table
    assert shown_verdict.startswith("Verdict: gan beats reweight") and "gan is also the best mode" in shown_verdict
    assert ablation_summary(tmp_path / "missing.md") is None
