"""`core.panels.infer_panel`: the one rule by which evaluate, calibrate and gan_quality pick a
panel from class names when --panel names none."""
import pytest

from core.panels import PanelTieError, infer_panel, load_panels, panels_from_dict


def _panels(**classes: list[str]):
    return panels_from_dict({name: {"classes": {key: {"sentence": key} for key in keys}}
                             for name, keys in classes.items()})


def test_the_panel_holding_the_most_classes_wins_and_none_when_no_panel_holds_any():
    panels = load_panels()
    assert infer_panel(panels, {"neutrophil", "basophil", "monocyte", "pre_b"}) == "blood_cells"
    assert infer_panel(panels, {"early_pre_b", "pro_b"}) == "b_all"
    assert infer_panel(panels, {"smudge"}) is None and infer_panel(panels, set()) is None
    # the folders of README's calibrate command (PBC val, B-ALL val) keep their panels
    assert infer_panel(panels, set(panels["blood_cells"].keys)) == "blood_cells"
    assert infer_panel(panels, set(panels["b_all"].keys)) == "b_all"


def test_a_tie_is_refused_with_the_tied_panels_not_broken_by_the_smaller_panel():
    """The retired `panel_for_classes` silently took `small` here."""
    panels = _panels(large=["a", "b", "c"], small=["a", "b"])
    with pytest.raises(PanelTieError) as error:
        infer_panel(panels, {"a", "b"}, "class folders of val")
    assert str(error.value) == ("the class folders of val fit panels large and small equally "
                                "(large: a, b; small: a, b); pass --panel NAME to choose one")
    assert isinstance(error.value, ValueError)  # the commands' one-line exit-2 path catches ValueError
    assert infer_panel(panels, {"a", "b", "c"}) == "large"
    with pytest.raises(PanelTieError, match="blood_cells and b_all"):  # disjoint panels, two classes each
        infer_panel(load_panels(), {"neutrophil", "basophil", "pre_b", "benign"})
