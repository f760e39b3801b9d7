"""``flowkern score`` end to end: exit codes, the last-line JSON, --out (atomic, validated first), bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flowkern.cli import main
from tests.fixtures import write_coco, write_jsonl, write_pope, write_sqa, write_textvqa

POPE = [(1, "yes", "Yes"), (2, "yes", "No"), (3, "no", "No, there is not."), (4, "no", "yes"), (5, "yes", "NO")]


@pytest.fixture
def pope(tmp_path):
    data = write_pope(tmp_path / "pope", "random", [(q, f"{q}.jpg", "dog", lab) for q, lab, _ in POPE])
    preds = write_jsonl(tmp_path / "answers.jsonl",
                        [{"question_id": q, "prompt": "p", "text": t, "answer_id": "x", "model_id": "m",
                          "metadata": {}} for q, _, t in reversed(POPE)])
    return data, preds


def _score(capsys, *args):
    code = main(["score", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_pope_end_to_end(pope, capsys, tmp_path):
    data, preds = pope
    out_file = tmp_path / "results" / "pope.json"  # the folder is created
    code, out, err = _score(capsys, "--task", "pope", "--data", data, "--predictions", preds, "--out", out_file)
    assert code == 0, err
    m = _last_json(out)
    # lenient: TP 1, 5 ("NO" is yes) | FN 2 | TN 3 | FP 4
    assert m["accuracy"] == pytest.approx(3 / 5) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5) and m["parsing"].startswith("lenient")
    assert json.loads(out_file.read_text()) == m
    assert [p for p in os.listdir(out_file.parent) if p != "pope.json"] == []  # no temp file left
    assert "pope: 5 predictions scored" in out

    code, out, err = _score(capsys, "--task", "pope", "--data", data, "--predictions", preds, "--strict",
                            "--out", out_file)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    code, out, err = _score(capsys, "--task", "pope", "--data", data, "--predictions", preds, "--strict",
                            "--out", out_file, "--overwrite")
    assert code == 0, err
    m = _last_json(out)
    # strict: "yes" TP | "no" FN (q2, q5) | q3 is neither | "yes" FP
    assert m["accuracy"] == pytest.approx(1 / 5) and m["recall"] == pytest.approx(1 / 3)
    assert m["parsing"].startswith("strict") and json.loads(out_file.read_text()) == m


def test_sqa_textvqa_chair_end_to_end(tmp_path, capsys):
    sqa = write_sqa(tmp_path / "sqa", {
        "7": {"question": "Q?", "choices": ["x", "y"], "answer": 1, "image": "image.png"},
        "8": {"question": "R?", "choices": ["x", "y"], "answer": 0, "image": "image.png"}}, {"test": ["7", "8"]})
    preds = write_jsonl(tmp_path / "sqa.jsonl", [{"question_id": "8", "text": "A"}, {"question_id": "7", "text": "A"}])
    code, out, err = _score(capsys, "--task", "sqa", "--data", sqa, "--predictions", preds)
    assert code == 0, err
    assert _last_json(out)["accuracy"] == pytest.approx(0.5)

    tv = write_textvqa(tmp_path / "tv", [{"question_id": 5, "image_id": "i", "question": "q?",
                                          "answers": ["two"] * 2 + ["x"] * 8}])
    preds = write_jsonl(tmp_path / "tv.jsonl", [{"question_id": 5, "text": "2"}])
    code, out, err = _score(capsys, "--task", "textvqa", "--data", tv, "--predictions", preds)
    assert code == 0, err
    assert _last_json(out)["accuracy"] == pytest.approx(0.6)

    pytest.importorskip("lemminflect")
    coco = write_coco(tmp_path / "coco", {1: (["dog"], ["A dog."]), 2: (["car"], [])})
    preds = write_jsonl(tmp_path / "caps.jsonl", [{"image_id": 1, "caption": "A dog on a sofa."},
                                                  {"image_id": 2, "caption": "A red car."}])
    code, out, err = _score(capsys, "--task", "chair", "--data", coco, "--predictions", preds)
    assert code == 0, err
    m = _last_json(out)
    assert (m["chair_s"], m["chair_i"], m["recall"]) == (pytest.approx(0.5), pytest.approx(1 / 3), 1.0)


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input_is_one_line_exit_2(pope, tmp_path, capsys):
    data, preds = pope
    base = ["--data", data, "--predictions", preds]
    _one_line_error(*_score(capsys, "--task", "vqav2", *base)[::2], "--task", "vqav2", "pope")
    _one_line_error(*_score(capsys, "--task", "sqa", "--strict", *base)[::2], "--strict")
    _one_line_error(*_score(capsys, "--task", "pope", "--data", tmp_path / "none.json", "--predictions", preds)[::2],
                    "--data", "none.json")
    _one_line_error(*_score(capsys, "--task", "pope", "--data", data, "--predictions", tmp_path / "x.jsonl")[::2],
                    "--predictions", "x.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2, "text": \n')
    _one_line_error(*_score(capsys, "--task", "pope", "--data", data, "--predictions", bad)[::2], "bad.jsonl:2")
    write_jsonl(bad, [{"question_id": 1, "text": "yes"}, {"question_id": 42, "text": "no"}])
    _one_line_error(*_score(capsys, "--task", "pope", "--data", data, "--predictions", bad)[::2], "42", "bad.jsonl:2")
    write_jsonl(bad, [{"question_id": 1, "text": "yes"}, {"question_id": 1, "text": "no"}])
    _one_line_error(*_score(capsys, "--task", "pope", "--data", data, "--predictions", bad)[::2], "twice")
    write_jsonl(bad, [{"question_id": 1, "answer": "yes"}])
    _one_line_error(*_score(capsys, "--task", "pope", "--data", data, "--predictions", bad)[::2], "'text'")


def test_out_is_validated_before_any_work(pope, tmp_path, capsys):
    data, _ = pope
    missing = tmp_path / "missing.jsonl"  # would fail later: the --out error must come first
    _one_line_error(*_score(capsys, "--task", "pope", "--data", data, "--predictions", missing, "--out",
                            tmp_path)[::2], "--out", "is a directory")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(*_score(capsys, "--task", "pope", "--data", data, "--predictions", missing, "--out",
                            blocker / "m.json")[::2], "--out", "not a directory")
    assert blocker.read_text() == "x"


def test_console_script_exit_codes(pope, tmp_path):
    data, preds = pope
    # what the `flowkern` console script runs (`python -m flowkern.cli` would load flowkern.cli twice)
    entry = "import sys; from flowkern.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", entry, "score", "--task", "pope", "--data", str(data)]
    ok = subprocess.run([*cmd, "--predictions", str(preds)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(0.6)
    bad = subprocess.run([*cmd, "--predictions", str(tmp_path / "nope.jsonl")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("flowkern score: error: --predictions")
