"""Field types in the official files (issue 36 class 5): every task reads its fields through one validator
(flowkern.eval.tasks.base.row_field), so a null, a number where text is due, an empty image name or a boolean id is
one ValueError naming the file, the row and the field, before any work; on the command line one line, exit 2."""

from __future__ import annotations

import json

import pytest

from flowkern.cli import main
from flowkern.eval import get_task
from flowkern.eval.tasks.base import row_field
from tests.fixtures import write_coco, write_jsonl, write_sqa, write_textvqa

GOOD_POPE = {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"}


@pytest.mark.parametrize(("field", "value", "says"), [
    ("image", None, "image must be a string, got null"),
    ("image", 3, "image must be a string, got a number (3)"),
    ("image", "", 'image must not be empty, got ""'),
    ("text", None, "text must be a string, got null"),
    ("text", ["a"], "text must be a string, got a list"),
    ("label", 1, "label must be a string, got a number"),
    ("question_id", True, "question_id must be an integer or a string, got a boolean"),
    ("question_id", 1.5, "question_id must be an integer or a string, got a number (1.5)"),
    ("question_id", None, "question_id must be an integer or a string, got null"),
])
def test_pope(tmp_path, field, value, says):
    path = write_jsonl(tmp_path / "coco_pope_random.json", [GOOD_POPE, {**GOOD_POPE, "question_id": 2,
                                                                          field: value}])
    with pytest.raises(ValueError, match=rf"--data: .*coco_pope_random\.json:2: {says}".replace("(", r"\(")
                       .replace(")", r"\)")):
        get_task("pope", path).samples  # noqa: B018


SQA_GOOD = {"question": "Which is a dog?", "choices": ["cat", "dog"], "answer": 1, "image": "image.png"}


@pytest.mark.parametrize(("field", "value", "says"), [
    ("image", 3, "image must be a string, got a number"),
    ("image", "", "image must not be empty"),
    ("question", None, "question must be a string, got null"),
    ("choices", "cat,dog", "choices must be a list, got a string"),
    ("choices", ["cat", None], r"choices\[1\] must be a string, got null"),
    ("answer", "1", "answer must be an integer, got a string"),
    ("answer", True, "answer must be an integer, got a boolean"),
    ("hint", 3, "hint must be a string, got a number"),
])
def test_sqa(tmp_path, field, value, says):
    data = write_sqa(tmp_path / "sqa", {"1": SQA_GOOD, "2": SQA_GOOD}, {"test": ["1", "2"]})
    problems = json.loads((data / "problems.json").read_text())
    problems["2"][field] = value
    (data / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(ValueError, match=rf"--data: .*problems\.json: 2: {says}"):
        get_task("sqa", data).samples  # noqa: B018


def test_sqa_null_image_and_hint_are_the_release_format(tmp_path):
    data = write_sqa(tmp_path / "sqa", {"1": SQA_GOOD, "2": {**SQA_GOOD, "image": None, "hint": None}},
                     {"test": ["1", "2"]})
    assert [s.id for s in get_task("sqa", data).samples] == ["1"]  # 2 has no image: text only
    (data / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"], "val": [None]}))
    with pytest.raises(ValueError, match=r"pid_splits\.json: val\[0\]: pid must be an integer or a string"):
        get_task("sqa", data).samples  # noqa: B018


TEXTVQA_GOOD = {"question_id": 11, "image_id": "t1", "question": "what word?", "answers": ["yes"] * 10}


@pytest.mark.parametrize(("field", "value", "says"), [
    ("question", None, "question must be a string, got null"),
    ("image_id", None, "image_id must be an integer or a string, got null"),
    ("image_id", "", "image_id must not be empty"),
    ("answers", "yes", "answers must be a list, got a string"),
    ("answers", ["yes", None], r"answers\[1\] must be a string, got null"),
    ("question_id", False, "question_id must be an integer or a string, got a boolean"),
])
def test_textvqa(tmp_path, field, value, says):
    path = write_textvqa(tmp_path / "textvqa", [TEXTVQA_GOOD, {**TEXTVQA_GOOD, "question_id": 12}])
    annotations = json.loads(path.read_text())
    annotations["data"][1][field] = value
    path.write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=rf"--data: .*TextVQA_0\.5\.1_val\.json: data\[1\]: {says}"):
        get_task("textvqa", path).samples  # noqa: B018


@pytest.mark.parametrize(("file", "part", "index", "field", "value", "says"), [
    ("captions", "images", 1, "id", None, "id must be an integer or a string, got null"),
    ("instances", "images", 0, "file_name", 7, "file_name must be a string, got a number"),
    ("captions", "annotations", 0, "caption", None, "caption must be a string, got null"),
    ("instances", "annotations", 0, "image_id", [1], "image_id must be an integer or a string, got a list"),
    ("instances", "categories", 0, "name", None, "name must be a string, got null"),
])
def test_coco(tmp_path, file, part, index, field, value, says):
    data = write_coco(tmp_path / "coco", {1: (["dog"], ["A dog."]), 2: (["car"], ["A car."])})
    path = data / f"{file}_val2014.json"
    obj = json.loads(path.read_text())
    obj[part][index][field] = value
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=rf"--data: .*{file}_val2014\.json: {part}\[{index}\]: {says}"):
        get_task("chair", data).samples  # noqa: B018


def test_row_field_kinds():
    row = {"a": "x", "n": 3, "f": 0.5, "l": [], "none": None}
    assert row_field(row, "a", "string", "w") == "x"
    assert row_field(row, "n", "number", "w") == 3 and row_field(row, "f", "number", "w") == 0.5
    assert row_field(row, "l", "list", "w", empty=True) == []
    assert row_field(row, "none", "string", "w", optional=True) is None
    assert row_field(row, "absent", "string", "w", optional=True) is None
    with pytest.raises(ValueError, match="w: missing field 'absent'"):
        row_field(row, "absent", "string", "w")
    with pytest.raises(ValueError, match="w: expected an object, got a list"):
        row_field([1], "a", "string", "w")


def test_score_cli_one_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "coco_pope_random.json", [{**GOOD_POPE, "text": None}])
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "yes"}])
    code = main(["score", "--task", "pope", "--data", str(path), "--predictions", str(answers)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].endswith("coco_pope_random.json:1: text must be a string, got null")
