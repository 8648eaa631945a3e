"""benchmarks/skill_learning.py: its verify variants draw what they say, and a short run trains and scores."""
import random

from mage.data import vocab
from mage.data.mini import render_objects
from tests.benchmark_modules import load_benchmark

skill_learning = load_benchmark("skill_learning")


def _asked(prompt):
    words = prompt.rstrip("?").split()
    return next(w for w in words if w in vocab.COLORS), next(w for w in words if w in vocab.SHAPES)


def test_one_object_verify_says_yes_exactly_for_the_pair_in_the_scene(monkeypatch):
    scenes = []
    real = skill_learning.render_objects
    monkeypatch.setattr(skill_learning, "render_objects", lambda objs, size: scenes.append(objs) or real(objs, size))
    draw, rng = skill_learning.verify_drawer(one_object=True, text_rule=False), random.Random(0)
    answers = []
    for _ in range(200):
        prompt, answer, image, target = draw(rng, "verify", 112)
        (shape, color, *_), = scenes[-1]  # one object
        assert answer == ("yes" if _asked(prompt) == (color, shape) else "no")
        assert target is None and image.size == (112, 112)
        answers.append(answer)
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_text_rule_answers_from_the_question_alone():
    draw, rng = skill_learning.verify_drawer(one_object=False, text_rule=True), random.Random(1)
    answers = []
    for _ in range(200):
        prompt, answer, _, _ = draw(rng, "verify", 112)
        assert answer == ("yes" if _asked(prompt)[0] in skill_learning.YES_COLORS else "no")
        answers.append(answer)
    assert {"yes", "no"} == set(answers)


def test_mixture_verify_never_says_yes_to_an_absent_pair(monkeypatch):
    scenes = []
    real = skill_learning.render_objects
    monkeypatch.setattr(skill_learning, "render_objects", lambda objs, size: scenes.append(objs) or real(objs, size))
    draw, rng = skill_learning.verify_drawer(one_object=False, text_rule=False), random.Random(2)
    sizes = set()
    for _ in range(200):
        prompt, answer, _, _ = draw(rng, "verify", 112)
        present = {(o[1], o[0]) for o in scenes[-1]}
        sizes.add(len(scenes[-1]))
        assert (answer == "yes") == (_asked(prompt) in present)
    assert sizes == {1, 2, 3}


def test_a_short_run_trains_and_scores_every_eval_step():
    rows = skill_learning.main(["--skill", "verify", "--steps", "2", "--eval-every", "1", "--text-rule", "--no-csv"])
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(0 <= r["accuracy"] <= 100 for r in rows) and rows[-1]["variant"] == "text-rule"
    assert rows[-1]["train_loss"] > 0


def test_variants_are_refused_for_other_skills(capsys):
    import pytest
    with pytest.raises(SystemExit):
        skill_learning.main(["--skill", "name", "--one-object"])
    assert "variants of --skill verify" in capsys.readouterr().err


def test_fresh_llm_keeps_the_bases_vision_and_draws_a_new_llm_of_the_depth_asked():
    import torch
    from safetensors.torch import load_file
    from mage.model.pretrain import resolve_base

    torch.manual_seed(0)
    model = skill_learning.build_learner(fresh_llm=True, llm_layers=3)
    base = load_file(str(resolve_base(0, model.tokenizer)))
    own = model.state_dict()
    assert model.config.llm.num_layers == 3 and any(".layers.2." in k for k in own)
    for k in ("patch_pos_embed", "visual_encoder.proj", "input_resampler.query"):
        keys = [n for n in base if n.startswith(k)]
        assert keys and all(torch.equal(own[n], base[n]) for n in keys), k
    emb = "llm.model.embed_tokens.weight"
    assert own[emb].shape == base[emb].shape and not torch.allclose(own[emb], base[emb])


def test_llm_layers_needs_a_fresh_llm(capsys):
    import pytest
    with pytest.raises(SystemExit):
        skill_learning.main(["--llm-layers", "4"])
    assert "needs --fresh-llm" in capsys.readouterr().err


def test_told_writes_the_scene_in_words_before_the_question_on_its_share(monkeypatch):
    scenes = []
    real = skill_learning.render_objects
    monkeypatch.setattr(skill_learning, "render_objects", lambda objs, size: scenes.append(objs) or real(objs, size))
    from mage.data.pretrain_mix import describe_scene

    for told, rng in ((1.0, random.Random(3)), (0.5, random.Random(4))):
        draw, written = skill_learning.verify_drawer(one_object=False, text_rule=False, told=told), 0
        for _ in range(200):
            prompt, answer, _, _ = draw(rng, "verify", 112)
            description = describe_scene(scenes[-1], 112)
            written += prompt.startswith(description + ". ")
            question = prompt.removeprefix(description + ". ")
            assert (answer == "yes") == (_asked(question) in {(o[1], o[0]) for o in scenes[-1]})
        assert written == 200 if told == 1.0 else 70 < written < 130


def test_told_and_input_resampler_runs_name_their_variant(monkeypatch):
    """The input resampler is in the optimizer exactly when asked for; the row names what ran."""
    seen = []
    real = skill_learning.torch.optim.AdamW
    monkeypatch.setattr(skill_learning.torch.optim, "AdamW", lambda params, **kw: seen.append(list(params)) or real(params, **kw))
    for extra, variant in ((["--train-input-resampler"], "told-0.5+input-resampler-trained"), ([], "told-0.5")):
        rows = skill_learning.main(["--skill", "verify", "--steps", "1", "--eval-every", "1", "--told", "0.5", "--no-csv", *extra])
        assert rows[-1]["variant"] == variant
    resampler = len(list(skill_learning.build_model("tiny").input_resampler.parameters()))
    assert resampler > 0 and [len(params) for params in seen] == [len(seen[1]) + resampler, len(seen[1])]


def test_a_wider_fresh_llm_reads_the_bases_image_tokens_through_a_trained_projection(monkeypatch):
    import torch
    from mage.model.pretrain import resolve_base

    torch.manual_seed(0)
    model = skill_learning.build_learner(fresh_llm=True, llm_layers=None, llm_width=192)
    base = skill_learning.build_model("tiny")
    skill_learning.load_base_(base, resolve_base(0, base.tokenizer))
    assert model.config.llm.hidden_size == 192 and model.llm.get_input_embeddings().weight.shape[1] == 192
    inner = model.input_resampler.resampler
    assert all(torch.equal(a, b) for a, b in zip(inner.state_dict().values(), base.input_resampler.state_dict().values()))
    features = torch.randn(2, model.config.vision.num_queries, model.config.vision.output_dim)
    assert torch.allclose(model.input_resampler(features), model.input_resampler.proj(base.input_resampler(features)))
    assert model._dummy_input_images().item() == 0.0  # the image-free pass of a text-only batch runs too

    built, seen = [], []
    real_build, real_adamw = skill_learning.build_learner, skill_learning.torch.optim.AdamW
    monkeypatch.setattr(skill_learning, "build_learner", lambda *args: built.append(real_build(*args)) or built[-1])
    monkeypatch.setattr(skill_learning.torch.optim, "AdamW", lambda params, **kw: seen.append(list(params)) or real_adamw(params, **kw))
    rows = skill_learning.main(["--skill", "verify", "--steps", "1", "--eval-every", "1", "--fresh-llm", "--llm-width", "192", "--no-csv"])
    assert rows[-1]["llm"] == "fresh-2-layers-width-192"
    names = {id(q): n for n, q in built[0].named_parameters()}
    trained = {names[id(q)] for q in seen[0]}
    assert {"input_resampler.proj.weight", "input_resampler.proj.bias", "llm.model.embed_tokens.weight"} <= trained
    assert not any(n.startswith(("visual_encoder.", "input_resampler.resampler.")) for n in trained)


def test_llm_width_needs_a_fresh_llm_and_a_multiple_of_the_heads(capsys):
    import pytest
    for argv in (["--llm-width", "256"], ["--fresh-llm", "--llm-width", "130"]):
        with pytest.raises(SystemExit):
            skill_learning.main(argv)
        assert "--llm-width W" in capsys.readouterr().err


def test_colour_only_asks_for_a_shape_of_the_scene_and_says_no_only_to_an_absent_colour(monkeypatch):
    scenes = []
    real = skill_learning.render_objects
    monkeypatch.setattr(skill_learning, "render_objects", lambda objs, size: scenes.append(objs) or real(objs, size))
    for one_object, rng in ((True, random.Random(5)), (False, random.Random(6))):
        draw, answers = skill_learning.verify_drawer(one_object=one_object, text_rule=False, colour_only=True), set()
        for _ in range(200):
            prompt, answer, _, _ = draw(rng, "verify", 112)
            color, shape = _asked(prompt)
            colours, shapes = {o[1] for o in scenes[-1]}, {o[0] for o in scenes[-1]}
            assert shape in shapes and (answer == "yes") == (color in colours)
            assert answer == "no" or (color, shape) in {(o[1], o[0]) for o in scenes[-1]}
            answers.add(answer)
        assert answers == {"yes", "no"}
    row = skill_learning.main(["--skill", "verify", "--steps", "1", "--eval-every", "1", "--colour-only", "--no-csv"])[-1]
    assert row["variant"] == "colour-only"


def test_colour_only_and_text_rule_are_refused_together(capsys):
    import pytest
    with pytest.raises(SystemExit):
        skill_learning.main(["--colour-only", "--text-rule"])
    assert "two different answers" in capsys.readouterr().err
