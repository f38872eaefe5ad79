import numpy as np
import pytest
import torch

from core.explain import class_heatmap, overlay, target_layers


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(getattr(m, "_forward_pre_hooks", {}))
               for m in module.modules())


def test_gradcam_heatmap_shape_and_hooks_released(tiny_bundle, cell_image):
    before = _hook_count(tiny_bundle.model)
    heatmap = class_heatmap(tiny_bundle, cell_image, "blood_cells", "neutrophil")
    size = tiny_bundle.model.config.image_size
    assert heatmap.shape == (size, size)
    assert np.isfinite(heatmap).all() and heatmap.min() >= 0 and heatmap.max() <= 1
    assert _hook_count(tiny_bundle.model) == before  # the shared model keeps no hooks
    assert all(p.grad is None for p in tiny_bundle.model.parameters())  # nor gradients


def test_a_failure_inside_gradcam_is_raised_not_swallowed(tiny_bundle, cell_image, monkeypatch):
    import core.explain

    def broken_target(prototype):
        def target(output):
            raise IndexError("a target that fails")
        return target

    # pytorch-grad-cam's __exit__ returns True for an IndexError: unchecked, the caller met an unbound name
    monkeypatch.setattr(core.explain, "SentenceSimilarityTarget", broken_target)
    before = _hook_count(tiny_bundle.model)
    with pytest.raises(RuntimeError, match="Grad-CAM produced no heatmap"):
        class_heatmap(tiny_bundle, cell_image, "blood_cells", "neutrophil")
    assert _hook_count(tiny_bundle.model) == before


def test_gradcam_works_inside_no_grad(tiny_bundle, cell_image):
    with torch.no_grad():
        heatmap = class_heatmap(tiny_bundle, cell_image, "b_all", "pro_b")
    assert heatmap.shape[0] == tiny_bundle.model.config.image_size


def test_target_layer_is_a_grid_finer_than_the_last_stage(tiny_bundle):
    trunk = tiny_bundle.model.visual.trunk
    last = trunk.get_submodule(trunk.feature_info[-1]["module"])
    out = []
    handles = [layer.register_forward_hook(lambda m, i, o: out.append(o)) for layer in (*target_layers(tiny_bundle), last)]
    tiny_bundle.model.encode_image(torch.rand(1, 3, 32, 32))
    for handle in handles:
        handle.remove()
    assert len(out) == 2 and all(o.ndim == 4 for o in out)
    assert out[0].shape[-1] > out[1].shape[-1]


def test_overlay_opacity_changes_pixels(cell_image):
    heatmap = np.zeros((32, 32), dtype=np.float32)
    heatmap[8:24, 8:24] = 1
    faint, strong = overlay(cell_image, heatmap, 0.1, 64), overlay(cell_image, heatmap, 0.9, 64)
    assert faint.size == strong.size == (64, 64)
    assert np.abs(np.asarray(faint, float) - np.asarray(strong, float)).mean() > 5


def test_attribute_phrase_heatmap(tiny_bundle, cell_image):
    from core.explain import attribute_heatmap

    heatmap = attribute_heatmap(tiny_bundle, cell_image, "nucleus_shape", "segmented-bilobed")
    assert heatmap.shape == (tiny_bundle.model.config.image_size,) * 2 and np.isfinite(heatmap).all()


def test_gradcam_check_scores_each_stage_with_the_apps_gradcam(tiny_bundle, tmp_path):
    from core.data import scan_class_folders
    from tests.conftest import write_class_tree
    from training.gradcam_check import centre_disc, stage_scores

    assert abs(centre_disc(96).mean() - np.pi * 0.09) < 0.01  # disc of radius 0.3: ~0.28 of the area
    keys = [c.key for c in tiny_bundle.panels["blood_cells"].classes]
    items = scan_class_folders(write_class_tree(tmp_path, {"neutrophil": 2, "lymphocyte": 2}))
    share, correlation = stage_scores(tiny_bundle, -1, items, tiny_bundle.prototypes["blood_cells"], keys)
    assert 0.0 <= share <= 1.0 and (np.isnan(correlation) or -1.0 <= correlation <= 1.0)
