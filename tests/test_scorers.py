import math

import pytest
import torch

from mage.eval.metrics import continual_metrics
from mage.eval.scorers import (box_correct, box_iou, error_labels, exact_match, feature_cosine_score,
                               image_error_labels, normalize_answer, parse_box, score_text, substring_compat)


def test_normalisation():
    assert normalize_answer("  The Red, circle!  ") == "red circle"
    assert normalize_answer("an apple") == "apple"
    assert normalize_answer("theater") == "theater"  # articles only as whole words
    assert exact_match("A red circle.", "red circle")
    assert not exact_match("red", "blue")


def test_empty_prediction_default_vs_compat():
    assert not exact_match("", "red") and not exact_match("  the ", "the")
    assert substring_compat("", "red")  # the public code's behaviour


def test_compat_scorer_differences():
    assert substring_compat("it is red", "red") and not exact_match("it is red", "red")
    assert substring_compat("RED", " red ")
    assert substring_compat("re", "red") and not exact_match("re", "red")
    assert not substring_compat("red red red", "red")  # a word repeated more than twice
    assert not substring_compat("blue", "red")
    assert exact_match("the red", "red") and not substring_compat("the red", "a red")


def test_box_parsing():
    assert parse_box("[0.27,0.42,0.83,0.73]") == (0.27, 0.42, 0.83, 0.73)
    assert parse_box(" ( 0.1, .2 ,0.3,1 ) ") == (0.1, 0.2, 0.3, 1.0)
    for bad in ("", "[0.1,0.2,0.3]", "0.1,0.2,0.3,0.4", "[a,b,c,d]", "[0.1,0.2,0.3,0.4] red"):
        assert parse_box(bad) is None, bad


def test_iou_edge_at_half():
    assert box_iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == 0.5
    assert box_correct("[0,0,0.5,1]", "[0,0,1,1]")
    assert not box_correct("[0,0,0.49,1]", "[0,0,1,1]")
    assert box_iou((0, 0, 0.2, 0.2), (0.5, 0.5, 1, 1)) == 0.0
    assert box_iou((0.5, 0.5, 0.4, 0.4), (0.5, 0.5, 0.4, 0.4)) == 0.0  # inverted box is empty
    assert not box_correct("no box", "[0,0,1,1]")
    with pytest.raises(ValueError, match="reference box"):
        box_correct("[0,0,1,1]", "oops")


def test_score_text_uses_task_scorer():
    acc, per = score_text("refcoco", ["[0,0,0.5,1]", "x"], ["[0,0,1,1]", "[0,0,1,1]"])
    assert acc == 50.0 and per == [True, False]
    acc, _ = score_text("vqav2", ["", "red"], ["red", "red"])
    assert acc == 50.0
    acc, _ = score_text("vqav2", ["", "red"], ["red", "red"], scorer="substring_compat")
    assert acc == 100.0
    with pytest.raises(ValueError, match="does not score text"):
        score_text("vqav2", ["a"], ["a"], scorer="image_cosine")


def test_feature_cosine_score():
    torch.manual_seed(0)
    a = torch.randn(3, 4, 8)
    s = feature_cosine_score(a, a.clone())
    assert torch.allclose(s, torch.full((3,), 100.0), atol=1e-4)
    assert torch.allclose(feature_cosine_score(a, -a), torch.full((3,), -100.0), atol=1e-4)
    b = torch.randn(3, 4, 8)
    ref = torch.stack([100 * torch.dot(x.flatten(), y.flatten()) / (x.norm() * y.norm()) for x, y in zip(a, b)])
    assert torch.allclose(feature_cosine_score(a, b), ref, atol=1e-4)
    with pytest.raises(ValueError, match="must be equal"):
        feature_cosine_score(a, b[:2])


def test_error_labels_rules():
    refs = ["red", "blue", "circle", "2", "yes"]
    preds = ["red", "circle", "[0.1,0.2,0.3,0.4]", "", "zebra"]
    assert error_labels("vqav2", preds, refs) == ["correct", "HAL", "IUF", "IUF", "IUF"]
    boxes = ["[0,0,1,1]"] * 4 + ["bad ref"]
    assert error_labels("refcoco", ["[0,0,0.9,1]", "[0.8,0.8,0.9,0.9]", "red", "[0.5,0,0.2,1]", "[0,0,1,1]"],
                        boxes) == ["correct", "HAL", "IUF", "IUF", "OTH"]
    # OCR answers are open text: any short answer is well-formed
    assert error_labels("ocrvqa", ["47", "<img_00001>", "one two three four five six seven eight nine"],
                        ["42", "42", "42"]) == ["HAL", "IUF", "IUF"]
    assert error_labels("vqav2", ["it is red"], ["red"], correct=[True]) == ["correct"]
    assert image_error_labels([None, 80.0, 10.0, math.nan], threshold=50.0) == ["IUF", "correct", "HAL", "OTH"]
    with pytest.raises(ValueError, match="image"):
        error_labels("hqedit", ["x"], ["y"])


def test_labels_feed_continual_metrics():
    refs = ["red", "circle"]
    own = error_labels("vqav2", ["red", "circle"], refs)
    final = error_labels("vqav2", ["circle", "circle"], refs)
    assert final == ["HAL", "correct"]
    out = continual_metrics([[100.0], [50.0, 80.0]],
                            error_labels={(0, 0): own, (1, 0): final, (1, 1): ["correct"]})
    assert out["avg_hal"] == 50.0 and out["avg_iuf"] == 0.0


def test_feature_cosine_score_centred():
    common = torch.randn(4, 8) * 10  # a large shared component, as a frozen random encoder gives
    target = common + torch.randn(5, 4, 8)
    mean_prediction = target.mean(0, keepdim=True).expand_as(target)
    assert feature_cosine_score(mean_prediction, target).min() > 90  # uncentred: everything looks alike
    centred = feature_cosine_score(mean_prediction, target, center=target.mean(0))
    assert centred.abs().max() < 1e-3  # the average image earns nothing
    torch.testing.assert_close(feature_cosine_score(target, target, center=target.mean(0)), torch.full((5,), 100.0))
    with pytest.raises(ValueError, match="center"):
        feature_cosine_score(target, target, center=torch.zeros(3))
