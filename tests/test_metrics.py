"""continual_metrics on the worked example of docs/METHOD.md section 6 and on hand cases."""
import pytest

from mage.eval.metrics import continual_metrics

PAPER_LORA = [
    [59.68],
    [20.10, 65.19],
    [18.94, 78.80, 31.18],
    [50.26, 71.32, 31.26, 41.22],
    [36.75, 66.43, 30.94, 29.28, 66.60],
    [18.40, 61.01, 30.60, 19.38, 32.70, 91.27],
]


def test_worked_example_of_the_paper():
    m = continual_metrics(PAPER_LORA)
    assert round(m["avg_acc"], 2) == 42.23
    assert round(m["forgetting"], 2) == 20.36
    assert round(m["new_acc"], 2) == 59.19
    assert m["bwt"] == pytest.approx(-m["forgetting"])
    # The max form differs on this matrix (task 2 peaked at 78.80 after task 3), so the two are told apart.
    expected_max = ((59.68 - 18.40) + (78.80 - 61.01) + (31.26 - 30.60) + (41.22 - 19.38) + (66.60 - 32.70)) / 5
    assert m["forgetting_max"] == pytest.approx(expected_max)
    assert round(m["forgetting_max"], 2) != 20.36
    assert m["fwt"] is None


def test_full_matrix_and_fwt():
    full = [[50, 10, 20], [40, 60, 25], [30, 55, 70]]
    m = continual_metrics(full, zero_shot_row=[5, 8, 15])
    assert m["fwt"] == pytest.approx(((10 - 8) + (25 - 15)) / 2)
    assert m["avg_acc"] == pytest.approx(155 / 3)
    assert m["forgetting"] == pytest.approx(((50 - 30) + (60 - 55)) / 2)
    with pytest.raises(ValueError, match="full"):
        continual_metrics([[1], [2, 3]], zero_shot_row=[0, 0])


def test_single_task_has_no_forgetting():
    m = continual_metrics([[42.0]])
    assert m["avg_acc"] == 42.0 and m["forgetting"] is None and m["bwt"] is None


def test_error_type_forgetting():
    labels = {
        (0, 0): ["correct", "HAL", "IUF", "correct"],
        (1, 1): ["correct", "correct"],
        (2, 0): ["HAL", "HAL", "IUF", "OTH"],  # new HAL on ex 0 (ex 1 was HAL already), IUF not new, OTH new
        (2, 1): ["IUF", "correct"],
        (2, 2): ["correct"],
    }
    m = continual_metrics([[1], [1, 1], [1, 1, 1]], error_labels=labels)
    assert m["avg_hal"] == pytest.approx((25.0 + 0.0) / 2)
    assert m["avg_iuf"] == pytest.approx((0.0 + 50.0) / 2)
    assert m["avg_oth"] == pytest.approx((25.0 + 0.0) / 2)


@pytest.mark.parametrize("bad, msg", [
    ([], "empty"),
    ([[1, 2], [3]], "lengths"),
    ([[1], [2, 3, 4]], "lengths"),
    ([[1], [float("nan"), 3]], "finite"),
    ([[1], ["x", 3]], "finite"),
])
def test_bad_matrices(bad, msg):
    with pytest.raises(ValueError, match=msg):
        continual_metrics(bad)


def test_bad_labels():
    with pytest.raises(ValueError, match="missing"):
        continual_metrics([[1], [1, 1]], error_labels={(1, 0): ["HAL"]})
    with pytest.raises(ValueError, match="unknown error label"):
        continual_metrics([[1], [1, 1]], error_labels={(1, 0): ["WRONG"], (0, 0): ["HAL"]})
    with pytest.raises(ValueError, match="same non-empty"):
        continual_metrics([[1], [1, 1]], error_labels={(1, 0): ["HAL"], (0, 0): ["HAL", "HAL"]})
    with pytest.raises(ValueError, match="zero-shot row has"):
        continual_metrics([[1, 2], [3, 4]], zero_shot_row=[1])
