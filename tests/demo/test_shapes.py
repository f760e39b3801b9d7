"""The synthetic shapes world: deterministic by seed, written in the official formats the flowkern.eval loaders read,
and scored correctly (CHAIR with the shapes vocabulary)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from flowkern import shapes as world
from flowkern.eval import get_task
from flowkern.eval.tasks.chair import ChairTask, ObjectVocabulary, caption_objects


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task", world.ANALOGUES)
def test_same_seed_same_files_fresh_seed_other_files(tmp_path, task):
    a = _digest(world.write_task(task, tmp_path / "a", seed=3, num=4))
    b = _digest(world.write_task(task, tmp_path / "b", seed=3, num=4))
    c = _digest(world.write_task(task, tmp_path / "c", seed=4, num=4))
    assert a == b and len(a) >= 5
    images = [k for k in a if k.endswith((".png", ".jpg"))]
    assert len(images) == 4
    assert all(a[k] != c.get(k) for k in images if k in c) or set(images) != {k for k in c if k in images}


def test_scenes_ground_truth():
    for scene in world.scenes(11, "gt", 60):
        assert 1 <= len(scene.objects) <= 4
        assert len(set(scene.names)) == len(scene.names)  # distinct colour-shape pairs
        xs = [o.x for o in scene.objects]
        assert xs == sorted(xs)  # left to right
        for i, o in enumerate(scene.objects):
            assert o.shape in world.SHAPES and o.color in world.COLORS
            assert o.r <= o.x <= 1 - o.r and o.r <= o.y <= 1 - o.r
            for p in scene.objects[i + 1:]:
                assert ((o.x - p.x) ** 2 + (o.y - p.y) ** 2) ** 0.5 > o.r + p.r  # no overlap
        if scene.label is not None:
            assert 1 <= len(scene.label.text) <= 2 and set(scene.label.text) <= set(world.LABEL_CHARS)
        d = scene.to_dict()
        assert json.loads(json.dumps(d)) == d and len(d["objects"]) == len(scene.objects)
    img = world.render(next(world.scenes(11, "gt", 1)))
    assert img.size == (world.CANVAS, world.CANVAS) and img.mode == "RGB"
    assert world.render(next(world.scenes(11, "gt", 1))).tobytes() == img.tobytes()


def test_patch_targets_mark_the_objects():
    scene = next(s for s in world.scenes(2, "pt", 50) if s.label is not None)
    t = world.patch_targets(scene, 8)
    assert len(t["color"]) == 64
    for o in scene.objects:
        gx, gy = min(7, int(o.x * 8)), min(7, int(o.y * 8))
        centre = gy * 8 + gx
        if t["color"][centre]:
            assert list(world.COLORS)[t["color"][centre] - 1] == o.color
            assert world.SHAPES[t["shape"][centre] - 1] == o.shape
    assert any(t["char"])


def test_pope_files_parse(tmp_path):
    out = world.write_task("pope", tmp_path / "pope", seed=5, num=10)
    task = get_task("pope", out, out / "images")
    assert sorted(task.splits) == ["adversarial", "popular", "random"] and len(task) == 60
    assert not task.keyed_by_split  # ids unique across the files: no `category` field needed
    truth = json.loads((out / "shapes_ground_truth.json").read_text())["scenes"]
    for s in task.samples:
        assert s.image.is_file()
        obj = s.meta["question"].removeprefix("Is there a ").removesuffix(" in the image?")
        present = obj in {o["name"] for o in truth[s.image.name]["objects"]}
        assert s.reference == ("yes" if present else "no")
    labels = [s.reference for s in task.samples]
    assert labels.count("yes") == labels.count("no")
    adversarial = [s for s in task.samples if s.split == "adversarial" and s.reference == "no"]
    for s in adversarial:  # near misses: the shape or the colour of an object in the image
        color, shape = s.meta["question"].split()[3:5]
        objs = truth[s.image.name]["objects"]
        assert any(o["shape"] == shape or o["color"] == color for o in objs)
    assert task.score({s.id: "Yes" if s.reference == "yes" else "No" for s in task.samples})["accuracy"] == 1.0


def test_sqa_files_parse(tmp_path):
    out = world.write_task("sqa", tmp_path / "sqa", seed=5, num=40)
    task = get_task("sqa", out)
    assert len(task) == 40
    problems = json.loads((out / "problems.json").read_text())
    kinds = {p["category"] for p in problems.values()}
    assert {"count", "relation"} <= kinds
    assert any(p["hint"] for p in problems.values())  # some with a text context
    for s in task.samples:
        assert s.image.is_file() and s.image.name == "image.png"
        assert s.prompt.endswith("Answer with the option's letter from the given choices directly.")
        assert 2 <= len(s.meta["choices"]) <= 4
    assert task.score({s.id: s.reference for s in task.samples})["accuracy"] == 1.0


def test_sqa_answers_are_true_of_the_scene():
    rng = random.Random(0)
    for scene in world.scenes(9, "sqa-truth", 200):
        p = world.sqa_problem(scene, rng)
        right = p["choices"][p["answer"]]
        if p["kind"] in ("relation", "context-relation"):
            phrase = p["question"].removeprefix("Which shape is ").removesuffix("?")
            anchor = next(o for o in scene.objects if phrase.endswith(o.name))
            rel = next(k for k, (ph, _) in world.RELATIONS.items() if phrase.startswith(ph + " the"))
            ok = world.RELATIONS[rel][1]
            by_name = {o.name: o for o in scene.objects}
            assert ok(by_name[right], anchor)
            assert not any(c in by_name and ok(by_name[c], anchor) for c in p["choices"] if c != right)
        elif p["kind"] == "count":
            if p["question"] == "How many shapes are there?":
                assert right == str(len(scene.objects))
            else:
                shape = p["question"].split()[2][:-1]
                assert right == str(sum(o.shape == shape for o in scene.objects))
        elif p["kind"] == "color":
            shape = p["question"].removeprefix("What colour is the ").removesuffix("?")
            assert [o.color for o in scene.objects if o.shape == shape] == [right]
        else:
            assert p["hint"] and right in p["hint"]


def test_textvqa_files_parse(tmp_path):
    out = world.write_task("textvqa", tmp_path / "tv", seed=5, num=8)
    task = get_task("textvqa", out)
    truth = json.loads((out / "shapes_ground_truth.json").read_text())["scenes"]
    assert len(task) == 8
    for s in task.samples:
        assert s.image.is_file() and s.image.suffix == ".jpg"
        assert len(s.reference) == 10
        assert {a.upper() for a in s.reference} == {truth[s.meta["image_id"]]["label"]["text"]}
    assert task.score({s.id: s.reference[0] for s in task.samples})["accuracy"] == 1.0
    assert get_task("textvqa", out, ocr=True).samples[0].prompt.count("Reference OCR token:") == 1


def test_caption_files_parse_and_chair_uses_the_shapes_vocabulary(tmp_path):
    out = world.write_task("caption", tmp_path / "cap", seed=5, num=8)
    task = get_task("chair", out)  # the root: annotations/ and val2014/ found as in the COCO layout
    assert isinstance(task, ChairTask) and len(task) == 8
    assert set(task.vocabulary.synonyms.values()) == set(world.ALL_CLASSES)
    scenes = list(world.scenes(5, "caption", 8))
    for s, scene in zip(task.samples, scenes, strict=True):
        assert s.image.is_file()
        assert task.ground_truth(s) == frozenset(scene.names)
    perfect = task.score({s.id: world.caption_text(sc) for s, sc in zip(task.samples, scenes, strict=True)})
    assert perfect["chair_s"] == 0.0 and perfect["recall"] == 1.0
    wrong = {}
    for s, scene in zip(task.samples, scenes, strict=True):
        absent = next(c for c in world.ALL_CLASSES if c not in scene.names)
        wrong[s.id] = f"There are two shapes : a {scene.names[0]} and a {absent} ."
    bad = task.score(wrong)
    assert bad["chair_s"] == 1.0 and bad["chair_i"] == 0.5


def test_chair_vocabulary_hook_is_backward_compatible(tmp_path):
    assert caption_objects("A dog on a couch.") == [("dog", "dog"), ("couch", "couch")]
    vocab = ObjectVocabulary.from_classes({"red circle": [], "blue star": ["navy star"]})
    assert caption_objects("two red circles and a navy star, a dog", vocab) == [
        ("red circle", "red circle"), ("navy star", "blue star")]
    (tmp_path / "v.txt").write_text("# comment\nred circle\nblue star = navy star\n")
    assert ObjectVocabulary.read(tmp_path / "v.txt") == vocab
    with pytest.raises(ValueError, match="one or two words"):
        ObjectVocabulary.from_classes({"a b c": []})
    with pytest.raises(ValueError, match="names both"):
        ObjectVocabulary.from_classes({"x": ["y"], "y": []})


def test_vocabulary_spells_every_prompt(tmp_path):
    vocab = set(world.vocabulary())
    for task in world.ANALOGUES:
        out = world.write_task(task, tmp_path / task, seed=8, num=30)
        loaded = get_task("chair" if task == "caption" else task, out, out / "images" if task == "pope" else None)
        for s in loaded.samples:
            missing = set(s.prompt.split()) - vocab
            assert not missing, (task, missing)
    for scene in world.scenes(8, "cap", 30):
        words = world.caption_text(scene).split()
        assert all(w in vocab or (len(w) == 2 and w[0] in vocab and f"##{w[1]}" in vocab) for w in words)


def test_cli_writes_and_prints_the_eval_command(tmp_path, capsys):
    from flowkern.cli import main

    out = tmp_path / "sqa"
    assert main(["shapes", "--task", "sqa", "--seed", "2", "--num", "3", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("flowkern eval --model demo --task sqa --data ") and f"--data {out} " in last
    assert len(get_task("sqa", out)) == 3
    assert main(["shapes", "--task", "pope", "--num", "0", "--out", str(tmp_path / "p")]) == 2
    assert "--num 0" in capsys.readouterr().err
