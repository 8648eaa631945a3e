"""The real-release switches that the mini preset leaves off: polite reply, free-running prompts, per-task
grids, the official compat scorers, and free generation scored by the feature-cosine stand-in."""
import torch

from mage.data.collate import IGNORE, Example, collate
from mage.data.dataset import TaskDataset, polite_reply_for
from mage.data.images import ImageConfig
from mage.data.prompts import POLITE_REPLIES
from mage.data.readers import Record
from mage.data.tokenizer import IMAGE_TOKENS, build_tokenizer
from mage.eval.scorers import COMPAT_SCORERS, box_iou_compat, ocrvqa_compat, score_text

CFG = ImageConfig.tiny()


def test_polite_reply_is_supervised_before_img_and_absent_from_prompts():
    tok = build_tokenizer("tiny")
    target = torch.zeros(3, CFG.size, CFG.size)
    ex = Example(2, "f/1", [("Please generate the image. a red circle", "")], output_image=True, target=target,
                 reply="here is the image.")
    b = collate([ex], tok, CFG)
    supervised = tok.convert_ids_to_tokens(b["labels"][0][b["labels"][0] != IGNORE])
    assert supervised == ["here", "▁", "is", "▁", "the", "▁", "image", ".", "<img>", "</s>"]
    assert int(b["output_image_mask"].sum()) == 16
    plain = collate([Example(2, "f/1", ex.turns, output_image=True, target=target)], tok, CFG)
    assert tok.convert_ids_to_tokens(plain["labels"][0][plain["labels"][0] != IGNORE]) == ["<img>", "</s>"]
    forced = collate([ex], tok, CFG, mode="generate")
    free = collate([ex], tok, CFG, mode="generate", force_image=False)
    img = tok.convert_tokens_to_ids("<img>")
    assert forced["input_ids"][0, -1] == img and free["input_ids"][0, -1] != img
    assert tok.decode(free["input_ids"][0]).endswith("[/INST]\n")


def test_polite_reply_is_one_of_seed_x_s_and_fixed_per_example():
    replies = {polite_reply_for(f"flickr30k/{i}") for i in range(200)}
    assert replies <= set(POLITE_REPLIES) and len(replies) > 10
    assert polite_reply_for("x/1") == polite_reply_for("x/1")
    rec = Record("flickr30k", "flickr30k/3", [("Please generate the image. a cat", "")], target_image=None)
    assert TaskDataset([rec], CFG, polite_reply=True)[0].reply == polite_reply_for("flickr30k/3")
    assert TaskDataset([rec], CFG)[0].reply == ""


def test_per_task_grids():
    real = ImageConfig.real()
    assert real.for_task("flickr30k").grids == ("1x1",) and real.for_task("hqedit").grids == ("1x1",)
    assert real.for_task("vqav2").grids == real.grids and len(real.grids) == 8
    assert ImageConfig.tiny().for_task("hqedit") == ImageConfig.tiny()  # global view only: nothing to choose


def test_official_compat_scorers():
    assert COMPAT_SCORERS == {"vqav2": "substring_compat", "imagenet": "substring_compat",
                              "ocrvqa": "ocrvqa_compat", "refcoco": "box_iou_compat"}
    assert ocrvqa_compat("Dogs and cats", "dogs") and not ocrvqa_compat("Unanswerable", "Unanswerable")
    assert ocrvqa_compat("", "anything")  # the public code's empty-prediction quirk, kept in compat
    # the public RefCOCO parser drops the first and last character after removing brackets
    assert box_iou_compat("[0.25,0.31,0.50,0.56]", "[0.25,0.31,0.50,0.56]")
    assert not box_iou_compat("[0.9,0.9,1.0,1.0]", "[0.25,0.31,0.50,0.56]")
    assert not box_iou_compat("no box", "[0.25,0.31,0.50,0.56]")
    score, _ = score_text("refcoco", ["[0.25,0.31,0.50,0.56]", "x"], ["[0.25,0.31,0.50,0.56]"] * 2,
                          scorer="box_iou_compat")
    assert score == 50.0


def test_free_generation_scored_by_the_stand_in(tmp_path):
    """A random model never emits <img>: under free generation every image example scores 0."""
    from mage.data import mini
    from mage.model import build_model
    from mage.trainer.config import EvalConfig
    from mage.trainer.distributed import DistInfo
    from mage.trainer.evaluate import evaluate_tasks
    from mage.data.tasks import get_task

    root = mini.generate(tmp_path / "mini", seed=0, train_per_task=2, test_per_task=3, tasks=["flickr30k", "hqedit"])
    torch.manual_seed(0)
    model = build_model("tiny")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    tasks = [get_task("flickr30k"), get_task("hqedit")]
    forced, forced_labels = evaluate_tasks(model, tasks, root, EvalConfig(batch_size=2, max_new_tokens=4), info, False)
    free, free_labels = evaluate_tasks(model, tasks, root, EvalConfig(batch_size=2, max_new_tokens=4,
                                                                      image_generation="free"), info, False)
    assert free == [0.0, 0.0] and all(s != 0.0 for s in forced)
    # forced: every example has an image, labelled by its score; free: no image at all is unfollowing
    assert set(forced_labels) == {0, 1} and all(set(v) <= {"correct", "HAL"} for v in forced_labels.values())
    assert free_labels == {0: ["IUF"] * 3, 1: ["IUF"] * 3}


def test_pretrained_tasks_must_lead_the_sequence_and_need_init_from():
    import pytest

    from mage.trainer.config import ConfigError, load_config
    from mage.trainer.data import check_pretrained_tasks, resolve_tasks

    cfg = load_config("mini", {"data.pretrained_tasks": "vqav2", "model.init_from": "vqav2.bin"})
    check_pretrained_tasks(cfg, resolve_tasks(cfg.data))
    with pytest.raises(ConfigError, match="set model.init_from"):
        check_pretrained_tasks(load_config("mini", {"data.pretrained_tasks": "vqav2"}), resolve_tasks(cfg.data))
    wrong = load_config("mini", {"data.pretrained_tasks": "imagenet", "model.init_from": "x.bin"})
    with pytest.raises(ConfigError, match="must be the first task"):
        check_pretrained_tasks(wrong, resolve_tasks(wrong.data))
    with pytest.raises(ConfigError, match="unknown task"):
        check_pretrained_tasks(load_config("mini", {"data.pretrained_tasks": "coco", "model.init_from": "x"}),
                               resolve_tasks(cfg.data))
