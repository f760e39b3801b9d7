"""``flowkern compare`` (flowkern/eval/sweep/compare.py and compare_engine.py on the sweep engine,
flowkern/cli/compare.py) on a tiny LLaVA saved in the official format: the points' answers equal independent
``flowkern.prune`` runs, each answer line's measurements follow their definitions (kept tokens, tokens per layer,
FLOPs), the summaries and figures are written, a rerun after a simulated kill answers only what is missing, other
methods / budgets and bad options are refused with one line (exit 2) before any work, and torchrun with 2 gloo
processes writes the answers of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import flowkern
from flowkern.cli import main
from flowkern.eval import get_task
from flowkern.eval.sweep.compare import (
    CompareConfig,
    Method,
    keep_maps,
    parse_budgets,
    parse_method,
    point_of,
    run_compare,
)
from flowkern.eval.sweep.compare_engine import generate_counted, layer_tokens
from flowkern.eval.sweep.points import SweepUsageError
from flowkern.flops import DecoderShape, answer_flops
from flowkern.hf.inputs import build_inputs
from flowkern.hf.loading import load_model
from flowkern.plan import PruneSpec
from tests.fixtures import write_llava_pope

REPO = Path(__file__).resolve().parents[2]
METHODS = ("fastv=attention@1", "random@2", "grid=grid@1")
POINTS = ["baseline"] + [f"{m}-keep{b}" for m in ("fastv", "random-L2", "grid") for b in ("0.5", "0.25")]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LLaVA (4 text layers, 16 image tokens on a 4 x 4 grid) and 6 POPE questions on 4 images."""
    root = tmp_path_factory.mktemp("compare")
    return write_llava_pope(root)


@pytest.fixture(scope="module")
def llava(files):
    return load_model(files / "llava", device="cpu")


@pytest.fixture(scope="module")
def first_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("first") / "cmp"
    assert main(_argv(files, out)) == 0
    return out


def _argv(files: Path, out: Path, *extra: str, methods: tuple[str, ...] = METHODS,
          budgets: str = "0.5,0.25") -> list[str]:
    return ["compare", "--model", str(files / "llava"), "--task", "pope", "--data", str(files / "pope"), "--images",
            str(files / "val2014"), "--max-new-tokens", "3", "--batch-size", "2", "--device", "cpu", "--out", str(out),
            *extra, "--budgets", budgets, "--methods", *methods]


def _config(files: Path, out: Path, **extra) -> CompareConfig:
    return CompareConfig(model=str(files / "llava"), task="pope", data=str(files / "pope"),
                         images=str(files / "val2014"), out=out, max_new_tokens=3, batch_size=2, device="cpu",
                         methods=METHODS, budgets=(0.5, 0.25), **extra)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# pure parts


def test_method_syntax_budgets_and_schedule_scaling():
    m = parse_method("pdrop=attention@2:0.5,8:0.25+merge")
    assert (m.name, m.rank, m.layer, m.schedule, m.merge) == ("pdrop", "attention", None, ((2, 0.5), (8, 0.25)), True)
    assert m.text == "attention@2:0.5,8:0.25+merge"
    spec = m.spec(0.1, seed=3)
    assert spec.schedule == ((2, 0.2), (8, 0.1)) and spec.merge and spec.seed == 3 and spec.rank == "attention"
    assert m.spec(0.75).schedule == ((2, 1.0), (8, 0.75))  # capped at 1
    assert parse_method("random@-1").resolved(4) == Method("random-L-1", "random", 3)
    assert parse_method("grid@1").spec(0.25) == PruneSpec(layer=1, keep=0.25, rank="grid")
    assert parse_budgets("0.1,50%,0.25,0.1") == (0.5, 0.25, 0.1)
    for bad in ("fastv=attention", "x=nosuch@1", "a b=grid@1", "x=grid@two", "x=grid@1:4,2:0.5", "x=grid@1:0.5,1:0.2"):
        with pytest.raises(SweepUsageError, match="--methods"):
            parse_method(bad)
    for bad in ("1.5", "0", "x", ""):
        with pytest.raises(SweepUsageError, match="--budgets"):
            parse_budgets(bad)
    with pytest.raises(SweepUsageError, match="needs layer >= 1"):
        parse_method("attention@0").resolved(4)


def test_points_carry_their_spec_and_share_what_they_may():
    """A compare point is the engine's point of its whole PruneSpec: named by method and budget, first stage as its
    layer; the layers it may share with the unpruned prefill stop one early for a scorer reading layer L-1."""
    p = point_of(parse_method("p=attention@1:0.5,3:0.25"), 0.25, 7)
    assert (p.name, p.layer, p.spec.schedule, p.spec.seed) == ("p-keep0.25", 1, ((1, 0.5), (3, 0.25)), 7)
    assert p.depth() == 0
    assert point_of(parse_method("r=random@2"), 0.5, 0).depth() == 2
    assert point_of(parse_method("g=grid@3+merge"), 0.1, 0).spec == PruneSpec(layer=3, keep=0.1, rank="grid",
                                                                              merge=True)


def test_layer_tokens_and_keep_maps(tmp_path):
    assert layer_tokens(4, 30, 16, [(1, 0.25)], 4) == [30, 18, 18, 18]
    assert layer_tokens(5, 30, 16, [(1, 0.5), (3, 0.25)], 4) == [30, 22, 22, 18, 18]
    # a 2 x 2 grid with its top-left cell kept maps onto the common 4 x 4 one as its top-left quarter
    from flowkern.eval.sweep.compare import bits

    path = tmp_path / "answers.jsonl"
    small = {"shape": [2, 2], "kept": bits([1, 0, 0, 0]), "present": bits([1, 1, 1, 1])}
    big = {"shape": [4, 4], "kept": bits([1] * 16), "present": bits([1] * 16)}
    path.write_text("".join(json.dumps({"grid": g}) + "\n" for g in (small, big, big)))
    maps = keep_maps({"m": path})
    assert maps["shape"] == [4, 4]
    assert maps["maps"]["m"][0][:2] == [1.0, 1.0] and maps["maps"]["m"][3][3] == pytest.approx(2 / 3, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# a run


def test_run_answers_measurements_and_files(files, llava, first_run, tmp_path):
    out = first_run
    for name in ("compare.csv", "compare.json", "compare.png", "compare_maps.png", "results.jsonl", "sweep.json"):
        assert (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "points").iterdir()) == sorted(POINTS)
    model, processor = llava
    shape = DecoderShape.from_config(model.config)
    samples = get_task("pope", files / "pope", files / "val2014").samples
    for point, spec in (("baseline", PruneSpec()), ("fastv-keep0.25", PruneSpec(layer=1, keep=0.25)),
                        ("random-L2-keep0.5", PruneSpec(layer=2, keep=0.5, rank="random"))):
        got = _lines(out / "points" / point / "answers.jsonl")
        assert [r["question_id"] for r in got] == [s.id for s in samples]
        for i in range(0, len(samples), 2):
            batch = samples[i:i + 2]
            inputs = build_inputs(processor, model, [s.image for s in batch], [s.prompt for s in batch])
            listener = flowkern.prune(model, spec) if spec.enabled else flowkern.timer.ForwardTimer(model)
            texts, counts = generate_counted(model, processor, inputs, 3, listener)
            for b, rec in enumerate(got[i:i + 2]):
                real = int(inputs["attention_mask"][b].sum())
                kept = 16 if not spec.enabled else round(16 * spec.keep)
                tokens = [real] * 4 if not spec.enabled else layer_tokens(4, real, 16, spec.stages, kept)
                assert (rec["text"], rec["new_tokens"]) == (texts[b], counts[b])
                assert (rec["image_tokens"], rec["kept_image_tokens"], rec["layer_tokens"]) == (16, kept, tokens)
                assert rec["flops"] == answer_flops(shape, tokens, counts[b])
                assert rec["prefill_seconds"] > 0 and rec["decode_tokens"] == 2
    table = json.loads((out / "compare.json").read_text())
    base = table["baseline"]
    assert base["kept_image_tokens"] == 16 and base["point"] == "baseline"
    for rec in table["points"]:
        lines = _lines(out / rec["answers"])
        assert rec["flops_per_answer"] == pytest.approx(sum(x["flops"] for x in lines) / 6)
        assert rec["flops_per_answer"] < base["flops_per_answer"] or rec["method"] == "random-L2"
        assert rec["prefill_seconds"] == pytest.approx(sum(x["prefill_seconds"] for x in lines))
        assert rec["decode_tokens_per_second"] == pytest.approx(
            sum(x["decode_tokens"] for x in lines) / sum(x["decode_seconds"] for x in lines))
        assert rec["kept_image_tokens"] == 16 * rec["budget"]
    assert table["map_budget"] == 0.25 and table["maps"]["shape"] == [4, 4]
    grid = table["maps"]["maps"]["grid"]  # the grid control keeps every other row and column
    assert [[v for v in row] for row in grid] == [[1.0, 0.0, 1.0, 0.0], [0.0] * 4, [1.0, 0.0, 1.0, 0.0], [0.0] * 4]
    rows = (out / "compare.csv").read_text().splitlines()
    assert len(rows) == 1 + 7 and rows[0].startswith("point,method,scorer,stages")
    settings = json.loads((out / "sweep.json").read_text())["settings"]
    assert settings["methods"] == {"fastv": "attention@1", "random-L2": "random@2", "grid": "grid@1"}
    assert settings["budgets"] == [0.5, 0.25]

    # sharing work between points changes no answer
    model_out = run_compare(_config(files, tmp_path / "reuse", reuse=True), model=model, processor=processor)
    assert model_out.generated == 7 * 6
    for name in POINTS:
        a, b = _lines(out / "points" / name / "answers.jsonl"), _lines(tmp_path / "reuse" / "points" / name /
                                                                        "answers.jsonl")
        assert [(x["text"], x["flops"], x["grid"]) for x in a] == [(x["text"], x["flops"], x["grid"]) for x in b]


def test_resume_after_a_simulated_kill(files, llava, first_run, tmp_path):
    import shutil

    out = tmp_path / "killed"
    shutil.copytree(first_run, out)
    # a kill mid-run: two points have only their first batch, one has a torn line, nothing was summarised yet
    for name, keep in (("fastv-keep0.25", 2), ("grid-keep0.5", 0)):
        path = out / "points" / name / "answers.jsonl"
        path.write_text("".join(x + "\n" for x in path.read_text().splitlines()[:keep]))
    torn = out / "points" / "random-L2-keep0.5" / "answers.jsonl"
    lines = torn.read_text().splitlines()
    torn.write_text("".join(x + "\n" for x in lines[:4]) + lines[4][:20])
    for name in ("compare.csv", "compare.json", "compare.png", "compare_maps.png", "results.jsonl"):
        (out / name).unlink()
    model, processor = llava
    resumed = run_compare(_config(files, out), model=model, processor=processor)
    assert resumed.generated == 4 + 6 + 2
    for name in POINTS:
        a, b = _lines(out / "points" / name / "answers.jsonl"), _lines(first_run / "points" / name / "answers.jsonl")
        assert [(x["question_id"], x["text"], x["flops"]) for x in a] == [
            (x["question_id"], x["text"], x["flops"]) for x in b], name
    assert (out / "compare.png").is_file()
    again = run_compare(_config(files, out), model=model, processor=processor)
    assert again.generated == 0


def test_other_settings_and_bad_options_are_one_line_refusals(files, first_run, tmp_path, capsys):
    for argv, flag in ((_argv(files, first_run, budgets="0.5"), "--budgets"),
                       (_argv(files, first_run, methods=("fastv=attention@2",)), "--methods")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and flag in err and "--out" in err, err
    bad = tmp_path / "bad"
    for argv, needle in ((_argv(files, bad, methods=("fastv=attention",)), "--methods"),
                         (_argv(files, bad, methods=("x=nosuch@1",)), "--methods"),
                         (_argv(files, bad, methods=("a=random@1", "a=grid@1")), "--methods"),
                         (_argv(files, bad, methods=("a=random@9",)), "--methods"),
                         (_argv(files, bad, methods=("a=attention@0",)), "--methods"),
                         (_argv(files, bad, budgets="1.5"), "--budgets"),
                         (_argv(files, bad, "--map-budget", "0.3"), "--map-budget"),
                         (_argv(files, bad, "--batch-size", "0"), "--batch-size")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
    assert not bad.exists()


def test_torchrun_two_gloo_ranks_equal_one_process(files, first_run, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flowkern.cli",
           *_argv(files, out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any((out / ".shards").glob("rank*/points/*/answers.jsonl"))
    for name in POINTS:
        a, b = _lines(out / "points" / name / "answers.jsonl"), _lines(first_run / "points" / name / "answers.jsonl")
        assert [(x["question_id"], x["text"], x["flops"], x["grid"]) for x in a] == [
            (x["question_id"], x["text"], x["flops"], x["grid"]) for x in b], name
    one, two = json.loads((first_run / "compare.json").read_text()), json.loads((out / "compare.json").read_text())
    assert [(r["point"], r["value"], r["flops_per_answer"]) for r in two["points"]] == [
        (r["point"], r["value"], r["flops_per_answer"]) for r in one["points"]]
    assert two["maps"] == one["maps"]
