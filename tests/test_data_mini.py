import json
from pathlib import Path

import pytest

from mage.data import mini, vocab
from mage.data.readers import load_test_records, load_train_records, preflight
from mage.data.tasks import TASK_NAMES, TASKS
from mage.data.tokenizer import build_tokenizer
from mage.eval.scorers import parse_box


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return mini.generate(tmp_path_factory.mktemp("mini"), seed=3, train_per_task=8, test_per_task=4)


def test_same_seed_gives_identical_bytes(root, tmp_path):
    again = mini.generate(tmp_path / "again", seed=3, train_per_task=8, test_per_task=4)
    a, b = _files(root), _files(again)
    assert a.keys() == b.keys() and len(a) > 6 * 12
    assert all(a[k] == b[k] for k in a)


def test_different_seed_differs(root, tmp_path):
    other = _files(mini.generate(tmp_path / "other", seed=4, train_per_task=8, test_per_task=4))
    a = _files(root)
    assert a.keys() == other.keys()
    for task in TASKS:
        key = f"{task.dir_name}/annotations/train.jsonl"
        assert a[key] != other[key], task.name
    assert sum(a[k] != other[k] for k in a if k.endswith(".png")) > len(a) // 2


def test_layout_and_counts_match_the_release(root):
    counts = preflight(TASK_NAMES, root)
    assert counts == {t: {"train": 8, "test": 4} for t in TASK_NAMES}
    for spec in TASKS:
        d = root / spec.dir_name
        assert (d / "annotations" / "train.jsonl").is_file() and (d / "questions" / "test.json").is_file()
        test = json.loads((d / "questions" / "test.json").read_text())
        keys = {"hqedit": {"question_id", "source_image", "target_image", "instruction"},
                "flickr30k": {"question_id", "text", "image"},
                "refcoco": {"question_id", "image", "text", "answer", "size", "answer_bbox"}}
        assert set(test[0]) == keys.get(spec.name, {"question_id", "image", "text", "answer"}), spec.name
        first = json.loads((d / "annotations" / "train.jsonl").read_text().splitlines()[0])
        expect = {"source_image", "target_image", "instruction"} if spec.name == "hqedit" else {"image", "data"}
        assert set(first) == expect
    assert (root / "SEED-Data-VQAv2" / "COCO2014" / "train2014").is_dir()
    assert (root / "SEED-Data-HQEdit" / "images" / "source_images").is_dir()


def test_records_read_back_and_tokenize_exactly(root):
    tok = build_tokenizer("tiny")
    for task in TASK_NAMES:
        for rec in load_train_records(task, root) + load_test_records(task, root):
            for instruction, answer in rec.turns:
                for text in (instruction, answer):
                    ids = tok(text, add_special_tokens=False).input_ids
                    assert tok.unk_token_id not in ids, (task, text)
                    assert tok.decode(ids) == text
    vqa = load_train_records("vqav2", root)
    assert all(len(r.turns) == 2 for r in vqa)  # multi-turn
    boxes = [r.answer for r in load_test_records("refcoco", root)]
    for b in boxes:
        x1, y1, x2, y2 = parse_box(b)
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 and b == mini.format_box((x1, y1, x2, y2))


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=">= 1"):
        mini.generate(tmp_path, train_per_task=0)
    with pytest.raises(KeyError, match="valid tasks"):
        mini.generate(tmp_path, tasks=["coco"])


def test_cli(tmp_path, capsys):
    mini.main(["--out", str(tmp_path), "--seed", "1", "--train-per-task", "2", "--test-per-task", "1",
               "--tasks", "ocrvqa"])
    assert "wrote Continual-NExT-mini" in capsys.readouterr().out
    assert len(load_train_records("ocrvqa", tmp_path)) == 2


def test_vqa_max_objects_bounds_the_scenes(tmp_path):
    """The VQAv2 study option: "How many" answers stay within 1..max, and the default reaches 3."""
    def counts(max_objects):
        out = tmp_path / str(max_objects)
        mini.generate(out, train_per_task=60, test_per_task=60, tasks=["vqav2"], vqa_max_objects=max_objects)
        return {answer for r in load_train_records("vqav2", out) for question, answer in r.turns
                if question == vocab.VQA_QUESTIONS["count"]}
    assert counts(1) == {"1"}
    assert counts(2) == {"1", "2"}
    assert counts(3) == {"1", "2", "3"}
    with pytest.raises(ValueError, match="1 to 3 objects"):
        mini.generate(tmp_path, tasks=["vqav2"], vqa_max_objects=4)
