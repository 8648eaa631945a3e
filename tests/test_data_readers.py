import json

import pytest

from mage.data import mini
from mage.data.readers import DataError, load_test_records, load_train_records, preflight
from mage.data.tasks import GROUP_NAMES, TASK_NAMES, get_task, task_order


@pytest.fixture()
def root(tmp_path):
    return mini.generate(tmp_path / "data", seed=0, train_per_task=5, test_per_task=2, tasks=["vqav2", "hqedit"])


def _annotations(root, task):
    return root / get_task(task).dir_name / "annotations" / "train.jsonl"


def test_task_specs_and_groups():
    assert TASK_NAMES == ("vqav2", "imagenet", "flickr30k", "ocrvqa", "refcoco", "hqedit")
    groups = {t: get_task(t).lora_group_names for t in TASK_NAMES}
    assert groups["vqav2"] == groups["imagenet"] == groups["ocrvqa"] == groups["refcoco"] == \
        ("text_in", "image_in", "text_out")
    assert groups["flickr30k"] == ("text_in", "image_out")
    assert groups["hqedit"] == ("text_in", "image_in", "image_out")
    assert get_task("hqedit").lora_groups == (0, 1, 3)
    from mage.lora import GROUP_NAMES as LORA_GROUP_NAMES
    assert GROUP_NAMES == LORA_GROUP_NAMES == ("text_in", "image_in", "text_out", "image_out")
    assert get_task("refcoco").scorer == "box_iou" and get_task("VQAv2").name == "vqav2"


def test_task_orders():
    assert task_order("reverse") == tuple(reversed(TASK_NAMES))
    assert task_order("alphabetical") == ("flickr30k", "hqedit", "imagenet", "ocrvqa", "refcoco", "vqav2")
    assert task_order(["ocrvqa", "vqav2"]) == ("ocrvqa", "vqav2")
    with pytest.raises(KeyError, match="valid tasks: vqav2, imagenet"):
        get_task("coco")
    with pytest.raises(KeyError, match="valid orders"):
        task_order("random")
    with pytest.raises(ValueError, match="repeats"):
        task_order(["vqav2", "vqav2"])


def test_readers_normalise_records(root):
    train = load_train_records("vqav2", root)
    assert len(train) == 5 and all(r.image.is_file() and len(r.turns) == 2 for r in train)
    test = load_test_records("vqav2", root)
    assert test[0].example_id == "vqav2/0" and test[0].meta["question_id"] == 0
    assert test[0].answer == test[0].turns[0][1]
    edit = load_train_records("hqedit", root)[0]
    assert edit.image.is_file() and edit.target_image.is_file() and edit.turns[0][1] == ""


def test_preflight_reports_malformed_line_with_file_and_line(root):
    path = _annotations(root, "vqav2")
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]  # truncated JSON on line 3
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        preflight(["vqav2", "hqedit"], root)
    assert f"{path}:3: not valid JSON" in str(err.value)
    with pytest.raises(DataError, match=r"train\.jsonl:3"):
        load_train_records("vqav2", root)


def test_preflight_counts_missing_images(root):
    recs = load_train_records("hqedit", root)
    for r in recs[:3]:
        r.target_image.unlink()
    with pytest.raises(DataError) as err:
        preflight(["hqedit"], root)
    msg = str(err.value)
    assert "3 missing image file(s)" in msg and str(recs[0].target_image) in msg
    assert "hqedit" in msg


def test_preflight_reports_missing_keys(root):
    path = _annotations(root, "hqedit")
    lines = path.read_text().splitlines()
    rec = json.loads(lines[1])
    del rec["instruction"]
    lines[1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: missing key\(s\) \['instruction'\]"):
        preflight(["hqedit"], root)


def test_preflight_checks_test_sets_and_folders(root, tmp_path):
    test_json = root / "SEED-Data-VQAv2" / "questions" / "test.json"
    data = json.loads(test_json.read_text())
    del data[1]["answer"]
    test_json.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"test\.json:\d+: missing key\(s\) \['answer'\]"):
        preflight(["vqav2"], root)
    with pytest.raises(DataError, match="no training annotations"):
        preflight(["ocrvqa"], root)
    with pytest.raises(DataError, match="does not exist"):
        preflight(["vqav2"], tmp_path / "nowhere")


def test_bad_data_shape_is_reported(root):
    path = _annotations(root, "vqav2")
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({"image": "x.png", "data": ["only a question"]})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:1: 'data' must be a list"):
        load_train_records("vqav2", root)


def test_cli_check(root, capsys):
    from mage.data.readers import main
    main(["--root", str(root), "--tasks", "vqav2", "hqedit"])
    assert "vqav2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no training annotations"):
        main(["--root", str(root), "--tasks", "ocrvqa"])
