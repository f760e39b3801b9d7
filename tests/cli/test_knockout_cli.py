"""``flowkern knockout`` (flowkern/eval/sweep/knockout.py on the sweep engine, flowkern/cli/knockout.py) on a tiny
LLaVA saved in the official format: every point's answers equal an independent ``generate`` under
``flowkern.knockout`` (and the shared-prefix run equals ``--no-reuse``), the probability fields and curves follow
their definitions, a rerun resumes without work, other settings and bad edges are refused with one line (exit 2),
torchrun with 2 gloo processes writes the same files as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flowkern
from flowkern.cli import main
from flowkern.eval import get_task
from flowkern.eval.sweep.knockout import KnockoutConfig, default_window, run_knockout
from flowkern.hf.inputs import build_inputs
from flowkern.hf.loading import load_model
from tests.fixtures import write_llava_pope

REPO = Path(__file__).resolve().parents[2]
EDGES = ("image->last", "user->last")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LLaVA (4 text layers) and 6 POPE questions on 4 images."""
    root = tmp_path_factory.mktemp("knockout")
    return write_llava_pope(root)


@pytest.fixture(scope="module")
def llava(files):
    return load_model(files / "llava", device="cpu")


def _argv(files: Path, out: Path, *extra: str) -> list[str]:
    return ["knockout", "--model", str(files / "llava"), "--task", "pope", "--data", str(files / "pope"), "--images",
            str(files / "val2014"), "--max-new-tokens", "3", "--batch-size", "2", "--device", "cpu", "--out", str(out),
            "--edges", ",".join(EDGES), "--window", "2", "--layers", "0,2", *extra]


def _config(files: Path, out: Path, **extra) -> KnockoutConfig:
    return KnockoutConfig(model=str(files / "llava"), task="pope", data=str(files / "pope"),
                          images=str(files / "val2014"), out=out, max_new_tokens=3, batch_size=2, device="cpu",
                          edges=EDGES, window=2, layers=[0, 2], **extra)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_default_window_scales_the_cvpr_nine_of_32():
    assert [default_window(n) for n in (32, 40, 8, 4, 1)] == [9, 11, 2, 1, 1]


def test_points_equal_independent_knockout_runs(files, llava, tmp_path, capsys):
    out = tmp_path / "ko"
    assert main(_argv(files, out)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["window"] == 2
    model, processor = llava
    task = get_task("pope", files / "pope", files / "val2014")
    samples = task.samples
    base = {r["question_id"]: r for r in _lines(out / "points" / "baseline" / "answers.jsonl")}
    for edge in EDGES:
        for start in (0, 2):
            name = f"{edge.replace('->', '-')}-L{start:02d}"
            got = _lines(out / "points" / name / "answers.jsonl")
            assert [r["question_id"] for r in got] == [s.id for s in samples]
            for i in range(0, len(samples), 2):
                batch = samples[i:i + 2]
                inputs = build_inputs(processor, model, [s.image for s in batch], [s.prompt for s in batch])
                with torch.no_grad():
                    plain = model(**inputs).logits[:, -1].softmax(-1)
                    with flowkern.knockout(model, [tuple(edge.split("->"))], layers=range(start, start + 2)):
                        res = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                             return_dict_in_generate=True)
                texts = processor.batch_decode(res.sequences[:, inputs["input_ids"].shape[1]:],
                                               skip_special_tokens=True)
                probs = res.logits[0].softmax(-1)
                for b, rec in enumerate(got[i:i + 2]):
                    assert rec["text"] == texts[b].strip()
                    t = rec["answer_token"]
                    assert t == int(plain[b].argmax())
                    assert rec["p_answer"] == pytest.approx(float(probs[b, t]), abs=1e-5)
                    assert rec["p_unblocked"] == pytest.approx(float(plain[b, t]), abs=1e-5)
                    assert base[rec["question_id"]]["p_answer"] == pytest.approx(rec["p_unblocked"], abs=1e-6)
    table = json.loads((out / "knockout.json").read_text())
    assert table["window"] == 2 and table["edges"] == list(EDGES)
    for edge in EDGES:
        for start in ("0", "2"):
            recs = _lines(out / "points" / f"{edge.replace('->', '-')}-L0{start}" / "answers.jsonl")
            expect = 100 * sum(r["p_answer"] / r["p_unblocked"] - 1 for r in recs) / len(recs)
            assert table["curves"][edge][start]["p_change"] == pytest.approx(expect, abs=1e-9)
    assert (out / "knockout.png").stat().st_size > 0
    assert (out / "knockout.csv").read_text().count("\n") == 1 + 4
    assert json.loads((out / "sweep.json").read_text())["settings"]["knockout"] == {"edges": list(EDGES), "window": 2}

    # the shared prefix changes nothing
    model_out = run_knockout(_config(files, tmp_path / "noreuse", reuse=False), model=model, processor=processor)
    for rec in _lines(out / "results.jsonl"):
        a = (out / rec["answers"]).read_text().splitlines()
        b = (tmp_path / "noreuse" / rec["answers"]).read_text().splitlines()
        assert [json.loads(x)["text"] for x in a] == [json.loads(x)["text"] for x in b]
        for x, y in zip(a, b, strict=True):
            assert json.loads(x)["p_answer"] == pytest.approx(json.loads(y)["p_answer"], abs=1e-6)
    assert model_out.generated == 6 * 5

    # a rerun resumes: nothing to answer, same curves
    again = run_knockout(_config(files, out), model=model, processor=processor)
    assert again.generated == 0
    assert json.loads((out / "knockout.json").read_text())["curves"] == table["curves"]


def test_refusals_are_one_line(files, tmp_path, capsys):
    out = tmp_path / "ko"
    assert main(_argv(files, out, "--limit", "2")) == 0
    capsys.readouterr()
    argv = _argv(files, out, "--limit", "2")
    argv[argv.index("--edges") + 1] = "image->user"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--edges" in err and "--out" in err
    for bad, needle in ((["--edges", "image->answer"], "--edges"), (["--window", "0"], "--window"),
                        (["--window", "9"], "--window"), (["--layers", "3"], "--layers")):
        argv = _argv(files, tmp_path / "bad")
        for flag, value in zip(bad[::2], bad[1::2], strict=True):
            argv[argv.index(flag) + 1] = value
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
    assert not (tmp_path / "bad" / "points").exists()


def test_torchrun_two_gloo_ranks_equal_one_process(files, llava, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flowkern.cli",
           *_argv(files, out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, processor = llava
    run_knockout(_config(files, tmp_path / "one"), model=model, processor=processor)
    for rec in _lines(tmp_path / "one" / "results.jsonl"):
        a, b = _lines(out / rec["answers"]), _lines(tmp_path / "one" / rec["answers"])
        assert [x["text"] for x in a] == [x["text"] for x in b], rec["point"]
        for x, y in zip(a, b, strict=True):
            assert x["p_answer"] == pytest.approx(y["p_answer"], abs=1e-6)
    assert json.loads((out / "knockout.json").read_text())["edges"] == list(EDGES)
