import json

import pytest
import torch

from core.checkpoint import ModelLoadError, file_sha256, load_bundle, save_bundle, sidecar_path
from tests.conftest import make_tiny_bundle


def test_round_trip_keeps_weights_prototypes_and_sidecar(tmp_path):
    bundle = make_tiny_bundle(seed=3)
    bundle.ood_precision = torch.eye(bundle.model.config.embed_dim) * 2.0
    path = save_bundle(bundle, tmp_path / "m.safetensors")
    loaded = load_bundle(path)
    assert torch.equal(loaded.ood_precision, bundle.ood_precision)
    for key, value in bundle.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key])
    assert torch.equal(bundle.prototypes["blood_cells"], loaded.prototypes["blood_cells"])
    assert set(loaded.centroids) == set(bundle.centroids)
    side = json.loads(sidecar_path(path).read_text())
    assert side["weights_sha256"] == file_sha256(path) and side["config"]["name"] == "tiny-test"
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(bundle.model.eval().encode_image(images), loaded.model.encode_image(images), atol=1e-6)


def test_tampered_weights_are_refused(tmp_path):
    path = save_bundle(make_tiny_bundle(), tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="does not match"):
        load_bundle(path)


def test_sidecar_without_a_weights_hash_is_refused_as_unverifiable(tmp_path):
    path = save_bundle(make_tiny_bundle(), tmp_path / "m.safetensors")
    side = json.loads(sidecar_path(path).read_text())
    del side["weights_sha256"]
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(ModelLoadError, match="records no weights_sha256, so the weights cannot be verified"):
        load_bundle(path)


def test_missing_sidecar_and_missing_file_are_clear(tmp_path):
    path = save_bundle(make_tiny_bundle(), tmp_path / "m.safetensors")
    sidecar_path(path).unlink()
    with pytest.raises(ModelLoadError, match="sidecar not found"):
        load_bundle(path)
    with pytest.raises(ModelLoadError, match="not found"):
        load_bundle(tmp_path / "nothing.safetensors")


def test_pickle_is_never_loaded(tmp_path):
    """A pickled file renamed .safetensors with a matching sidecar is still refused."""
    path = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, path)
    sidecar_path(path).write_text(json.dumps({"weights_sha256": file_sha256(path), "config": {"name": "tiny-test"},
                                              "panels": {}}))
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_bundle(path)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_exported_files_get_the_mode_of_the_process_umask(tmp_path, umask):
    """safetensors' save_file creates 0600 files: a model exported for a web server or a team
    was readable by its owner only. Weights and sidecar follow the umask like any other file."""
    import os
    import stat

    from core.checkpoint import update_sidecar
    from core.gan import Discriminator, GanConfig, Generator
    from core.gan_checkpoint import save_gan

    previous = os.umask(umask)
    try:
        path = save_bundle(make_tiny_bundle(), tmp_path / "m.safetensors")
        update_sidecar(path, {"note": "after training"})
        config = GanConfig(n_classes=2, image_size=32, z_dim=8, g_channels=4, d_channels=4, embed_dim=4)
        gan = save_gan(tmp_path / "gan.safetensors", Generator(config), Discriminator(config), None, {"classes": ["a", "b"]})
    finally:
        os.umask(previous)
    for written in (path, sidecar_path(path), gan, sidecar_path(gan)):
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written.name
    assert load_bundle(path).sidecar["note"] == "after training"  # still a valid, verified bundle


def _edited(path, edit):
    """The sidecar of `path` changed by `edit(sidecar)` (the weights untouched, so the hash holds)."""
    from core.checkpoint import load_sidecar, update_sidecar

    sidecar = load_sidecar(path)
    edit(sidecar)
    update_sidecar(path, sidecar)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["panels"]["blood_cells"]["classes"].pop("platelet"), "names 7 classes but its prototypes have shape"),
    (lambda s: s["panels"].update(extra=s["panels"]["b_all"]), "panel 'extra' has no sentence prototypes"),
    (lambda s: s["calibration"]["panels"]["blood_cells"].update(temperature=0), "temperature is 0"),
    (lambda s: s["calibration"]["panels"]["blood_cells"].update(min_agreement="x"), "min_agreement is 'x'"),
    (lambda s: s["calibration"]["panels"]["blood_cells"].update(min_confidence=float("nan")), "min_confidence"),
    (lambda s: s["calibration"]["panels"]["blood_cells"].update(neighbours=2.5), "neighbours is 2.5"),
    (lambda s: s["calibration"]["panels"]["blood_cells"].update(typicality="high"), "typicality is 'high'"),
    (lambda s: s.update(calibration=[1, 2]), "'calibration' is not an object"),
    (lambda s: s["calibration"].update(attributes={"cell_size": -1}), "phrase threshold of .cell_size. is -1"),
])
def test_a_sidecar_that_does_not_fit_its_weights_is_refused(tmp_path, edit, message):
    from tests.conftest import save_calibrated_tiny

    path = _edited(save_calibrated_tiny(tmp_path / "m.safetensors"), edit)
    with pytest.raises(ModelLoadError, match="m.json does not fit its weights: .*" + message.replace("(", r"\(")):
        load_bundle(path)


def test_a_degenerate_fit_is_not_read_so_its_numbers_are_not_checked(tmp_path):
    from tests.conftest import save_calibrated_tiny

    def flag(sidecar):
        sidecar["calibration"]["panels"]["blood_cells"].update(degenerate=True, distance_reference=float("inf"))

    assert load_bundle(_edited(save_calibrated_tiny(tmp_path / "m.safetensors"), flag)).panels
