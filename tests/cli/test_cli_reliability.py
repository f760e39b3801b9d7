"""User mistakes and interruptions of the model commands (flow, generate, cam): every bad argument is refused before
any work with one line and exit code 2, nothing is written, and an interrupted or killed run leaves the complete
result or nothing new (never a half-written file, never two runs mixed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import flowkern
from flowkern import _io, outdir
from flowkern.cli import main
from flowkern.hf.inputs import build_inputs
from flowkern.hf.loading import load_model
from tests.fixtures import PROMPT, save_llava, save_photo

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    save_llava(root / "llava")
    save_photo(root / "photo.png")
    corrupt = root / "corrupt"
    save_llava(corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated download
    (root / "a_file").write_text("not a folder\n")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("someone's files\n")
    (root / "imgdir").mkdir()
    return root


def _model_args(files: Path, command: str) -> list[str]:
    return [command, "--model", str(files / "llava"), "--image", str(files / "photo.png"), "--prompt", PROMPT,
            "--device", "cpu", "--max-new-tokens", "2"]


# (id, command, extra arguments, replacements of the default model/image) -> exit 2, one line, nothing written
BAD = [
    ("flow-out-is-file", "flow", ["--out", "{root}/a_file"], {}),
    ("flow-out-foreign-folder", "flow", ["--out", "{root}/foreign", "--overwrite"], {}),
    ("flow-out-under-file", "flow", ["--out", "{root}/a_file/sub"], {}),
    ("flow-threshold", "flow", ["--threshold", "2", "--out", "{root}/new1"], {}),
    ("flow-keep-without-layer", "flow", ["--keep", "5", "--out", "{root}/new2"], {}),
    ("flow-bad-layers", "flow", ["--layers", "0,x", "--out", "{root}/new3"], {}),
    ("cam-out-is-file", "cam", ["--out", "{root}/a_file"], {}),
    ("cam-noise-inf", "cam", ["--noise-std", "inf", "--out", "{root}/new4"], {}),
    ("cam-noise-nan", "cam", ["--noise-std", "nan", "--out", "{root}/new5"], {}),
    ("cam-samples-0", "cam", ["--samples", "0", "--out", "{root}/new6"], {}),
    ("cam-alpha", "cam", ["--alpha", "3", "--out", "{root}/new7"], {}),
    ("cam-answer-empty", "cam", ["--answer", "", "--out", "{root}/new8"], {}),
    ("generate-json-is-dir", "generate", ["--json", "{root}/foreign"], {}),
    ("generate-json-under-file", "generate", ["--json", "{root}/a_file/x.json"], {}),
    ("generate-json-exists", "generate", ["--json", "{root}/a_file"], {}),
    ("generate-keep-without-layer", "generate", ["--keep", "5"], {}),
    ("generate-rank-without-layer", "generate", ["--rank", "random"], {}),
    ("generate-max-new-0", "generate", ["--max-new-tokens", "0"], {}),
    ("generate-prune-layer-range", "generate", ["--prune-layer", "99"], {}),
    ("generate-attention-rank-layer-0", "generate", ["--prune-layer", "0", "--keep", "5"], {}),
    ("generate-image-dir", "generate", [], {"--image": "{root}/imgdir"}),
    ("generate-image-missing", "generate", [], {"--image": "{root}/nope.png"}),
    ("generate-image-not-image", "generate", [], {"--image": "{root}/a_file"}),
    ("generate-model-missing", "generate", [], {"--model": "{root}/no-model"}),
    ("generate-model-is-file", "generate", [], {"--model": "{root}/a_file"}),
    ("generate-model-corrupt", "generate", [], {"--model": "{root}/corrupt"}),
    ("generate-model-uncached-hub-id", "generate", [], {"--model": "nobody/not-a-model"}),
]


@pytest.mark.parametrize("name,command,extra,replace", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_exit_2_one_line_nothing_written(files, capsys, name, command, extra, replace):
    argv = _model_args(files, command)
    for flag, value in replace.items():
        argv[argv.index(flag) + 1] = value.format(root=files)
    argv += [a.format(root=files) for a in extra]
    before = sorted(p.relative_to(files) for p in files.rglob("*"))
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("flowkern ")]
    assert rc == 2, err
    assert len(lines) == 1 and ": error: " in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.relative_to(files) for p in files.rglob("*")) == before  # nothing written anywhere


def test_previous_result_needs_overwrite_and_is_replaced_whole(files, capsys):
    out = files / "runs" / "flow"
    argv = [*_model_args(files, "flow"), "--layers", "0", "--out", str(out)]
    assert main(argv) == 0
    manifest = json.loads((out / _io.MANIFEST).read_text())
    assert set(manifest["files"]) == {"shares.json", "shares.csv", "shares.png", "image_attention.png"}
    assert manifest["command"] == "flowkern flow"
    (out / "stale.txt").write_text("from an older run\n")
    capsys.readouterr()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()  # replaced as a whole: never two runs mixed
    assert not list(out.parent.glob(".flow.*"))  # no temporary folder left


def test_generate_json_written_atomically_and_validated_first(files, capsys):
    target = files / "runs" / "gen.json"
    assert main([*_model_args(files, "generate"), "--json", str(target)]) == 0
    record = json.loads(target.read_text())
    assert record["new_tokens"] == 2
    capsys.readouterr()
    assert main([*_model_args(files, "generate"), "--json", str(target)]) == 2
    assert main([*_model_args(files, "generate"), "--json", str(target), "--overwrite"]) == 0


def test_position_range_warning(tmp_path, capsys):
    save_llava(tmp_path / "short", max_position_embeddings=24)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    rc = main(["generate", "--model", str(tmp_path / "short"), "--image", str(tmp_path / "red.png"), "--prompt",
               PROMPT, "--device", "cpu", "--max-new-tokens", "8"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "warning" in err and "max_position_embeddings=24" in err


# ----------------------------------------------------------------------------------------------------------
# the Python API: values that used to be accepted


def test_api_rejects_bad_values(files):
    model, processor = load_model(files / "llava")
    inputs = build_inputs(processor, model, files / "photo.png", PROMPT)
    for kwargs, match in [
        (dict(noise_std=float("inf")), "noise_std"),
        (dict(noise_std=float("nan")), "noise_std"),
        (dict(samples=2.7), "samples"),
        (dict(batch_size=True), "batch_size"),
        (dict(answer_ids=[1, 10**6], noise_std=0.0), "outside the vocabulary"),
        (dict(answer_ids=[-1], noise_std=0.0), "outside the vocabulary"),
        (dict(answer_ids=torch.tensor([1.5]), noise_std=0.0), "integer token ids"),
    ]:
        with pytest.raises(ValueError, match=match):
            flowkern.cam(model, inputs, processor=processor, **kwargs)


def test_trace_refuses_right_padding(files):
    model, processor = load_model(files / "llava")
    a = build_inputs(processor, model, files / "photo.png", PROMPT)
    ids = a["input_ids"]
    right = torch.cat([ids, torch.zeros(1, 3, dtype=ids.dtype)], 1)
    batch = dict(a, input_ids=torch.cat([right, torch.cat([ids, ids[:, -3:]], 1)]),
                 attention_mask=torch.cat([torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=ids.dtype)], 1),
                                           torch.ones(1, ids.shape[1] + 3, dtype=ids.dtype)]),
                 pixel_values=a["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="left padding"):
        with torch.no_grad(), flowkern.trace(model):
            model(**batch)


# ----------------------------------------------------------------------------------------------------------
# interrupts: a real subprocess, SIGINT and SIGKILL at spread-out moments


@pytest.mark.parametrize("bar", ["none", "drawn", "tqdm", "closed"])
def test_messages_start_a_line_of_their_own(monkeypatch, capsys, bar):
    """Ctrl-C while a progress bar's line is unfinished (drawn, or its close() cut short before the newline): the
    message still starts a line of its own; with the line already ended, no blank line is added."""
    from tqdm import tqdm

    import flowkern.cli.info as info

    def run(args):
        if bar == "drawn":
            sys.stderr.write("\r 50%|#####     | 1/2 [00:01<00:01]")
        elif bar in ("tqdm", "closed"):
            progress = tqdm(total=2, mininterval=0, desc="work")
            progress.update(1)
            if bar == "closed":
                progress.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", run)
    stderr = sys.stderr
    assert main(["info"]) == 130
    assert sys.stderr is stderr  # put back
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if "interrupted" in ln] == ["flowkern info: interrupted"], repr(err)
    assert "\nflowkern info: interrupted\n" in err or err.startswith("flowkern info: interrupted\n")
    assert "\n\n" not in err, repr(err)  # the line was ended once, not twice



def _cam_cmd(files: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flowkern.cli", "cam", "--model", str(files / "llava"), "--image",
            str(files / "photo.png"), "--prompt", PROMPT, "--device", "cpu", "--max-new-tokens", "2", "--samples",
            "2", "--batch-size", "2", "--out", str(out), *extra]


def _folder_is_whole(out: Path) -> bool:
    manifest = json.loads((out / _io.MANIFEST).read_text())
    names = {p.name for p in out.iterdir()} - {_io.MANIFEST, outdir.LOCK_FILE}  # a killed run's unlocked lock file
    return names == set(manifest["files"]) and all((out / n).stat().st_size == s for n, s in manifest["files"].items())


def _signal_when(cmd: list[str], env: dict, marker: str, sig: int, delay: float) -> tuple[int, str]:
    """Run ``cmd``; once ``marker`` appears on its stderr (plus ``delay`` s) send ``sig``; return (rc, stderr)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while marker not in seen:
        ch = proc.stderr.read(1)
        if not ch:
            break
        seen += ch
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    rest = proc.stderr.read()
    proc.wait(timeout=300)
    return proc.returncode, seen + rest


def test_interrupted_and_killed_runs_leave_the_old_result_or_the_new_one(files):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = files / "runs" / "cam"
    done = subprocess.run(_cam_cmd(files, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _folder_is_whole(out)
    first = json.loads((out / _io.MANIFEST).read_text())
    outcomes, kept_old = [], []
    # while the model computes (the progress bar appears), and while the files are written (the bar is full)
    for sig, marker, delay in [(signal.SIGINT, "0/1", 0.0), (signal.SIGINT, "100%", 0.0),
                               (signal.SIGINT, "100%", 0.1), (signal.SIGKILL, "100%", 0.05)]:
        rc, err = _signal_when(_cam_cmd(files, out, "--overwrite", "--seed", "1"), env, marker, sig, delay)
        outcomes.append(rc)
        assert _folder_is_whole(out)  # always a complete folder: the previous run's or this one's, never a mix
        now = json.loads((out / _io.MANIFEST).read_text())
        kept_old.append(rc != 0 and now == first)  # else it finished (or was stopped after its rename): complete
        first = now
        if sig == signal.SIGINT and rc != 0:
            assert rc == 130, err
            assert "Traceback" not in err and "KeyboardInterrupt" not in err
            assert [ln for ln in err.splitlines() if "interrupted" in ln] == ["flowkern cam: interrupted"]
    assert any(kept_old), f"no run was stopped before its result was in place ({outcomes}): the test is void"
    # a killed run's temporary folder is removed by the next run into the same place
    assert subprocess.run(_cam_cmd(files, out, "--overwrite"), env=env, capture_output=True).returncode == 0
    assert not list(out.parent.glob(".cam.tmp-*"))


@pytest.mark.parametrize("interrupted", [True, False])
def test_an_import_error_raised_by_ctrl_c_is_an_interrupt(monkeypatch, capsys, interrupted):
    # a SIGINT inside a C extension's import (matplotlib's ft2font) surfaces as "ImportError: initialization
    # failed" raised from the KeyboardInterrupt: the command must still exit 130 with its one line
    import flowkern.cli.info as info

    def run(_args):
        try:
            raise KeyboardInterrupt if interrupted else OSError("disk")
        except BaseException as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(info, "run", run)
    if interrupted:
        assert main(["info"]) == 130
        err = capsys.readouterr().err
        assert [ln for ln in err.splitlines() if ln.strip()] == ["flowkern info: interrupted"]
    else:  # any other error is not hidden
        with pytest.raises(ImportError):
            main(["info"])


@pytest.mark.parametrize("code", [0, 2, 130])
def test_entry_leaves_an_interrupted_run_without_finalization(monkeypatch, code):
    # exit 130: flush, then os._exit (a native library's at-exit teardown once aborted an interrupted run with
    # "Fatal Python error: PyThreadState_Get", exit -6); every other code leaves through sys.exit as usual
    import flowkern.cli as cli

    flushed, left = [], []

    class Stream:
        def __init__(self, name: str) -> None:
            self.name = name

        def flush(self) -> None:
            flushed.append(self.name)

    def fake_exit(status: int) -> None:
        left.append(status)
        raise SystemExit("os._exit")

    monkeypatch.setattr(cli, "main", lambda: code)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(cli.sys, "stdout", Stream("stdout"))
    monkeypatch.setattr(cli.sys, "stderr", Stream("stderr"))
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as leaving:
            cli.entry()
    finally:
        signal.signal(signal.SIGINT, previous)
    if code == 130:
        assert left == [130] and flushed == ["stdout", "stderr"] and leaving.value.code == "os._exit"
    else:
        assert left == [] and leaving.value.code == code
