"""Real-release rehearsal: the Continual-NExT release's exact layout and keys (tests/real_fixtures.py), read
as the official loader reads it, and the seed-x-13b preset's code path end to end with tiny configs of the
real classes (LLaMA, SentencePiece tokenizer, UNet2DConditionModel, AutoencoderKL, SEED-X's adapter, CLIP)."""
import json
import shutil

import pytest
import torch

from mage.data.readers import DataError, ReaderOptions, load_test_records, load_train_records, main, preflight
from tests.real_fixtures import RELEASE_COUNTS, write_release

TASKS = list(RELEASE_COUNTS)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("Continual-NExT"))


def test_readers_take_the_release_as_it_is(release):
    counts = preflight(TASKS, release, options=ReaderOptions(edit_filter=True), details=True)
    for task, (train, skipped, test) in RELEASE_COUNTS.items():
        assert counts[task]["train"] == train and counts[task]["skipped"] == skipped and counts[task]["test"] == test
    assert counts["hqedit"]["filtered"] == 2  # 200 px and 2:1 sources dropped, as the official loader
    assert preflight(["hqedit"], release)["hqedit"]["train"] == 3  # mini default: no filter
    # a leading '/' is stripped; nested annotation folders are read
    vqa = load_train_records("vqav2", release)
    assert {r.image.name for r in vqa} == {"COCO_train2014_1.jpg", "COCO_train2014_2.jpg", "COCO_train2014_3.jpg"}
    ref = load_test_records("refcoco", release)[0]  # no "answer": the reference is answer_bbox
    assert ref.answer == "[0.25,0.31,0.50,0.56]" and ref.meta["size"] == [64, 48] and ref.meta["question_id"] == 7
    flickr = load_test_records("flickr30k", release, ReaderOptions(generation_prompt="Generate an image: {caption}"))
    assert flickr[0].turns[0][0] == "Generate an image: A brown dog runs on the beach."
    assert flickr[0].answer == "A brown dog runs on the beach." and flickr[0].target_image is None
    edit = load_test_records("hqedit", release)
    assert [r.example_id for r in edit] == ["hqedit/0", "hqedit/1"] and edit[0].image.name == "keep.png"


def test_text_that_already_holds_the_prompt_is_not_prefixed_again(release, tmp_path):
    root = shutil.copytree(release, tmp_path / "r")
    test = root / "SEED-Data-Fliackr30k" / "questions" / "test.json"
    test.write_text(json.dumps([{"text": "Please generate the image. A red kite."}]))
    rec = load_test_records("flickr30k", root)[0]
    assert rec.turns[0][0] == "Please generate the image. A red kite."


def test_cli_names_every_problem_with_file_line_and_what_was_expected(release, tmp_path, capsys):
    root = shutil.copytree(release, tmp_path / "r")
    nested = root / "SEED-Data-VQAv2" / "annotations" / "part2" / "more" / "train.jsonl"
    nested.write_text(nested.read_text() + '{"image": "x.jpg", "data": ["q"\n'
                      + json.dumps({"image": "../../../../etc/passwd", "data": ["q", "a"]}) + "\n"
                      + json.dumps({"img": "x.jpg", "data": ["q", "a"]}) + "\n")
    test = root / "SEED-Data-Grounding" / "questions" / "test.json"
    records = json.loads(test.read_text())
    del records[1]["answer_bbox"]
    test.write_text(json.dumps(records, indent=1))
    (root / "SEED-Data-OCRVQA" / "OCR-VQA" / "images" / "123.jpg").unlink()
    with pytest.raises(SystemExit) as err:
        main(["--root", str(root)])
    msg = str(err.value)
    assert f"{nested}:3: not valid JSON" in msg
    assert f"{nested}:4: 'image' '../../../../etc/passwd' leaves the image folder" in msg
    assert f"{nested}:5: missing key(s) ['image']" not in msg  # no image key = no image: skipped officially
    assert f"{test}:" in msg and "missing key(s) ['answer_bbox']" in msg
    ocr = root / "SEED-Data-OCRVQA"
    assert f"{ocr / 'annotations' / 'train.jsonl'}:2: image {ocr / 'OCR-VQA' / 'images' / '123.jpg'} does not exist" in msg
    assert f"{ocr / 'questions' / 'test.json'}:" in msg and "4 missing image file(s)" in msg
    line = int(msg.split(f"{test}:")[1].split(":")[0])
    assert test.read_text().splitlines()[line - 1].strip() == "{"  # the line where that record starts
    with pytest.raises(DataError, match="leaves the image folder"):
        load_train_records("vqav2", root)


@pytest.fixture(scope="module")
def real_pieces(tmp_path_factory):
    pytest.importorskip("diffusers", reason="the decoder extra (installed by .[test])")
    pytest.importorskip("sentencepiece", reason="the slow tokenizer (installed by .[test])")
    from tests.real_fixtures import write_tiny_clip, write_tiny_decoder, write_tiny_seed_x, write_tokenizer
    base = tmp_path_factory.mktemp("pretrained")
    paths = write_tiny_seed_x(base / "seed_x", write_tokenizer(base / "tokenizer"))
    from mage.model.config import get_config
    out = get_config("tiny").output_resampler  # the decoder reads the output resampler's features
    paths["decoder_path"] = write_tiny_decoder(base / "decoder", embedding_dim=out.embed_dim, num_queries=out.num_queries)
    paths["clip_path"] = write_tiny_clip(base / "clip")
    return paths


def _official_init(paths, out):
    """The paper's common start (the official VQAv2 agent, PEFT layout) for the tiny graph."""
    from mage.data.tokenizer import load_tokenizer
    from mage.lora import wrap_llama_lora
    from mage.model import build_model
    from tests.test_model_convert import _official_state
    model = build_model("tiny", tokenizer=load_tokenizer(paths["tokenizer_path"]))
    wrap_llama_lora(model.llm, rank=8, num_groups=4, alpha=32.0, dropout=0.0)
    state = {k: v * 0.02 for k, v in _official_state(model).items()}
    torch.save(state, out)
    return out


def test_seed_x_preset_runs_all_six_tasks_end_to_end(release, real_pieces, tmp_path, monkeypatch):
    from mage.eval.clip_score import ClipScorer
    from mage.model.detokenizer import ImageDecoder
    from mage.model.generation import ImageTokenProcessor
    from mage.trainer.config import load_config
    from mage.trainer.distributed import DistInfo
    from mage.trainer.loop import run_sequence

    # A model that answers every prompt with an image, so decoding and CLIP scoring surely run.
    plain = ImageTokenProcessor.__call__

    def eager_to_draw(self, input_ids, scores):
        scores = scores.clone()
        scores[:, int(self.chain[0])] += 1e3
        return plain(self, input_ids, scores)

    monkeypatch.setattr(ImageTokenProcessor, "__call__", eager_to_draw)
    calls = {"decode": 0, "clip": 0}
    decode, clip = ImageDecoder.decode, ClipScorer._pairs
    monkeypatch.setattr(ImageDecoder, "decode", lambda self, *a, **k: (calls.__setitem__("decode", calls["decode"] + 1),
                                                                        decode(self, *a, **k))[1])
    monkeypatch.setattr(ClipScorer, "_pairs", lambda self, *a, **k: (calls.__setitem__("clip", calls["clip"] + 1),
                                                                      clip(self, *a, **k))[1])
    small = {"train.steps_per_task": 2, "train.batch_size": 2, "optim.warmup_steps": 0}
    overrides = {f"model.{k}": str(v) for k, v in real_pieces.items() if k != "clip_path"}
    overrides.update({
        "model.name": "tiny", "model.gradient_checkpointing": "false",
        "model.init_from": str(_official_init(real_pieces, tmp_path / "vqav2_agent.bin")),
        "data.pretrained_tasks": "vqav2",  # the paper's common start: VQAv2 comes trained in init_from
        "data.root": str(release), "train.steps_per_task": "2", "train.batch_size": "2", "train.grad_accum": "1",
        "train.engine": "ddp", "train.bf16": "false", "train.device": "cpu", "optim.warmup_steps": "0",
        "eval.clip_path": str(real_pieces["clip_path"]), "eval.batch_size": "2", "eval.max_new_tokens": "3",
        "eval.decode_steps": "2", "eval.decode_size": "32", "run.out_dir": str(tmp_path / "run"),
        "run.checkpoint_every": "0", "run.progress": "false", "run.tensorboard": "false",
        "task_overrides": json.dumps({"hqedit": small}),
    })
    cfg = load_config("seed-x-13b", overrides)
    assert cfg.eval.image_generation == "free" and cfg.eval.image_scorer == "clip" and cfg.data.polite_reply
    result = run_sequence(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert result["tasks"] == TASKS and len(result["matrix"]) == 6 and len(result["zero_shot"]) == 6
    assert all(torch.isfinite(torch.tensor(row)).all() for row in result["matrix"])
    assert result["matrix"][0] == result["zero_shot"]  # VQAv2 was not retrained: same weights, same row
    flickr, hqedit = TASKS.index("flickr30k"), TASKS.index("hqedit")
    assert all(row[flickr] != 0 and row[hqedit] != 0 for row in result["matrix"])  # CLIP scores of decoded images
    assert calls["decode"] == 7 * 4 and calls["clip"] == 7 * 2  # 7 rows x (2 + 2 images), one CLIP call per task
    assert "Avg.ACC" in (tmp_path / "run" / "metrics.md").read_text()
    report = json.loads((tmp_path / "run" / "accuracy_matrix.json").read_text())
    assert report["scorers"]["flickr30k"].startswith("CLIP score") and report["scorers"]["refcoco"] == "box_iou"
