"""The settings identity (flowkern/identity.py): every setting that changes answers is recorded resolved in run.json
and sweep.json, and a resume under another value -- dtype, the model's files, the prompts, pruning, or a key an older
record lacks -- is refused with one line naming the setting, the recorded value and the new one, before any model
loads and without touching the folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import flowkern.hf.loading
from flowkern import identity
from flowkern.cli import main
from flowkern.eval.answers import SETTINGS_FILE
from tests.fixtures import save_eval_llava, save_image, write_pope

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    save_eval_llava(root / "llava")
    for i in range(2):
        save_image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
    write_pope(root / "pope", "random", [(q, f"COCO_val2014_{q % 2:012d}.jpg", "dog", "yes") for q in range(1, 4)])
    return root


def _args(command: str, files: Path, out: Path, model: Path, *extra: str) -> list[str]:
    more = ["--layers", "3"] if command == "sweep" else []
    return [command, "--model", str(model), "--task", "pope", "--data", str(files / "pope"), "--images",
            str(files / "val2014"), "--max-new-tokens", "2", "--device", "cpu", "--limit", "2", "--out", str(out),
            *more, *extra]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_model_identity_follows_the_files_not_the_path(files, tmp_path):
    a = identity.model_identity(str(files / "llava"))
    assert a["revision"] is None and len(a["weights"]) == 16 and a["model"] == str((files / "llava").resolve())
    shutil.copytree(files / "llava", tmp_path / "copy")
    assert identity.model_identity(str(tmp_path / "copy"))["weights"] == a["weights"]
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-3
    (tmp_path / "copy" / "config.json").write_text(json.dumps(config))
    assert identity.model_identity(str(tmp_path / "copy"))["weights"] != a["weights"]
    assert identity.model_identity(str(tmp_path / "none"))["weights"] is None
    assert identity.runtime_identity(str(files / "llava"), "cpu", "auto") == {"device": "cpu", "dtype": "float32"}
    assert identity.differences({"dtype": "float32", "old": 1}, {"dtype": "bfloat16", "new": 2}) == [
        "--dtype was 'float32', now 'bfloat16'", "--new was not recorded, now 2", "--old was 1, now not recorded"]


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_resume_under_another_setting_is_refused_naming_it(files, tmp_path, capsys, monkeypatch, command):
    model = tmp_path / "model"
    shutil.copytree(files / "llava", model)
    out = tmp_path / "out"
    assert main(_args(command, files, out, model)) == 0
    capsys.readouterr()
    record = out / (SETTINGS_FILE if command == "eval" else "sweep.json")
    settings = json.loads(record.read_text())["settings"]
    assert settings["dtype"] == "float32" and settings["device"] == "cpu"  # auto, recorded as resolved
    assert {"weights", "revision", "prompts"} <= set(settings)

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the settings were compared")

    monkeypatch.setattr(flowkern.hf.loading, "load_model", no_model)
    before = _tree(out)
    cases = [(["--dtype", "bfloat16"], "--dtype was 'float32', now 'bfloat16'"),
             (["--max-new-tokens", "3"], "--max-new-tokens was 2, now 3")]
    for extra, needle in cases:
        argv = _args(command, files, out, model, *extra)
        if "--max-new-tokens" in extra:
            argv[argv.index("--max-new-tokens") + 1] = "3"
            argv = argv[: -len(extra)]
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err and "other settings" in err, err
        assert _tree(out) == before
    # the chat template changes the prompts the model sees: the model's files are part of the identity
    (model / "chat_template.jinja").write_text((model / "chat_template.jinja").read_text() + "\n")
    code = main(_args(command, files, out, model))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--model (its files" in err and f"was {settings['weights']!r}" in err, err
    # a record from before a setting was recorded: refused, not guessed
    (model / "chat_template.jinja").write_text((model / "chat_template.jinja").read_text()[:-1])
    old = json.loads(record.read_text())
    del old["settings"]["dtype"]
    record.write_text(json.dumps(old))
    code = main(_args(command, files, out, model))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--dtype was not recorded, now 'float32'" in err, err
