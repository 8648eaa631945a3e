import pytest
import torch
from PIL import Image

from mage.data import mini
from mage.data.collate import IGNORE, Example, collate
from mage.data.dataset import ResumableSampler, build_dataloader
from mage.data.images import CLIP_MEAN, CLIP_STD, ImageConfig, best_grid, image_views
from mage.data.readers import load_test_records, load_train_records
from mage.data.tokenizer import IMAGE_TOKENS, build_tokenizer

Q = 16
CFG = ImageConfig.tiny()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("tiny")


def _views(v=1):
    return torch.randn(v, 3, CFG.size, CFG.size), torch.full((v, 2), 0.5)


def _ids(tok, *tokens):
    return tok.convert_tokens_to_ids(list(tokens))


def test_two_turn_vqa_example_exact(tok):
    views, pos = _views()
    ex = Example(0, "a", [("What color is the circle?", "red"), ("How many objects are in the image?", "2")],
                 views=views, positions=pos)
    b = collate([ex], tok, CFG)
    img = "<img>" + "".join(IMAGE_TOKENS[:Q]) + "</img>"
    expect = f"<s>[INST] {img}What color is the circle? [/INST]\nred\n[INST] How many objects are in the image? [/INST]\n2</s>"
    assert tok.decode(b["input_ids"][0]) == expect
    assert b["attention_mask"].sum() == b["input_ids"].shape[1]
    sup = b["labels"][0] != IGNORE
    assert tok.convert_ids_to_tokens(b["labels"][0][sup]) == ["red", "2", "</s>"]
    m = b["input_image_mask"][0]
    assert m.sum() == Q and not b["output_image_mask"].any()
    assert b["input_ids"][0][m].tolist() == _ids(tok, *IMAGE_TOKENS[:Q])
    first = int(m.nonzero()[0])
    assert b["input_ids"][0, first - 1] == tok.convert_tokens_to_ids("<img>")
    assert torch.equal(b["images"], views) and b["image_positions"].tolist() == [[0.5, 0.5]]
    assert b["target_images"].shape == (0, 3, CFG.size, CFG.size)
    assert b["task_ids"].tolist() == [0] and b["example_ids"] == ["a"]


def test_image_answer_supervises_only_img_and_eos(tok):
    views, pos = _views()
    target = torch.randn(3, CFG.size, CFG.size)
    ex = Example(5, "e", [("make the circle blue", "")], output_image=True, views=views, positions=pos, target=target)
    b = collate([ex], tok, CFG)
    ids, labels = b["input_ids"][0], b["labels"][0]
    sup = (labels != IGNORE).nonzero().flatten().tolist()
    assert tok.convert_ids_to_tokens(labels[sup]) == ["<img>", "</s>"]
    om = b["output_image_mask"][0]
    assert om.sum() == Q and b["input_image_mask"][0].sum() == Q
    assert ids[om].tolist() == _ids(tok, *IMAGE_TOKENS[:Q])
    out_pos = om.nonzero().flatten()
    assert (labels[out_pos] == IGNORE).all()
    assert ids[out_pos[-1] + 1] == tok.convert_tokens_to_ids("</img>") and labels[out_pos[-1] + 1] == IGNORE
    assert ids[out_pos[0] - 1] == tok.convert_tokens_to_ids("<img>") == labels[out_pos[0] - 1]
    assert (out_pos > b["input_image_mask"][0].nonzero().max()).all()
    assert torch.equal(b["target_images"], target[None])


def test_mixed_batch_right_padding_and_image_order(tok):
    v1, p1 = _views()
    t = torch.randn(3, CFG.size, CFG.size)
    exs = [Example(2, "gen", [("Please generate the image. a red circle in the center", "")], output_image=True, target=t),
           Example(0, "vqa", [("What color is the square?", "blue")], views=v1, positions=p1),
           Example(5, "edit", [("make the square red", "")], output_image=True, views=v1 + 1, positions=p1, target=t + 1)]
    b = collate(exs, tok, CFG)
    lengths = b["attention_mask"].sum(1)
    B, T = b["input_ids"].shape
    for i in range(B):
        n = int(lengths[i])
        assert b["attention_mask"][i, :n].all() and not b["attention_mask"][i, n:].any()  # right padding
        assert (b["input_ids"][i, n:] == tok.pad_token_id).all() and (b["labels"][i, n:] == IGNORE).all()
        assert b["input_ids"][i, n - 1] == tok.eos_token_id == b["labels"][i, n - 1]
    assert b["input_image_mask"].sum(1).tolist() == [0, Q, Q]
    assert b["output_image_mask"].sum(1).tolist() == [Q, 0, Q]
    assert torch.equal(b["images"], torch.cat([v1, v1 + 1]))
    assert torch.equal(b["target_images"], torch.stack([t, t + 1]))
    assert b["task_ids"].tolist() == [2, 0, 5]


def test_generate_mode_left_pads_prompt_only(tok):
    v, p = _views()
    exs = [Example(0, "q", [("What color is the square?", "blue")], views=v, positions=p),
           Example(2, "g", [("Please generate the image. a red circle in the center", "")], output_image=True,
                   target=torch.zeros(3, CFG.size, CFG.size))]
    b = collate(exs, tok, CFG, mode="generate")
    T = b["input_ids"].shape[1]
    for i in range(2):
        n = int(b["attention_mask"][i].sum())
        assert b["attention_mask"][i, T - n:].all() and not b["attention_mask"][i, :T - n].any()  # left padding
        assert b["input_ids"][i, T - n] == tok.bos_token_id
    assert (b["labels"] == IGNORE).all() and not b["output_image_mask"].any()
    assert tok.decode(b["input_ids"][0], skip_special_tokens=True).endswith("What color is the square? [/INST]\n")
    assert b["input_ids"][1, -1] == tok.convert_tokens_to_ids("<img>")
    assert b["input_image_mask"].sum() == Q and b["target_images"].shape[0] == 1


def test_any_resolution_views_and_tokens(tok):
    cfg = ImageConfig(size=28, num_query_tokens=4, any_resolution=True)
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    views, pos = image_views(wide, cfg)
    assert views.shape == (3, 3, 28, 28)  # 2x1 grid + global
    assert pos.tolist() == [[0.25, 0.5], [0.75, 0.5], [0.5, 0.5]]
    red = (torch.tensor([1.0, 0, 0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(views[:, :, 5, 5], red.expand(3, 3), atol=1e-6)
    b = collate([Example(0, "x", [("What is written in the image?", "12")], views=views, positions=pos)], tok, cfg)
    assert b["input_image_mask"].sum() == 3 * 4
    toks = tok.convert_ids_to_tokens(b["input_ids"][0])
    assert toks.count("<patch>") == 2 and toks.count("<img>") == 1
    assert toks.index("</patch>", toks.index("</patch>") + 1) < toks.index("<img>")  # tiles first, global last
    assert best_grid(896, 448, cfg.grids, 448) == (2, 1)
    assert best_grid(448, 448, cfg.grids, 448) == (1, 1)
    assert best_grid(448, 1792, cfg.grids, 448) == (1, 4)
    # small 1:4 image: the fit rule (1x3 wastes least) beats the aspect rule (1x4) by area
    assert best_grid(300, 1200, cfg.grids, 448) == (1, 3)
    assert best_grid(1000, 1000, cfg.grids, 448) == (2, 2)
    v, p = image_views(wide, CFG)  # tiny default: global only
    assert v.shape == (1, 3, 112, 112) and p.tolist() == [[0.5, 0.5]]


def test_instruction_with_image_tokens_is_refused(tok):
    v, p = _views()
    with pytest.raises(ValueError, match="must not contain image tokens"):
        collate([Example(0, "bad", [("<img_00003> hi", "x")], views=v, positions=p)], tok, CFG)
    with pytest.raises(ValueError, match="max_length"):
        collate([Example(0, "long", [("What color is the circle?", "red")], views=v, positions=p)], tok, CFG,
                max_length=10)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return mini.generate(tmp_path_factory.mktemp("mini"), seed=0, train_per_task=10, test_per_task=3,
                         tasks=["vqav2", "flickr30k", "hqedit"])


def test_dataloader_over_generated_data(tok, root):
    for task in ("vqav2", "flickr30k", "hqedit"):
        loader = build_dataloader(load_train_records(task, root), tok, CFG, batch_size=4, seed=0)
        batches = list(loader)
        assert len(batches) == len(loader) == 3
        for b in batches:
            n_in = b["images"].shape[0]
            assert b["input_image_mask"].sum() == n_in * Q
            assert b["output_image_mask"].sum() == b["target_images"].shape[0] * Q
    test = build_dataloader(load_test_records("hqedit", root), tok, CFG, batch_size=2, mode="generate")
    assert [e for b in test for e in b["example_ids"]] == ["hqedit/0", "hqedit/1", "hqedit/2"]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly(tok, root, workers):
    recs = load_train_records("vqav2", root)
    ref = build_dataloader(recs, tok, CFG, batch_size=3, seed=7)
    order = [b["example_ids"] for b in ref] + [b["example_ids"] for b in ref]  # two epochs
    assert order[:4] != order[4:]  # a new permutation each epoch
    # with workers, batches are prefetched ahead of the consumer: the state must count consumed ones
    loader = build_dataloader(recs, tok, CFG, batch_size=3, seed=7, num_workers=workers)
    it = iter(loader)
    seen = [next(it)["example_ids"] for _ in range(2)]
    state = loader.state_dict()
    resumed = build_dataloader(recs, tok, CFG, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    rest = [b["example_ids"] for b in resumed] + [b["example_ids"] for b in resumed]
    assert seen + rest == order
    with pytest.raises(ValueError, match="seed"):
        build_dataloader(recs, tok, CFG, batch_size=3, seed=8).load_state_dict(state)


def test_sampler_shards_like_distributed_sampler():
    n = 10
    ranks = [ResumableSampler(n, seed=1, rank=r, world_size=3) for r in range(3)]
    parts = [list(s) for s in ranks]
    assert all(len(p) == 4 for p in parts)
    assert set(sum(parts, [])) == set(range(n))
    full = ResumableSampler(n, seed=1).epoch_indices()
    padded = full + full[:2]
    assert parts[1] == padded[1::3]
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != parts[0]
