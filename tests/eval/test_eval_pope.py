"""POPE: LLaVA eval_pope (lenient) and lmms-eval (strict) rules on hand-computed fixtures."""

from __future__ import annotations

import pytest

from flowkern.eval import PopeTask, get_task
from flowkern.eval.tasks.pope import parse_lenient, parse_strict, pope_metrics
from tests.fixtures import write_jsonl, write_pope

# (question_id, label, answer): lenient / strict readings in the comments
RANDOM = [
    (1, "yes", "Yes"),                           # yes TP   | yes TP
    (2, "yes", "Yes, there is a dog."),          # yes TP   | other (not a false negative)
    (3, "yes", "No"),                            # no  FN   | no FN
    (4, "yes", "NO"),                            # yes TP (case-sensitive)  | no FN
    (5, "no", "No, there is not."),              # no  TN   | other
    (6, "no", "There is no dog in the image."),  # no  TN   | other
    (7, "no", "yes"),                            # yes FP   | yes FP
    (8, "no", "not sure"),                       # no  TN   | other
]
POPULAR = [(1, "yes", "yes"), (2, "no", "no")]


def _write(folder, split, rows):
    return write_pope(folder, split, [(q, f"COCO_val2014_{q:012d}.jpg", "dog", label) for q, label, _ in rows])


@pytest.mark.parametrize(("text", "expected"), [
    ("Yes", "yes"), ("No", "no"), ("no", "no"), ("NO", "yes"), ("No.", "no"), ("Yes, there is a dog.", "yes"),
    ("No, there is no dog.", "no"), ("There is not a dog", "no"), ("Not sure", "yes"), ("", "yes"),
    ("I see a cat. No dog", "yes"), ("no\n", "yes"), ("yes,no", "yes"), ("Nope", "yes"), ("no.yes", "no"),
])
def test_lenient_parsing_is_llava_eval_pope(text, expected):
    assert parse_lenient(text) == expected


@pytest.mark.parametrize(("text", "expected"), [(" Yes ", "yes"), ("NO", "no"), ("Yes.", "yes."), ("", "")])
def test_strict_parsing_is_lower_strip(text, expected):
    assert parse_strict(text) == expected


def test_lenient_metrics_hand_computed(tmp_path):
    task = PopeTask(_write(tmp_path, "random", RANDOM))
    m = task.score({q: text for q, _, text in reversed(RANDOM)})  # matched by id, not order
    # TP = 1,2,4  FN = 3  TN = 5,6,8  FP = 7
    assert m["counts"] == {"tp": 3, "fp": 1, "tn": 3, "fn": 1, "other": 0}
    assert m["accuracy"] == pytest.approx(6 / 8, abs=1e-12)
    assert m["precision"] == pytest.approx(3 / 4, abs=1e-12)
    assert m["recall"] == pytest.approx(3 / 4, abs=1e-12)
    assert m["f1"] == pytest.approx(3 / 4, abs=1e-12)
    assert m["yes_ratio"] == pytest.approx(4 / 8, abs=1e-12)
    assert m["parsing"].startswith("lenient") and m["n"] == 8 and m["missing"] == 0


def test_strict_metrics_hand_computed(tmp_path):
    task = PopeTask(_write(tmp_path, "random", RANDOM), strict=True)
    m = task.score({q: text for q, _, text in RANDOM})
    # correct: 1 only. TP = 1, FP = 7, FN = 3, 4 ("NO" -> "no"); 2, 5, 6, 8 are neither yes nor no
    assert m["counts"] == {"tp": 1, "fp": 1, "tn": 0, "fn": 2, "other": 4}
    assert m["accuracy"] == pytest.approx(1 / 8, abs=1e-12)
    assert m["precision"] == pytest.approx(1 / 2, abs=1e-12)
    assert m["recall"] == pytest.approx(1 / 3, abs=1e-12)  # q2 (label yes, "other") is not in the denominator
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3), abs=1e-12)
    assert m["yes_ratio"] == pytest.approx(2 / 8, abs=1e-12)  # predictions, not labels (labels would give 4/8)
    assert m["parsing"].startswith("strict")


def test_zero_denominators_give_zero():
    m = pope_metrics(["no", "no"], ["no", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 1.0


def test_folder_scores_each_split_and_pools(tmp_path):
    _write(tmp_path, "random", RANDOM)
    _write(tmp_path, "popular", POPULAR)
    task = get_task("pope", tmp_path)
    assert task.splits == ["popular", "random"]
    assert task.keyed_by_split  # both files number their questions from 1
    preds = [{"question_id": q, "text": t, "category": "random"} for q, _, t in RANDOM]
    preds += [{"question_id": q, "text": t, "category": "popular"} for q, _, t in POPULAR]
    path = write_jsonl(tmp_path / "answers.jsonl", preds[::-1])
    m = task.score(task.read_predictions(path))
    assert m["splits"]["random"]["accuracy"] == pytest.approx(0.75)
    assert m["splits"]["popular"] == {**m["splits"]["popular"], "accuracy": 1.0, "f1": 1.0, "yes_ratio": 0.5, "n": 2}
    # pooled: TP 4, FP 1, TN 4, FN 1
    assert m["accuracy"] == pytest.approx(0.8) and m["f1"] == pytest.approx(0.8) and m["yes_ratio"] == 0.5
    assert m["split_mean"]["accuracy"] == pytest.approx((0.75 + 1.0) / 2)
    assert m["split_mean"]["f1"] == pytest.approx((0.75 + 1.0) / 2)
    assert m["n"] == 10


def test_folder_with_repeated_ids_needs_category(tmp_path):
    _write(tmp_path, "random", RANDOM)
    _write(tmp_path, "popular", POPULAR)
    task = get_task("pope", tmp_path)
    path = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "yes"}])
    with pytest.raises(ValueError, match="category"):
        task.score(task.read_predictions(path))


def test_folder_with_unique_ids_matches_by_id(tmp_path):
    _write(tmp_path, "random", RANDOM)
    write_pope(tmp_path, "popular", [(101, "a.jpg", "cat", "yes"), (102, "b.jpg", "cat", "no")])
    task = get_task("pope", tmp_path)
    assert not task.keyed_by_split
    m = task.score({101: "Yes", 102: "No", 5: "No"})
    assert m["n"] == 3 and m["missing"] == 7 and m["accuracy"] == 1.0


def test_samples_and_prompt(tmp_path):
    task = PopeTask(_write(tmp_path / "coco", "adversarial", POPULAR), images=tmp_path / "val2014")
    s = task.samples[0]
    assert s.prompt == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert s.image == tmp_path / "val2014" / "COCO_val2014_000000000001.jpg"
    assert s.reference == "yes" and s.split == "adversarial" and s.id == 1
    assert get_task("pope", tmp_path).splits == ["adversarial"]  # LLaVA layout: <folder>/coco/


def test_bad_pope_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="coco_pope"):
        PopeTask(tmp_path)
    with pytest.raises(FileNotFoundError, match="--data"):
        PopeTask(tmp_path / "missing.json")
    path = tmp_path / "coco_pope_random.json"
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "?", "label": "yes"}\n{"question_id": 2,\n')
    with pytest.raises(ValueError, match=r"coco_pope_random\.json:2"):
        PopeTask(path).samples  # noqa: B018
    write_jsonl(path, [{"question_id": 1, "image": "a.jpg", "text": "?", "label": "maybe"}])
    with pytest.raises(ValueError, match="label"):
        PopeTask(path).samples  # noqa: B018
    write_jsonl(path, [{"question_id": 1, "image": "a.jpg", "label": "yes"}])
    with pytest.raises(ValueError, match="'text'"):
        PopeTask(path).samples  # noqa: B018
    write_jsonl(path, [{"question_id": 1.5, "image": "a.jpg", "text": "?", "label": "yes"}])
    with pytest.raises(ValueError, match=r"coco_pope_random\.json:1: question_id"):
        PopeTask(path).samples  # noqa: B018
    write_jsonl(path, [{"question_id": 1, "image": "a.jpg", "text": "?", "label": "yes"}] * 2)
    with pytest.raises(ValueError, match="twice"):
        PopeTask(path).samples  # noqa: B018


def test_unknown_and_duplicate_prediction_ids(tmp_path):
    task = PopeTask(_write(tmp_path, "random", RANDOM))
    with pytest.raises(ValueError, match="question_id 99 is not in"):
        task.score({99: "yes"})
    path = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "yes"}, {"question_id": "1", "text": "no"}])
    with pytest.raises(ValueError, match=r"a\.jsonl:2: question_id '1' is given twice"):
        task.score(task.read_predictions(path))
