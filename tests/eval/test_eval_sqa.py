"""ScienceQA-IMG: test split, image questions only, lmms-eval's answer parsing, the LLaVA-1.5 prompt."""

from __future__ import annotations

import pytest

from flowkern.eval import SqaTask, get_task
from flowkern.eval.tasks.sqa import parse_option
from tests.fixtures import write_sqa

PROBLEMS = {
    "1": {"question": "Which animal is shown?", "choices": ["cat", "dog"], "answer": 1, "hint": "The dog is brown.",
          "image": "image.png"},
    "2": {"question": "Which is a mammal?", "choices": ["whale", "shark", "trout"], "answer": 0, "image": "image.png"},
    "3": {"question": "Text only?", "choices": ["yes", "no"], "answer": 0, "image": None},       # no image
    "4": {"question": "Val question?", "choices": ["yes", "no"], "answer": 1, "image": "image.png", "split": "val"},
    "5": {"question": "Which one jumps?", "choices": ["rock", "tree", "frog", "cloud"], "answer": 2,
          "image": "image.png"},
}
SPLITS = {"train": [], "val": ["4"], "test": ["1", "2", "3", "5"], "trainval": ["4"]}


@pytest.fixture
def sqa(tmp_path):
    return write_sqa(tmp_path / "scienceqa", PROBLEMS, SPLITS)


@pytest.mark.parametrize(("text", "letter"), [
    ("B", "B"), ("b", "B"), (" B ", "B"), ("B.", "B"), ("B. dog", "B"), ("b.", None), ("The answer is B.", None),
    ("", None), ("(B)", None), ("B)", None), ("BB", None), ("1", None), ("Answer: B", None),
])
def test_parse_option(text, letter):
    assert parse_option(text) == letter


def test_image_questions_of_the_test_split(sqa):
    task = SqaTask(sqa)
    assert [s.id for s in task.samples] == ["1", "2", "5"]  # 3 has no image, 4 is val
    assert [s.reference for s in task.samples] == ["B", "A", "C"]
    assert task.samples[0].image == sqa / "images" / "test" / "1" / "image.png"
    assert [s.id for s in SqaTask(sqa, split="val").samples] == ["4"]
    assert [s.id for s in SqaTask(sqa, image_only=False).samples] == ["1", "2", "3", "5"]


def test_prompt_format(sqa):
    by_id = {s.id: s for s in SqaTask(sqa).samples}
    assert by_id["1"].prompt == ("Context: The dog is brown.\nWhich animal is shown?\nA. cat\nB. dog\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert by_id["2"].prompt == ("Which is a mammal?\nA. whale\nB. shark\nC. trout\n"
                                 "Answer with the option's letter from the given choices directly.")  # empty hint


@pytest.mark.parametrize(("answers", "accuracy"), [
    ({"1": "B.", "2": "a", "5": "The answer is C."}, 2 / 3),
    ({"1": "b.", "2": " A ", "5": "C"}, 2 / 3),
    ({"1": "B", "2": "", "5": "C. frog"}, 2 / 3),
    ({"1": "A", "2": "B", "5": "D"}, 0.0),
    ({"5": "C"}, 1.0),
])
def test_accuracy_hand_computed(sqa, answers, accuracy):
    m = get_task("sqa", sqa).score(answers)
    assert m["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert m["n"] == len(answers) and m["missing"] == 3 - len(answers)


def test_accuracy_by_category(tmp_path):
    problems = {**PROBLEMS, "2": {**PROBLEMS["2"], "category": "Classification"}}
    m = get_task("sqa", write_sqa(tmp_path / "s", problems, SPLITS)).score({"1": "B", "2": "C", "5": "A"})
    assert m["by_category"] == {"Animals": {"accuracy": 0.5, "correct": 1, "n": 2},
                                "Classification": {"accuracy": 0.0, "correct": 0, "n": 1}}
    assert m["accuracy"] == pytest.approx(1 / 3, abs=1e-12)


def test_bad_input(sqa, tmp_path):
    task = SqaTask(sqa)
    with pytest.raises(ValueError, match="'99' is not in"):  # an id in no split
        task.score({"1": "B", "99": "A"})
    with pytest.raises(ValueError, match="no predictions to score .1 are for questions outside"):
        task.score({"3": "A"})  # a question without an image only: nothing to score
    with pytest.raises(FileNotFoundError, match="--data"):
        SqaTask(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no split 'dev'"):
        SqaTask(sqa, split="dev").samples  # noqa: B018
    (sqa / "problems.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"problems\.json:1"):
        SqaTask(sqa).samples  # noqa: B018
    (sqa / "problems.json").unlink()
    with pytest.raises(FileNotFoundError, match="problems.json"):
        SqaTask(sqa).samples  # noqa: B018


def test_llava_answer_file_of_the_whole_test_split(sqa, tmp_path):
    """LLaVA's answer file covers the whole test split, text-only problems included (and may hold other splits'
    problems): those are ignored and counted, as LLaVA's eval_science_qa.py does; the image subset is scored."""
    from tests.fixtures import write_jsonl

    lines = [{"question_id": pid, "prompt": ("<image>\n" if pid != "3" else "") + "Q", "text": text,
              "answer_id": f"a{pid}", "model_id": "llava-v1.5-7b", "metadata": {}}
             for pid, text in (("1", "B"), ("2", "A"), ("3", "A"), ("5", "D"), ("4", "B"))]
    answers = write_jsonl(tmp_path / "llava-v1.5-7b.jsonl", lines)
    task = SqaTask(sqa)
    m = task.score(task.read_predictions(answers))
    assert (m["n"], m["missing"], m["ignored"], m["correct"]) == (3, 0, 2, 2)  # 3 (text only) and 4 (val) ignored
    assert m["accuracy"] == pytest.approx(2 / 3, abs=1e-12)
    assert "ignored" not in task.score({"1": "B"})  # nothing ignored: the metrics are as before
    assert len(SqaTask(sqa, image_only=False).match(task.read_predictions(answers))) == 4  # 3 is scored there
