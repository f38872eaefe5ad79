"""The batch-level check for images from another lab (core.site_shift)."""
from __future__ import annotations

import math

import pytest

from core.site_shift import ShiftNotice, batch_shift, binomial_tail, home_out_of_scope_rate, shift_message

HOME = 0.01


def test_large_batches_do_not_overflow():
    assert batch_shift(["out_of_scope"] * 2 + [None] * 1998, HOME) is None  # 2000 images, P ~ 1
    assert batch_shift(["out_of_scope"] * 60 + [None] * 1940, HOME) is not None  # three times the home rate
    assert math.isclose(binomial_tail(30, 2000, 0.01), 0.02126, rel_tol=1e-3)
    assert binomial_tail(6, 5, 0.5) == 0.0


def test_binomial_tail_is_exact():
    assert binomial_tail(0, 5, 0.3) == 1.0
    assert math.isclose(binomial_tail(5, 5, 0.5), 1 / 32)
    assert math.isclose(binomial_tail(2, 3, 0.5), 0.5)  # 3 + 1 of the 8 outcomes
    assert math.isclose(binomial_tail(1, 10, 0.01), 1 - 0.99 ** 10)


def test_many_out_of_scope_refusals_in_a_batch_warn_and_a_few_do_not():
    notice = batch_shift(["out_of_scope"] * 4 + [None], HOME)
    assert notice == ShiftNotice(4, 5, HOME, binomial_tail(4, 5, HOME))
    assert batch_shift(["out_of_scope"] + [None] * 19, HOME) is None  # one in 20: ordinary at home
    assert batch_shift(["out_of_scope"] * 2 + [None] * 18, HOME) is None  # two in 20: P = 0.017
    assert batch_shift(["out_of_scope"] * 4 + [None] * 16, HOME) is not None  # four in 20: P = 0.00004
    assert batch_shift(["out_of_scope"] * 4, HOME) is None  # too few images to tell
    assert batch_shift(["weak"] * 10, HOME) is None  # weak matches are not a sign of another lab
    assert batch_shift(["out_of_scope"] * 10, None) is None  # no fitted threshold: no check


def test_refusals_before_the_out_of_scope_check_are_not_counted():
    kinds = ["content"] * 5 + ["not_validated"] * 5 + ["out_of_scope"] * 4
    assert batch_shift(kinds, HOME) is None  # 4 images read: fewer than 5
    assert batch_shift(kinds + [None], HOME).read == 5


def test_home_rate_comes_from_a_fitted_panel_only():
    def sidecar(fit):
        return {"calibration": {"panels": {"blood_cells": fit}, "out_of_scope": {"coverage_on_val": 0.99}}}

    assert math.isclose(home_out_of_scope_rate(sidecar({"out_of_scope_threshold": 17.3}), "blood_cells"), 0.01)
    measured = {"out_of_scope_threshold": 14.7, "report": {"out_of_scope_rate": 0.023}}
    assert math.isclose(home_out_of_scope_rate(sidecar(measured), "blood_cells"), 0.023)  # the larger one
    assert home_out_of_scope_rate(sidecar({"out_of_scope_threshold": 17.3, "degenerate": True}), "blood_cells") is None
    assert home_out_of_scope_rate(sidecar({"temperature": 0.8}), "blood_cells") is None
    assert home_out_of_scope_rate(sidecar({"out_of_scope_threshold": 17.3}), "b_all") is None
    assert home_out_of_scope_rate({}, "blood_cells") is None


def test_the_message_quotes_the_measured_other_lab_accuracy_where_there_is_one():
    notice = ShiftNotice(7, 10, HOME, 1e-12)
    plain = shift_message(notice, {}, "blood_cells")
    assert plain.startswith("7 of these 10 images") and "1.0% of the training lab's" in plain and "BCCD" not in plain
    assert "check the panel chosen" in plain  # abnormal cells or the wrong panel are named too
    measured = {"metrics": {"bccd_wbc_other_lab": {"panel": "blood_cells", "accuracy_answered": 0.6849},
                            "pbc_val": {"panel": "blood_cells", "accuracy_answered": 0.9846}}}
    assert "68% of the answers were right, against 98% at home" in shift_message(notice, measured, "blood_cells")
    assert "BCCD" not in shift_message(notice, measured, "b_all")  # white-cell numbers say nothing of B-ALL


def test_site_shift_report_refuses_bad_options_before_the_run(tiny_model_path, tmp_path, capsys):
    from training import site_shift_report
    from tests.conftest import write_class_tree

    home = write_class_tree(tmp_path / "home", {"neutrophil": 2})
    base = ["--checkpoint", str(tiny_model_path), "--home", str(home)]
    assert site_shift_report.main(base + ["--panel", "nope"]) == 2
    assert "Unknown panel 'nope'" in capsys.readouterr().err
    assert site_shift_report.main(base + ["--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        site_shift_report.parse_args(base + ["--draws", "0"])
