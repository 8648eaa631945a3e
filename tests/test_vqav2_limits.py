"""benchmarks/vqav2_limits.py: VQAv2 alone by lr and objects per scene, scored per question form."""
from __future__ import annotations

import csv

import pytest

from mage.data import vocab
from mage.data.readers import load_test_records
from tests.benchmark_modules import BENCHMARKS, load_benchmark


@pytest.fixture(scope="module")
def limits():
    return load_benchmark("vqav2_limits")


def test_every_vqa_question_has_one_form(limits):
    for kind, template in vocab.VQA_QUESTIONS.items():
        question = template.format(shape="circle", color="red", article="a")
        assert limits.question_kind(question) == kind


def test_per_form_scores_add_up_to_the_trainers_score(limits, tmp_path):
    """Two training steps end to end: the forms, weighted by their test counts, give the evaluation's score."""
    limits.main(["--objects", "2", "--lrs", "1e-3", "--seeds", "1", "--jobs", "1", "--runs-dir", str(tmp_path),
                 "--name", "test_vqav2_limits_tmp", "--set", "train.steps_per_task=2"])
    out = BENCHMARKS / "results" / "test_vqav2_limits_tmp"
    try:
        rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
        md = out.with_suffix(".md").read_text()
    finally:
        for suffix in (".csv", ".md"):
            out.with_suffix(suffix).unlink(missing_ok=True)
    assert [(r["objects"], r["lr"], r["seed"]) for r in rows] == [("2", "1e-3", "1")]
    records = load_test_records("vqav2", tmp_path / "data-objects2")
    counts = {f: sum(limits.question_kind(r.turns[0][0]) == f for r in records) for f in limits.FORMS}
    weighted = sum(float(rows[0][f"form_{f}"]) * n for f, n in counts.items() if n) / len(records)
    assert weighted == pytest.approx(float(rows[0]["trained"]), abs=1e-6)
    assert "| 2 | 1e-3 | 1 |" in md
