"""flowkern._io: output-path validation and atomic writes; flowkern.eval.tasks.base: answer-file reading."""

from __future__ import annotations

import json
import os
import stat

import pytest

from flowkern import _io
from flowkern._io import atomic_write_json, atomic_write_text, check_output_path
from flowkern.eval import get_task, read_predictions
from tests.fixtures import write_jsonl


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "a" / "b" / "m.json") == tmp_path / "a" / "b" / "m.json"
    assert not (tmp_path / "a").exists()  # validation creates nothing
    with pytest.raises(ValueError, match="--out: .* is a directory"):
        check_output_path(tmp_path)
    existing = tmp_path / "m.json"
    existing.write_text("old")
    with pytest.raises(ValueError, match="already exists"):
        check_output_path(existing)
    assert check_output_path(existing, overwrite=True) == existing
    with pytest.raises(ValueError, match="--result: .* not a directory"):
        check_output_path(existing / "x.json", what="--result")
    with pytest.raises(ValueError, match="not a file name"):
        check_output_path("")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_path_unwritable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ValueError, match="permission denied"):
            check_output_path(locked / "sub" / "m.json")
    finally:
        locked.chmod(stat.S_IRWXU)


def test_atomic_write(tmp_path):
    target = tmp_path / "deep" / "m.json"
    atomic_write_json(target, {"accuracy": 0.5})
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert target.read_text().endswith("\n")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and os.listdir(target.parent) == ["m.json"]
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")})  # not JSON: nothing written
    assert target.read_text() == "new"


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    target.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(_io.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["m.json"]  # temp file removed


def test_read_predictions(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"question_id": 1, "text": "yes"}\n\n{"question_id": "x", "text": "no", "extra": 1}\n')
    preds = read_predictions(path)
    assert [(p.id, p.text, p.source) for p in preds] == [(1, "yes", f"{path}:1"), ("x", "no", f"{path}:3")]
    for body, message in [
        ("[1, 2]\n", r"a\.jsonl:1: expected a JSON object"),
        ('{"question_id": 1, "text": 3}\n', "must be a string"),
        ('{"question_id": 1.5, "text": "a"}\n', "integer or string id"),
        ('{"question_id": true, "text": "a"}\n', "integer or string id"),
        ("\n\n", "no predictions"),
        ('{"question_id": 1, "text": "a"}\n{oops}\n', r"a\.jsonl:2: not valid JSON"),
    ]:
        path.write_text(body)
        with pytest.raises(ValueError, match=message):
            read_predictions(path)
    with pytest.raises(FileNotFoundError, match="--predictions"):
        read_predictions(tmp_path / "missing.jsonl")


def test_unknown_task_and_option(tmp_path):
    with pytest.raises(ValueError, match="--task: unknown task 'mme'"):
        get_task("mme", tmp_path)
    path = write_jsonl(tmp_path / "coco_pope_random.json",
                       [{"question_id": 1, "image": "a.jpg", "text": "?", "label": "yes"}])
    with pytest.raises(ValueError, match="--task pope: .*ocr"):
        get_task("pope", path, ocr=True)
