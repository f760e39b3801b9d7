"""The shipped demo model (flowkern/demo/model): loads offline, is what the training script writes, follows
LLaVA-1.5's chat layout with a system prompt, and clears a smoke-size quality bar on fresh shapes sets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import flowkern
from flowkern import shapes as world
from flowkern.demo import quality
from flowkern.eval.tasks import chair
from tools.demo_model import config, data, loop, losses
from tools.demo_model import train as cli
from tools.demo_model.config import TrainConfig

MODEL = flowkern.demo_model_path()


def _train_defaults():
    return dataclasses.asdict(TrainConfig())


@pytest.fixture(scope="module")
def demo():
    from flowkern.demo import demo_model_path
    from flowkern.hf.loading import load_model

    return load_model(demo_model_path(), device="cpu")


def test_files_and_size():
    names = {p.name for p in MODEL.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "chat_template.jinja", "training.json"} <= names
    total = sum(p.stat().st_size for p in MODEL.iterdir())
    assert total <= 20 * 2**20


def test_loads_offline_by_name_and_path(monkeypatch, demo):
    from transformers import LlavaForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = demo
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    again = LlavaForConditionalGeneration.from_pretrained(MODEL, local_files_only=True, use_kernels=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
    cfg = model.config
    assert cfg.text_config.num_hidden_layers >= 8
    assert (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 >= 64


def test_files_are_what_the_training_script_writes(tmp_path):
    loop.write_initial(tmp_path, seed=0)
    shipped, fresh = json.loads((MODEL / "config.json").read_text()), json.loads((tmp_path / "config.json").read_text())
    for cfg in (shipped, fresh, shipped["text_config"], fresh["text_config"], shipped["vision_config"],
                fresh["vision_config"]):
        cfg.pop("transformers_version", None)
        cfg.pop("dtype", None)  # the trained model's save records float32 where the fresh one leaves it unset
    assert shipped == fresh
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (MODEL / name).read_text() == (tmp_path / name).read_text(), name
    record = json.loads((MODEL / "training.json").read_text())
    assert record["steps"] >= 1 and record["train_seconds"] > 0 and record["parameters"] > 1e6


def test_chat_layout_has_system_image_user_segments(demo):
    from flowkern.hf.inputs import build_inputs

    model, processor = demo
    img = world.render(next(world.scenes(1, "layout", 1)))
    inputs = build_inputs(processor, model, img, "Is there a red circle in the image?")
    ids = inputs["input_ids"][0]
    text = processor.tokenizer.decode(ids[ids != model.config.image_token_id])
    assert text.startswith(world.SYSTEM_PROMPT) and "USER :" in text and text.endswith("ASSISTANT :")
    first = int((ids == model.config.image_token_id).nonzero()[0])
    assert first > 10  # system tokens before the image
    assert int((ids == model.config.image_token_id).sum()) == 64


def test_training_batches_match_inference_inputs(demo):
    from flowkern.hf.inputs import build_inputs

    model, processor = demo
    ex = data.training_example(0, 5)
    batch = data.encode(processor, [ex])
    inputs = build_inputs(processor, model, ex["image"], ex["prompt"])
    n = inputs["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :n], inputs["input_ids"][0])
    assert torch.allclose(batch["pixel_values"], inputs["pixel_values"])
    tok = processor.tokenizer
    assert tok.decode(data.answer_ids(tok, "K7")) == "K7"
    with pytest.raises(ValueError, match="not in the demo vocabulary"):
        data.answer_ids(tok, "banana")


# The quality bar of issue 10 on the README's held-out sets (seed 1000: all 200 SQA problems and TextVQA labels;
# POPE and captions on 100 images of the seed; README: POPE 99.8 %, SQA 88.0 %, TextVQA 86.0 %, CHAIR_s 2.5 % at 200
# each). SQA's margin is thin (86.0 % of 1000 fresh problems, seed 3000; 81.2 % of a 64-problem sample, seed 424242),
# so a smaller sample would test the sampling noise, not the model.
BAR = {"pope": ("accuracy", ">=", 0.95), "sqa": ("accuracy", ">=", 0.85), "textvqa": ("accuracy", ">=", 0.80),
       "caption": ("chair_s", "<=", 0.10)}


@pytest.fixture(scope="module")
def smoke(demo, tmp_path_factory):
    model, processor = demo
    root = tmp_path_factory.mktemp("smoke")
    results = {}
    for row, num in (("pope", 100), ("sqa", 200), ("textvqa", 200), ("caption", 100), ("pope-noimage", 100),
                     ("caption-noimage", 100)):
        name = row.removesuffix("-noimage")
        t = quality.shapes_task(name, root / name, seed=1000, num=num)
        records = quality.answer_task(model, processor, t, batch_size=32,
                                      prune_layer=0 if row.endswith("-noimage") else None)
        results[row] = t.score(quality.records_to_predictions(t, records))
        if name == "caption":
            results[row]["count_accuracy"] = quality.count_accuracy(t, records)
    return results


def test_smoke_quality_bar(smoke):
    summary = {k: {m: round(v[m], 3) for m in ("accuracy", "chair_s") if m in v} for k, v in smoke.items()}
    for task, (metric, op, threshold) in BAR.items():
        value = smoke[task][metric]
        assert (value >= threshold) if op == ">=" else (value <= threshold), summary
    assert abs(smoke["pope-noimage"]["accuracy"] - 0.5) <= 0.10, summary


def test_the_image_matters_for_what_the_model_does_read(smoke):
    # captions name the objects only when they see them; SQA is scored per problems.json kind
    assert smoke["sqa"]["by_category"].keys() >= {"color", "count", "relation"}, smoke["sqa"]
    with_image, without = smoke["caption"], smoke["caption-noimage"]
    assert with_image["recall"] >= 0.5 and with_image["recall"] >= without["recall"] + 0.3, (with_image, without)
    assert with_image["count_accuracy"] >= 0.5, with_image


def _scene(objects, label=None):
    objs = tuple(world.ShapeObject(shape, color, x, y, r, 0.0, world.COLORS[color])
                 for shape, color, x, y, r in objects)
    return world.Scene(objs, "white", "plain", label, "test", 0)


def test_object_and_label_patches():
    small = world.ShapeObject("star", "red", 0.30, 0.30, 0.02, 0.0, world.COLORS["red"])
    assert world.object_patches(small, 8) == [2 * 8 + 2]  # no patch centre inside: the patch under its centre
    big = world.ShapeObject("circle", "blue", 0.5, 0.5, 0.13, 0.0, world.COLORS["blue"])
    assert world.object_patches(big, 8) == [27, 28, 35, 36]  # the four patch centres within 0.13 of the middle
    lab = world.Label("7K", 0.5, 0.5, 0.12, 0.095)
    left, right = world.label_patches(lab, 8, 0), world.label_patches(lab, 8, 1)
    assert left and right and not set(left) & set(right)
    assert all(c % 8 < 4 for c in left) and all(c % 8 >= 4 for c in right)
    assert sorted(left + right) == world.label_patches(lab, 8)


def test_attention_targets_point_each_answer_token_at_its_patches(demo):
    model, processor = demo
    tok = processor.tokenizer
    scene = _scene([("circle", "red", 0.2, 0.3, 0.1), ("square", "blue", 0.7, 0.7, 0.12)],
                   world.Label("7K", 0.7, 0.2, 0.12, 0.095))
    red, blue = (world.object_patches(o, 8) for o in scene.objects)
    pope_yes = {"task": "pope", "scene": scene, "answer": "Yes", "focus": ["blue square"]}
    assert data.attention_targets(tok, pope_yes, 8) == [(0, blue)]
    assert data.attention_targets(tok, dict(pope_yes, answer="No", focus=[]), 8) == []
    text = {"task": "textvqa", "scene": scene, "answer": "7K", "focus": []}
    assert data.attention_targets(tok, text, 8) == [(0, world.label_patches(scene.label, 8, 0)),
                                                      (1, world.label_patches(scene.label, 8, 1))]
    caption = {"task": "caption", "scene": scene, "answer": world.caption_text(scene), "focus": []}
    words = caption["answer"].split()  # There are two shapes : a red circle and a blue square . There is ... 7K .
    got = dict(data.attention_targets(tok, caption, 8))
    assert got[2] == sorted(set(red + blue))  # the count word: every object
    assert got[words.index("red")] == got[words.index("circle")] == red
    assert got[words.index("blue")] == got[words.index("square")] == blue
    assert got[words.index("7K")] == world.label_patches(scene.label, 8, 0)
    assert got[words.index("7K") + 1] == world.label_patches(scene.label, 8, 1)  # "##K": the token after "7"

    # encode: each guided row is the query position that predicts its answer token; keys are image positions
    ex = dict(data.training_example(0, 1), **caption, image=world.render(scene), prompt=chair.PROMPT)
    batch = data.encode(processor, [ex])
    image = batch["input_ids"][0] == model.config.image_token_id
    prompt_len = int((batch["labels"][0] == -100).sum())
    rows = batch["focus_rows"].tolist()
    assert [q - (prompt_len - 1) for _, q in rows] == [t for t, _ in data.attention_targets(tok, caption, 8)]
    assert batch["focus_keys"].shape == (len(rows), batch["input_ids"].shape[1])
    assert bool((batch["focus_keys"].bool() <= image).all())
    first_image = int(image.nonzero()[0])
    assert sorted((batch["focus_keys"][0].nonzero()[:, 0] - first_image).tolist()) == sorted(set(red + blue))


def test_mention_guide_finds_an_object_only_where_colour_and_shape_both_match(demo):
    model, processor = demo
    tok = processor.tokenizer
    scene = _scene([("circle", "red", 0.2, 0.3, 0.1), ("square", "blue", 0.7, 0.7, 0.12)])
    red = world.object_patches(scene.objects[0], 8)
    base = dict(data.training_example(0, 0), scene=scene, image=world.render(scene), focus=[], option="")
    asked = {"red circle": "Yes", "red square": "No", "blue circle": "No"}
    for obj, answer in asked.items():
        ex = dict(base, task="pope", prompt=world.pope_question_text(obj) + " Answer briefly.", answer=answer)
        batch = data.encode(processor, [ex])
        ids = batch["input_ids"][0]
        image = (ids == model.config.image_token_id).nonzero()[:, 0]
        words = tok.convert_ids_to_tokens(ids.tolist())
        shape_at = max(i for i, w in enumerate(words[:int(image[-1]) + 12]) if w.rstrip("?") == obj.split()[1])
        rows = [q for _, q in batch["focus_rows"].tolist()]
        keys = batch["focus_keys"][rows.index(shape_at)].nonzero()[:, 0]
        if answer == "Yes":  # present: the red circle's patches, nothing else
            assert sorted((keys - image[0]).tolist()) == red
        else:  # absent, though its colour or its shape is there: off the image, up to the mention
            assert not set(keys.tolist()) & set(image.tolist()) and int(keys.max()) == shape_at
    # SQA options and context mentions too; a mention that names no object of the image looks off it
    sqa_ex = next(e for e in (data.training_example(0, i) for i in range(300))
                  if e["task"] == "sqa" and e["kind"] == "names")
    ids = data.encode(processor, [sqa_ex])["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero()[:, 0].tolist()
    got = data._mention_targets(tok, sqa_ex, ids.tolist(), image, 8)
    assert len(got) == 2 and all(set(k) <= set(image) for _, k in got)  # "<name> drew the <object>." twice


def test_binding_negatives_share_a_colour_with_an_object_of_the_image():
    import random
    scene = _scene([("circle", "red", 0.2, 0.3, 0.1), ("square", "blue", 0.7, 0.7, 0.12)])
    picks = {data._binding_negative(scene, random.Random(i)) for i in range(200)}
    assert picks and all(p.split()[0] in ("red", "blue") and p not in scene.names for p in picks)
    assert "binding" in config.POPE_TRAIN_SPLITS


def test_training_stream_is_the_same_in_a_worker(demo):
    _, processor = demo
    plan = [("vision", 1, 3), ("full", 2, 2)]
    inline = list(data.TrainingStream(processor, 0, 8, plan))
    loader = torch.utils.data.DataLoader(data.TrainingStream(processor, 0, 8, plan), batch_size=None, num_workers=1)
    for (s1, b1, t1), (s2, b2, t2) in zip(inline, loader, strict=True):
        assert s1 == s2 and b1.keys() == b2.keys()
        assert all(torch.equal(b1[k], b2[k]) for k in b1) and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_text_guide_points_the_sqa_answer_at_the_right_option_line(demo):
    _, processor = demo
    tok = processor.tokenizer
    ex = next(data.training_example(0, i) for i in range(200) if data.training_example(0, i)["task"] == "sqa")
    assert ex["option"].startswith(f"{ex['answer']}. ") and ex["option"].split("\n")[0] == ex["option"]
    batch = data.encode(processor, [ex])
    prompt_len = int((batch["labels"][0] == -100).sum())
    assert batch["text_rows"].tolist() == [[0, prompt_len - 1]]  # the position that predicts the letter
    keys = batch["text_keys"][0].nonzero()[:, 0].tolist()
    assert keys == list(range(keys[0], keys[-1] + 1))  # one contiguous line ...
    assert tok.decode(batch["input_ids"][0, keys]) == ex["option"]  # ... the right option's
    others = [data.training_example(0, i) for i in range(20)]
    no_text = data.encode(processor, [e for e in others if e["task"] != "sqa"][:3])
    assert no_text["text_rows"].shape == (0, 2) and no_text["text_keys"].shape[0] == 0


def test_training_cli_defaults_are_the_train_defaults(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "train", lambda out, cfg: seen.append(cfg) or {"parameters": 1, "train_seconds": 1})
    assert cli.main(["--out", str(tmp_path / "a")]) == 0
    assert cli.main(["--out", str(tmp_path / "b"), "--sqa-boost", "none", "--no-position-aids", "--no-names-guides",
                     "--no-names-place", "--no-names-compare"]) == 0
    assert cli.main(["--out", str(tmp_path / "c"), "--seed", "3", "--steps", "7", "--vision-steps", "5",
                     "--batch-size", "4", "--lr", "1e-4", "--threads", "1", "--workers", "0", "--warmup", "2",
                     "--precision", "fp32", "--task-mix", "pope=1", "--sqa-boost", "count=0.5"]) == 0
    assert seen[0] == TrainConfig()
    assert seen[0].task_mix == config.TASK_MIX and seen[0].sqa_boost == config.SQA_BOOST
    assert seen[1] == TrainConfig(sqa_boost=None, position_aids=False, names_guides=False, names_place=False,
                                  names_compare=False)
    assert seen[2] == TrainConfig(seed=3, steps=7, vision_steps=5, batch_size=4, lr=1e-4, threads=1, workers=0,
                                  warmup=2, precision="fp32", task_mix={"pope": 1.0}, sqa_boost=("count", 0.5))


def test_each_training_flag_sets_one_config_field():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(flag.field in fields for flag in cli.FLAGS)
    assert len({flag.name for flag in cli.FLAGS}) == len(cli.FLAGS)
    helps = cli._parser().format_help()
    assert "(default: 4000)" in helps and "(default: names=0.3)" in helps and "--no-names-compare" in helps
    with pytest.raises(ValueError, match="task_mix"):
        TrainConfig(task_mix={"pope": -1.0})
    with pytest.raises(ValueError, match="sqa_boost"):
        TrainConfig(sqa_boost=("colour", 0.2))
    with pytest.raises(ValueError, match="threads"):
        TrainConfig(threads=0)


def test_the_shipped_model_is_what_the_defaults_train():
    # the recipe's one command (make demo-model: python -m tools.demo_model.train --out flowkern/demo/model --seed 0)
    # made the shipped files: its record holds TrainConfig's defaults, inside the hour on 2 CPU cores
    record = json.loads((MODEL / "training.json").read_text())
    defaults = _train_defaults()
    for key in ("seed", "steps", "batch_size", "lr", "warmup", "aux_weight", "attention_weight", "vision_steps",
                "vision_batch_size", "vision_lr", "threads", "workers", "init", "precision", "position_aids",
                "names_place", "names_compare"):
        assert record[key] == defaults[key], key
    assert record["sqa_boost"] == list(defaults["sqa_boost"]) and record["task_mix"] == defaults["task_mix"]
    guides = set(config.GUIDES) | set(config.NAMES_GUIDES) | set(config.COMPARE_GUIDES)
    assert set(record["guides"]) == guides and defaults["names_guides"] is True
    assert record["train_seconds"] <= 3600, record["train_seconds"]


@pytest.mark.parametrize("args, message", [
    (["--task-mix", "pope=x"], "--task-mix"), (["--task-mix", "foo=1"], "--task-mix"),
    (["--task-mix", "pope=0,sqa=0"], "not all zero"), (["--init", "/nonexistent/model"], "--init"),
    (["--sqa-boost", "names"], "--sqa-boost"), (["--sqa-boost", "colour=0.2"], "--sqa-boost"),
    (["--sqa-boost", "names=1.5"], "--sqa-boost"), (["--no-position-aids"], "--no-names-place"),
    (["--no-position-aids", "--no-names-place"], "--names-compare"),
])
def test_training_cli_rejects_bad_arguments_in_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--out", str(tmp_path / "out"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written before the arguments are checked
    assert config.check_task_mix(None) == config.TASK_MIX


def test_names_guides_tie_shape_words_to_their_drawers_and_the_letter_to_the_right_one(demo):
    import random
    _, processor = demo
    tok = processor.tokenizer
    scene = _scene([("circle", "red", 0.2, 0.3, 0.1), ("square", "blue", 0.7, 0.7, 0.12)])
    p = world.sqa_problem(scene, random.Random(0), kind="names")
    assert p["kind"] == "names"
    ex = dict(data.training_example(0, 0), task="sqa", scene=scene, image=world.render(scene), kind="names",
              prompt=_sqa_prompt(p), answer=chr(ord("A") + p["answer"]), focus=p["focus"],
              option=f"{chr(ord('A') + p['answer'])}. {p['choices'][p['answer']]}")
    batch = data.encode(processor, [ex])
    words = [w.rstrip(".?") for w in tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())]
    prompt_len = int((batch["labels"][0] == -100).sum())

    def pairs(name):
        return [(q, batch[f"{name}_keys"][n].nonzero()[:, 0].tolist())
                for n, (_, q) in enumerate(batch[f"{name}_rows"].tolist())]

    drew = {}  # "<Name> drew the <colour> <shape>.": the shape word looks at the name
    for q, keys in pairs("owner"):
        assert words[q] in world.SHAPES and len(keys) == 1 and words[keys[0] + 1] == "drew"
        drew[words[keys[0]]] = q
    assert len(drew) == 2
    right = p["choices"][p["answer"]]
    further = max if "right" in p["question"] else min
    assert right == [n for n, q in drew.items()
                     if scene.objects[[o.name for o in scene.objects].index(f"{words[q - 1]} {words[q]}")].x
                     == further(o.x for o in scene.objects)][0]  # the ground truth the guide rests on
    assert pairs("pick") == [(prompt_len - 1, [drew[right]])]  # the letter looks at the right drawer's shape
    link = pairs("link")
    assert len(link) == 2 and all(keys == [drew[words[q]]] for q, keys in link)  # each option name, its shape
    # --names-place: each option's name must carry the cell of the object that person drew, in NAMES_PLACE_LAYER
    owned = {q: (c, r) for (_, q), (c, r), layer in zip(batch["place_rows"].tolist(), batch["place_cells"].tolist(),
                                                       batch["place_layers"].tolist(), strict=True)
             if layer == config.NAMES_PLACE_LAYER}
    assert sorted(owned) == sorted(q for q, _ in link)
    for q, cell in owned.items():
        obj = next(o for o in scene.objects if o.name == f"{words[drew[words[q]] - 1]} {words[drew[words[q]]]}")
        assert cell == world.centre_cell(obj, 8)
    assert {layer for layer in batch["place_layers"].tolist()} == {config.PLACE_LAYER, config.NAMES_PLACE_LAYER}
    # --names-compare: the second option says whether it is the answer
    assert batch["compare_rows"].tolist() == [[0, max(owned)]]
    assert batch["compare_labels"].tolist() == [int(p["answer"] == 1)]
    assert pairs("read") == [(prompt_len - 1, [max(owned)])]  # the letter reads the second option's verdict
    other = next(e for e in (data.training_example(0, i) for i in range(50)) if e["task"] == "pope")
    assert data._names_targets(tok, other, [0, 1, 2]) == {}


def _sqa_prompt(p):
    from flowkern.eval.tasks import sqa
    return sqa.build_prompt(p["question"], p["choices"], p["hint"])


def test_sqa_problem_asks_a_requested_kind_when_the_scene_allows_it():
    import random
    two = _scene([("circle", "red", 0.2, 0.3, 0.1), ("square", "blue", 0.7, 0.7, 0.12)])
    one = _scene([("circle", "red", 0.2, 0.3, 0.1)])
    assert {world.sqa_problem(two, random.Random(i), kind="names")["kind"] for i in range(20)} == {"names"}
    # one object: no one to compare with, so the kind is drawn as usual
    assert "names" not in {world.sqa_problem(one, random.Random(i), kind="names")["kind"] for i in range(20)}


def test_grid_positions_give_each_patch_its_column_and_row():
    table = losses.grid_positions(8, 128)
    assert table.shape == (65, 128) and not table[0].any()  # the CLS token: zero
    assert torch.allclose(table[1:].norm(dim=-1), torch.full((64,), 8.0))
    # the lowest frequency is a quarter period across the image: monotone in the column / the row
    col, row = table[1:, 0].reshape(8, 8), table[1:, 64].reshape(8, 8)
    assert bool((col[:, 1:] > col[:, :-1]).all()) and bool((row[1:] > row[:-1]).all())
    assert torch.allclose(col, col[:1].expand(8, 8)) and torch.allclose(row, row[:, :1].expand(8, 8))
    with pytest.raises(ValueError, match="width"):
        losses.grid_positions(8, 130)
    # the code in a subspace: the first 16 channels, the rest zero, norm sqrt(16 / 2)
    small = losses.grid_positions(8, 128, 16)
    assert not small[:, 16:].any() and torch.allclose(small[1:].norm(dim=-1), torch.full((64,), 8 ** 0.5))
    assert bool((small[1:, 0].reshape(8, 8)[:, 1:] > small[1:, 0].reshape(8, 8)[:, :-1]).all())
    for dims in (0, 18, 132):
        with pytest.raises(ValueError, match="dims"):
            losses.grid_positions(8, 128, dims)


def test_position_loss_reads_column_and_row():
    grid, width = 4, 2 * 4
    head = torch.nn.Linear(width, 2 * grid, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2 * grid) * 20)
    cells = torch.arange(grid * grid)
    one_hot = torch.nn.functional.one_hot
    code = torch.cat([one_hot(cells % grid, grid), one_hot(cells // grid, grid)], dim=1).float()
    with torch.no_grad():
        assert float(losses.position_loss(code[None].repeat(3, 1, 1), head, grid)) < 1e-3
        blank = torch.zeros(3, grid * grid, width)  # tokens that do not know where they are: chance
        assert abs(float(losses.position_loss(blank, head, grid)) - torch.log(torch.tensor(4.0)).item()) < 1e-5


@pytest.mark.parametrize(("aids", "names", "place"), [(False, False, False), (True, False, True), (False, True, False)])
def test_training_runs_and_records_its_aids(tmp_path, aids, names, place):
    # place: --names-place and --names-compare together
    threads = torch.get_num_threads()
    try:
        record = loop.train(tmp_path / "m", TrainConfig(
            seed=0, steps=2, batch_size=2, vision_steps=2, vision_batch_size=2, threads=1, workers=0, lr=1e-5,
            vision_lr=1e-5, warmup=1, log_every=1, position_aids=aids, names_guides=names, names_place=place,
            names_compare=place))
    finally:
        torch.set_num_threads(threads)  # train() sets the process's thread count
    assert record["sqa_boost"] == list(config.SQA_BOOST) and record["position_aids"] is aids
    assert record["names_place"] is place and record["names_compare"] is place
    assert record["position_weight"] == (config.POSITION_WEIGHT if aids else 0.0)
    assert record["position_dims"] == (config.POSITION_DIMS if aids else 0)
    assert set(record["guides"]) == (set(config.GUIDES) | (set(config.NAMES_GUIDES) if names else set())
                                     | (set(config.COMPARE_GUIDES) if place else set()))
    from safetensors.torch import load_file
    weights = load_file(tmp_path / "m" / "model.safetensors")
    pos = next(v for k, v in weights.items() if k.endswith("position_embedding.weight"))
    # four steps at a tiny learning rate: still the 2-D code it started from (or CLIP's small random init)
    code = losses.grid_positions(8, 128, config.POSITION_DIMS)
    assert torch.allclose(pos, code, atol=1e-3) is aids
    assert json.loads((tmp_path / "m" / "training.json").read_text())["steps"] == 2


def test_quality_table_lists_sqa_by_problem_kind():
    metrics = {"accuracy": 0.75, "correct": 3, "n": 4, "by_category": {
        "count": {"accuracy": 0.5, "correct": 1, "n": 2}, "names": {"accuracy": 1.0, "correct": 2, "n": 2}}}
    row = quality.table({"sqa": {"metric": "accuracy", "value": 0.75, "passed": False, "bar": ">= 0.85", "n": 4,
                                 "metrics": metrics}}).splitlines()[-1]
    assert row.startswith("| shapes-sqa | 4 | accuracy | 75.0 % | >= 0.85 | NO |")
    assert "count 50.0 % of 2, names 100.0 % of 2" in row


def test_tower_probe_reads_what_the_shipped_image_tokens_carry():
    # tools/demo_model/probe_tower.py, end to end: the shipped tower reads colours, shapes and labels from its patches
    # and, from the 2-D position code, its column (README: char 0.886, column R^2 0.715 on 128 scenes)
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    probe = [sys.executable, "-m", "tools.demo_model.probe_tower", "demo"]
    done = subprocess.run([*probe, "--num", "24"], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("demo ")]
    values = ast.literal_eval(line[0].removeprefix("demo "))  # the printed dict of floats
    assert values["color"] >= 0.95 and values["shape"] >= 0.95 and values["char"] >= 0.7, values
    assert values["col_R2"] > 0.5, values
    bad = subprocess.run([*probe, "--num", "1"], capture_output=True, text=True, timeout=300, cwd=root)
    assert bad.returncode == 2 and "--num" in bad.stderr.splitlines()[-1]


@pytest.mark.parametrize("aid", ["names_place", "names_compare"])
def test_names_aids_need_the_position_aids(tmp_path, aid):
    with pytest.raises(ValueError, match="position_aids"):
        loop.train(tmp_path / "m", TrainConfig(steps=1, vision_steps=1, **(
            dict(position_aids=False, names_place=False, names_compare=False) | {aid: True})))
    assert not (tmp_path / "m").exists()


def test_names_probe_walks_the_whose_shape_hops_of_the_shipped_model():
    # tools/demo_model/probe_names.py, end to end. At layer 0 (the embeddings) a shape word cannot know who drew it or
    # where its object lies. The shipped model's place read-out carries the column to the shape word by layer 3 (R^2
    # 0.74 of 256), but the later hops never formed (README: "whose shape" at chance, the letter 0.46)
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = ["-m", "tools.demo_model.probe_names"]
    done = subprocess.run([sys.executable, *script, "demo", "--num", "96"], capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("demo ")]
    values = ast.literal_eval(line[0].removeprefix("demo "))
    layers = config.TEXT["num_hidden_layers"] + 1
    assert all(len(values[k]) == layers for k in ("owner", "place", "option", "verdict", "side")), values
    assert values["owner"][0] <= 0.45 and values["place"][0] < 0.2 and values["option"][0] < 0.2, values
    assert max(values["place"][3:]) > 0.4, values
    assert 0.3 <= values["letter"] <= 0.7 and 0.4 <= values["text_mass"] <= 0.6, values
    bad = subprocess.run([sys.executable, *script, "demo", "--num", "4"], capture_output=True, text=True, timeout=300,
                         cwd=root)
    assert bad.returncode == 2 and "--num" in bad.stderr.splitlines()[-1]


def test_the_package_does_not_import_the_training_lab():
    # tools/ lives beside flowkern, not in it: no module of the package imports it
    import ast
    from pathlib import Path

    package = Path(flowkern.__file__).resolve().parent
    found = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(package)}: {n}" for n in names if n.split(".")[0] == "tools"]
    assert not found, found
