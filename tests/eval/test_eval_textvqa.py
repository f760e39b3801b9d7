"""TextVQA: the EvalAI / m4c normaliser with its quirks, leave-one-out soft accuracy, OCR prompts."""

from __future__ import annotations

import json

import pytest

from flowkern.eval import TextVqaTask, get_task
from flowkern.eval.tasks.textvqa import normalize_answer, soft_accuracy
from tests.fixtures import write_jsonl, write_textvqa


@pytest.mark.parametrize(("raw", "normalised"), [
    ("The Dog", "dog"), ("a cat.", "cat"), ("an apple", "apple"), ("the the the", ""),   # articles
    ("two", "2"), ("Ten", "10"), ("None", "0"), ("eleven", "eleven"), ("2 one", "2 1"),   # number words
    ("dont", "don't"), ("don't", "don't"), ("Cant", "can't"), ("wont", "won't"),         # contractions
    ("somebody'd", "somebodyd"), ("twas", "'twas"), ("Im", "im"),                        # the table's quirks
    ("dog's", "dog 's"), ("it's", "it 's"),                                              # "'s" split off
    ("hello, world?", "hello world"), ("1,000", "1000"), ("Yes!", "yes"),
    ("coca-cola", "coca cola"), ("coca - cola", "coca cola"), ("(a) test", "test"),      # touching a space: deleted
    ("x/y", "x y"), ("x/y z/ w", "xy z w"),  # one mark touching a space: all of it deleted
    ("3.5", "3.5"), ("5.", "5"), ("e.g.", "eg"), ("yes.", "yes"), ("." * 40, "." * 8),   # at most 32 periods go
    ("$5", "$5"), ("10:30", "10:30"), ("50%", "50%"),                                    # never touched
    ("Yes, there is a dog.", "yes there is dog"), ("", ""), ("  \n\t ", ""), ("!!!", ""),
])
def test_normaliser(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(("pred", "answers", "score"), [
    ("Coca-Cola.", ["Coca-Cola"] * 2 + ["coca cola"] + ["pepsi"] * 7, 0.9),  # 3 matches: 3 x 2/3 + 7 x 1
    ("2", ["two", "2"] + ["3"] * 8, 0.6),                                      # 2 matches: 2 x 1/3 + 8 x 2/3
    ("A dog", ["the dog"] * 10, 1.0),
    ("dog", ["dog"] + ["cat"] * 9, 0.3),                                       # 1 match: 9 x 1/3
    ("cat", ["cat"] * 4 + ["dog"] * 6, 1.0),                                   # 4 matches: always >= 3 others
    ("", ["dog"] * 10, 0.0),
    ("horse", ["dog"] * 10, 0.0),
])
def test_soft_accuracy(pred, answers, score):
    assert soft_accuracy(pred, answers) == pytest.approx(score, abs=1e-12)


ENTRIES = [
    {"question_id": 100, "image_id": "img_a", "question": "what brand is this?",
     "answers": ["Coca-Cola"] * 2 + ["coca cola"] + ["pepsi"] * 7, "ocr_tokens": ["coca", "cola"]},
    {"question_id": 101, "image_id": "img_a", "question": "how many bottles?", "answers": ["two", "2"] + ["3"] * 8,
     "ocr_tokens": ["coca", "cola"]},
    {"question_id": 102, "image_id": "img_b", "question": "what animal?", "answers": ["the dog"] * 10,
     "ocr_tokens": []},
    {"question_id": 103, "image_id": "img_c", "question": "what does it say?",
     "answers": ["dont", "don't", "don't"] + ["stop"] * 7, "ocr_tokens": ["dont"]},
    {"question_id": 104, "image_id": "img_d", "question": "what color?", "answers": ["red"] * 10, "ocr_tokens": []},
]


@pytest.fixture
def textvqa(tmp_path):
    return write_textvqa(tmp_path / "textvqa", ENTRIES)


def test_accuracy_hand_computed(textvqa):
    task = get_task("textvqa", textvqa)
    m = task.score({104: "", 103: "dont", 102: "A dog", 101: "2", 100: "Coca-Cola."})
    assert m["accuracy"] == pytest.approx((0.9 + 0.6 + 1.0 + 0.9 + 0.0) / 5, abs=1e-12)
    assert m["n"] == 5 and m["missing"] == 0


def test_prompts(textvqa, tmp_path):
    plain = TextVqaTask(textvqa.parent)  # the folder works too
    assert plain.samples[0].prompt == "what brand is this?\nAnswer the question using a single word or phrase."
    assert plain.samples[0].image == textvqa.parent / "train_images" / "img_a.jpg"
    ocr = TextVqaTask(textvqa, ocr=True)
    assert ocr.samples[0].prompt == ("what brand is this?\nReference OCR token: coca, cola\n"
                                     "Answer the question using a single word or phrase.")
    assert ocr.samples[2].prompt == "what animal?\nAnswer the question using a single word or phrase."


def test_ocr_tokens_from_the_rosetta_file(tmp_path):
    entries = [{k: v for k, v in e.items() if k != "ocr_tokens"} for e in ENTRIES]
    path = write_textvqa(tmp_path, entries)
    with pytest.raises(FileNotFoundError, match="OCR"):
        TextVqaTask(path, ocr=True).samples  # noqa: B018
    (tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json").write_text(json.dumps(
        {"data": [{"image_id": "img_a", "ocr_tokens": ["pepsi"]}]}))
    s = TextVqaTask(path, ocr=True).samples
    assert "\nReference OCR token: pepsi\n" in s[0].prompt and "Reference" not in s[2].prompt


def test_llava_answer_file_with_image_ids_and_prompts(textvqa, tmp_path):
    task = TextVqaTask(textvqa, ocr=True)
    rows = [{"question_id": s.meta["image_id"], "prompt": s.prompt, "text": text, "answer_id": "x", "model_id": "m"}
            for s, text in zip(task.samples, ["Coca-Cola.", "2", "A dog", "dont", ""], strict=True)]
    m = task.score(task.read_predictions(write_jsonl(tmp_path / "llava.jsonl", rows)))
    assert m["accuracy"] == pytest.approx(0.68, abs=1e-12)


def test_bad_input(textvqa, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="TextVQA_0.5.1_val.json"):
        TextVqaTask(tmp_path / "empty")
    task = TextVqaTask(textvqa)
    with pytest.raises(ValueError, match="question_id 999 is not in"):
        task.score({999: "x"})
    textvqa.write_text(json.dumps({"data": [{"question_id": 1, "image_id": "a", "question": "q"}]}))
    with pytest.raises(ValueError, match="'answers'"):
        TextVqaTask(textvqa).samples  # noqa: B018
