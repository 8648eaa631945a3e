"""benchmarks/forgetting_by_part.py (and answers_by_question.py's run loading) on a two-task tiny run."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mage.trainer.main import main as train_main
from tests.benchmark_modules import load_benchmark
from tests.mini_fixtures import write_mini

by_part = load_benchmark("forgetting_by_part")


@pytest.fixture(scope="module")
def two_task_run(tmp_path_factory) -> Path:
    data = write_mini(tmp_path_factory, ["vqav2", "ocrvqa"], 12, 6)
    out = tmp_path_factory.mktemp("runs") / "lora"
    train_main(["--data.root", str(data), "--data.tasks", "vqav2,ocrvqa", "--run.out_dir", str(out),
                "--method.name", "lora", "--train.steps_per_task", "3", "--train.batch_size", "4",
                "--optim.warmup_steps", "1", "--optim.lr", "1e-2", "--eval.max_new_tokens", "4",
                "--eval.zero_shot", "false", "--run.progress", "false",
                "--method.train_input_resampler", "true"])  # the preset freezes it; here every part trains
    return out


def test_every_model_tensor_of_a_run_falls_in_a_named_part(two_task_run):
    tensors = load_file(str(two_task_run / "checkpoints" / "task01_end.safetensors"))
    parts = {by_part.part_of(k) for k in tensors if k.startswith("model.")}
    assert "other" not in parts
    assert {"LoRA groups", "input resampler", "output resampler", "norms", "patch_pos_embed"} <= parts
    assert by_part.part_of("model.llm.model.layers.1.post_attention_layernorm.weight") == "norms"
    assert by_part.part_of("model.llm.model.norm.weight") == "norms"
    assert by_part.part_of("model.llm.model.layers.0.mlp.up_proj.lora_B_groups.3") == "LoRA groups"


def test_swapping_every_changed_part_gives_the_later_checkpoint(two_task_run):
    before = load_file(str(two_task_run / "checkpoints" / "task01_end.safetensors"))
    after = load_file(str(two_task_run / "checkpoints" / "task02_end.safetensors"))
    parts = by_part.changed_parts(before, after)
    assert "LoRA groups" in parts
    mixed = before
    for part in parts:
        one = by_part.with_part(before, after, part)
        changed = {by_part.part_of(k) for k in one if k.startswith("model.") and not one[k].equal(before[k])}
        assert changed == {part}
        mixed = by_part.with_part(mixed, after, part)
    assert all(mixed[k].equal(after[k]) for k in after if k.startswith("model."))


def test_the_table_has_before_after_and_a_row_per_changed_part(two_task_run, capsys):
    by_part.main([str(two_task_run), "task01_end", "task02_end", "vqav2", "ocrvqa"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| model | vqav2 | ocrvqa |"
    labels = [line.split(" | ")[0].removeprefix("| ") for line in lines[2:]]
    assert labels[:2] == ["task01_end", "task02_end"] and "task01_end + LoRA groups of task02_end" in labels
    # BEFORE's and AFTER's rows are the run's own evaluation of those checkpoints.
    matrix = json.loads((two_task_run / "accuracy_matrix.json").read_text())["matrix"]
    for row, label in ((0, "task01_end"), (1, "task02_end")):
        scores = [float(x) for x in lines[2 + labels.index(label)].strip("| ").split(" | ")[1:]]
        assert scores == pytest.approx([round(x, 1) for x in matrix[row]], abs=0.051)


def test_reading_a_run_leaves_the_process_thread_count_alone(two_task_run):
    before = torch.get_num_threads()
    by_part.main([str(two_task_run), "task01_end", "task02_end", "vqav2"])
    assert torch.get_num_threads() == before


def test_a_missing_checkpoint_lists_the_run_s_checkpoints(two_task_run):
    with pytest.raises(SystemExit, match="task01_end, task02_end"):
        by_part.main([str(two_task_run), "task01_end", "task09_end", "vqav2"])
