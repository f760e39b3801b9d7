"""``flowkern demo``: the quick run end to end on the shipped model, every file it promises, a report that is well
formed, references only files that exist and renders in a real headless browser, and the usual argument errors and
interrupt safety; then the words, tables, JSON and page computed from hand-built records (no model run)."""

from __future__ import annotations

import base64
import contextlib
import csv
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowkern import _io
from flowkern.cli import main
from flowkern.demo.report import config, methods, render, stages, tables, words
from flowkern.demo.report.records import (
    Conclusion,
    DemoSummary,
    Environment,
    Example,
    ExampleCam,
    FigureRecord,
    FlowResult,
    ModelFacts,
    Settings,
    SpeedRow,
    TaskResult,
    finite,
)

TASK_WORLDS = [t.world for t in config.TASKS]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``flowkern demo --quick`` once for the module: (folder, stdout, stderr)."""
    out = tmp_path_factory.mktemp("demo") / "runs" / "demo"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["demo", "--quick", "--out", str(out)])
    assert rc == 0, stderr.getvalue()[-3000:]
    return out, stdout.getvalue(), stderr.getvalue()


def expected_files(keep: int = 16) -> list[str]:
    names = ["report.html", "summary.json", _io.MANIFEST, "tables/examples.json"]
    figures = ["attention_shares", "image_share", "truncation_all", "speed", "lens_answer", "unguided_share",
               "head_shares", "segment_flow", f"lens_grid_{TASK_WORLDS[0]}"]
    for w in TASK_WORLDS:
        figures += [f"attention_maps_{w}", f"cam_{w}", f"truncation_{w}"]
        for folder in (f"sweeps/{w}", f"sweeps/{w}-keep{keep}"):
            names += [f"{folder}/{n}" for n in ("cliff.json", "summary.csv", "results.jsonl", "sweep.png")]
            names.append(f"{folder}/points/baseline/answers.jsonl")
        names += [f"sweeps/{w}-methods/results.jsonl", f"sweeps/{w}-methods/points/baseline/answers.jsonl",
                  f"sweeps/{w}-methods/points/grid_attention-keep0.125/answers.jsonl"]
    figures += ["methods_budget", "methods_maps"]
    names += [f"figures/{f}.png" for f in figures]
    names += [f"tables/{t}.{ext}" for t in ("shares", "truncation", "cliff", "table1", "speed", "lens", "heads",
                                            "methods") for ext in ("csv", "json")]
    return names


# ----------------------------------------------------------------------------------------------------------
# the quick run


def test_quick_run_writes_every_file(quick):
    out, stdout, stderr = quick
    missing = [n for n in expected_files() if not (out / n).is_file()]
    assert not missing
    for png in out.glob("figures/*.png"):
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.width >= 300 and im.height >= 150, png
            assert np.asarray(im.convert("L")).std() > 5, f"{png} is blank"
    for name in ("shares", "truncation", "cliff", "table1", "speed", "methods"):
        rows = list(csv.reader((out / "tables" / f"{name}.csv").open()))
        records = json.loads((out / "tables" / f"{name}.json").read_text())
        assert len(rows) - 1 == len(records) >= 1
        assert list(records[0]) == rows[0]
    manifest = json.loads((out / _io.MANIFEST).read_text())
    assert manifest["command"] == "flowkern demo"
    assert set(manifest["files"]) == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {
        _io.MANIFEST}
    assert not list(out.parent.glob(".demo.tmp-*")), "temporary folder left behind"
    # progress bars and stage lines on stderr; the headline as JSON on the last stdout line
    assert "[4/8] truncation sweeps" in stderr and "[6/8] pruning methods" in stderr
    assert "[8/8] writing the report" in stderr and "trace:" in stderr
    headline = json.loads(stdout.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert headline == json.loads(json.dumps(summary["headline"]))
    assert summary["settings"]["quick"] is True


def test_numbers_agree_with_the_sweep_files(quick):
    out, _, _ = quick
    summary = json.loads((out / "summary.json").read_text())
    num_layers = summary["model"]["num_layers"]
    assert summary["model"]["image_tokens"] == 64 and num_layers == 8
    for w, s in summary["tasks"].items():
        cliff = json.loads((out / "sweeps" / w / "cliff.json").read_text())
        assert s["cliff_layer"] == cliff["cliff_layer"]
        assert s["baseline"] == pytest.approx(cliff["baseline"])
        assert set(s["curve"]) == {str(i) for i in range(num_layers)}  # every layer, k = 0
        # keep 16 ranked by attention and its random control: layers 1.. (layer 0 has no earlier layer to rank by)
        assert {int(k) for k in s["random_k"]} == {int(k) for k in s["attention_k"]} == set(range(1, num_layers))
        assert s["no_image"] == pytest.approx(cliff["curve"]["0"])
        assert s["tolerance"] == pytest.approx(max(1.0, 100.0 / s["n"]))
        assert len(s["shares"]) == num_layers and all(abs(sum(r) - 1) < 1e-3 for r in s["shares"])
        scored = json.loads((out / "sweeps" / w / "points" / "baseline" / "metrics.json").read_text())
        assert scored[s["metric"]] == pytest.approx(s["baseline"])
        assert summary["headline"]["cliff"][s["label"]] == s["cliff_layer"]
    table1 = json.loads((out / "tables" / "table1.json").read_text())
    pope = summary["tasks"]["pope"]
    f1 = next(r for r in table1 if r["dataset"] == "shapes-POPE" and r["metric"].startswith("F1"))
    assert f1["baseline"] == pytest.approx(100 * pope["baseline_metrics"]["f1"], abs=0.01)
    for r in summary["speed"]:
        assert r["unpruned_prefill_ms"] > 0 and r["pruned_prefill_ms"] > 0
        assert r["prefill_speedup"] == pytest.approx(r["unpruned_prefill_ms"] / r["pruned_prefill_ms"])
        assert r["layer"] >= 1 and (r["cliff_layer"] is None or r["layer"] == max(1, r["cliff_layer"]))
    assert {c["verdict"] for c in summary["conclusions"]} <= set(words.VERDICTS)
    # the methods section: every built-in scorer ran on the demo model, its numbers are the compare points'
    compared = summary["methods"]
    assert list(compared["methods"]) == list(methods.BUILT_INS) and not compared["skipped"]
    assert compared["methods"]["attention"] == "attention@2" and compared["methods"]["cls"] == "cls@0"
    for w, t in compared["tasks"].items():
        lines = (out / "sweeps" / f"{w}-methods" / "results.jsonl").read_text().splitlines()
        results = {r["point"]: r for r in map(json.loads, lines)}
        assert len(results) == 1 + len(methods.BUILT_INS) * len(methods.BUDGETS)
        assert t["baseline"] == results["baseline"]["value"] and t["n"] == results["baseline"]["n"]
        for rank, vals in t["values"].items():
            for b in methods.BUDGETS:
                point = results[f"{rank.replace('+', '_')}-keep{b:g}"]
                assert vals[str(b)] == point["value"] and point["n"] == t["n"]
                assert t["kept"][rank][str(b)] == pytest.approx(64 * b)
    assert {methods.TOPIC, methods.BIAS_TOPIC} <= {c["topic"] for c in summary["conclusions"]}


class _Checker(html.parser.HTMLParser):
    """Well-formedness: every non-void element closed in order; collects ids, references and the doctype."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.refs: list[tuple[str, str]] = []
        self.doctype = ""
        self.counts: dict[str, int] = {}

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("src", "href"):
            if key in a:
                self.refs.append((tag, a[key]))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def test_report_is_well_formed_and_references_only_files_that_exist(quick):
    out, _, _ = quick
    text = (out / "report.html").read_text(encoding="utf-8")
    p = _Checker()
    p.feed(text)
    p.close()
    assert p.doctype.lower() == "doctype html"
    assert not p.errors and not p.stack
    assert p.counts.get("html") == p.counts.get("head") == p.counts.get("body") == p.counts.get("title") == 1
    assert '<meta charset="utf-8">' in text
    assert len(p.ids) == len(set(p.ids)), "duplicate ids"
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", text), "external resource"
    images = [ref for tag, ref in p.refs if tag == "img"]
    assert len(images) == len(list(out.glob("figures/*.png")))  # every figure is in the report
    for tag, ref in p.refs:
        if ref.startswith("data:"):
            assert ref.startswith("data:image/png;base64,")
            data = base64.b64decode(ref.split(",", 1)[1], validate=True)
            Image.open(io.BytesIO(data)).verify()
        elif ref.startswith("#"):
            assert ref[1:] in p.ids, ref
        else:
            assert not os.path.isabs(ref) and ".." not in Path(ref).parts, ref
            assert (out / ref).is_file(), f"{tag} references {ref}, which does not exist"
    for name in ("summary.json", "tables/cliff.csv", "tables/table1.csv", "figures/truncation_all.png"):
        assert f'href="{name}"' in text


def _run_browser(browser: str, args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_browser() is None and os.environ.get("FLOWKERN_REQUIRE_BROWSER") != "1",
                    reason="no Chromium/Chrome installed (apt-get install chromium); .ci/run installs one")
def test_report_renders_in_a_headless_browser(quick, tmp_path):
    browser = _browser()
    assert browser is not None, "FLOWKERN_REQUIRE_BROWSER=1 but no chromium found"
    out, _, _ = quick
    url = (out / "report.html").as_uri()
    done = _run_browser(browser, ["--virtual-time-budget=15000", "--dump-dom", url], tmp_path / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    n = len(list(out.glob("figures/*.png")))
    assert f'data-images="{n}/{n}"' in dom and 'data-images-ok="yes"' in dom, "images did not all decode"
    assert "Cliff layers" in dom and "In plain words" in dom
    console = [ln for ln in done.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    shot = tmp_path / "shot.png"
    done = _run_browser(browser, ["--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}", url],
                        tmp_path / "profile2")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        gray = np.asarray(im.convert("L"), dtype=float)
    assert gray.std() > 20 and (gray < 100).mean() > 0.01, "the page rendered (almost) blank"


def test_checker_catches_what_it_should():
    p = _Checker()
    p.feed("<!DOCTYPE html><html><body><p><b>x</p></body></html>")
    assert p.errors


# ----------------------------------------------------------------------------------------------------------
# mistakes and interrupts


@pytest.mark.parametrize("extra, message", [
    (["--keep", "0"], "--keep 0"),
    (["--keep", "64"], "--keep 64: the model sees 64 image tokens"),
    (["--threads", "0"], "--threads 0"),
    (["--tolerance", "-1"], "--tolerance -1"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model"),
])
def test_bad_arguments_exit_2_one_line_nothing_written(tmp_path, capsys, extra, message):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), *extra]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "flowkern" in ln]  # not transformers' loading bar
    assert len(err) == 1 and err[0].startswith("flowkern demo: error: ") and message in err[0], err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_out_must_be_a_folder_and_a_previous_report_needs_overwrite(quick, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["demo", "--quick", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(other), "--overwrite"]) == 2
    assert "not a flowkern result" in capsys.readouterr().err and (other / "notes.txt").read_text() == "keep me"
    out, _, _ = quick
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_interrupt_leaves_the_previous_report_whole(quick, tmp_path, capsys, monkeypatch):
    out, _, _ = quick
    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    before = (copy / _io.MANIFEST).read_text()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "cam_stage", stop)  # after the data and attention stages have written files
    assert main(["demo", "--quick", "--out", str(copy), "--overwrite"]) == 130
    assert capsys.readouterr().err.strip().endswith("flowkern demo: interrupted")
    assert (copy / _io.MANIFEST).read_text() == before
    assert {p.relative_to(copy) for p in copy.rglob("*")} == {p.relative_to(out) for p in out.rglob("*")}
    assert not list(tmp_path.glob(".demo.tmp-*"))


# ----------------------------------------------------------------------------------------------------------
# words, tables, JSON and the page from hand-built records (no model run)

SHARE = [0.5, 0.4, 0.2, 0.1, 0.05, 0.05, 0.05, 0.05]


def _task(label: str, loader: str, baseline: float, curve: list[float], *, cliff: int | None, n: int = 200,
          higher: bool = True, share: list[float] | None = None, metrics: dict | None = None,
          random: list[float] | None = None) -> TaskResult:
    tol = max(1.0, 100 / n)
    eff = (baseline - curve[0]) * 100 * (1 if higher else -1)
    se = words.standard_error_points(baseline, n)
    share = share or SHARE
    rows = [[0.1, s, 0.8 - s, 0.1] for s in share]
    return TaskResult(
        label=label, kind="what it asks", loader=loader, metric="accuracy" if loader != "chair" else "chair_s",
        higher_is_better=higher, n=n, tolerance=tol, baseline=baseline,
        baseline_metrics=metrics or {"accuracy": baseline, "f1": baseline, "yes_ratio": 0.5},
        chance=0.4 if loader == "sqa" else None, curve=dict(enumerate(curve)),
        attention_k={i: v for i, v in enumerate(curve) if i},
        random_k={i: v for i, v in enumerate(random or curve) if i},
        keepk_baseline=baseline, cliff_layer=cliff, no_harm_layer=cliff, monotone=True, note=None, keepk_cliff=cliff,
        random_cliff=cliff, at_cliff=None if cliff is None else curve[cliff],
        at_cliff_metrics=None if cliff is None else {"accuracy": curve[cliff], "f1": curve[cliff]},
        no_image=curve[0], image_effect_points=eff, se_points=se, shares=rows, image_share=list(share),
        image_sd=[0.01] * len(share), traced=8, segment_names=["system", "image", "user", "generated"],
        shapes_command=f"flowkern shapes --task {loader}", sweep_seconds=1.0, image_use=words.image_use(eff, tol, se))


def _speed(**kw) -> SpeedRow:
    row = dict(label="shapes-POPE L=2 B=16", task="shapes-POPE", layer=2, batch=16, prompt_tokens=108,
               unpruned_prefill_ms=10.0, pruned_prefill_ms=5.0, prefill_speedup=2.0, unpruned_decode_tok_s=100.0,
               pruned_decode_tok_s=130.0, decode_speedup=1.3, repeats=2, new_tokens=16, cliff_layer=2)
    return SpeedRow(**{**row, **kw})


def _summary(tasks: dict, **kw) -> DemoSummary:
    settings = Settings(quick=True, seed=1000, keep=16, tolerance=None, tolerance_rule="x", threads=1, device="cpu",
                        sizes=config.QUICK, max_new_tokens={"pope": 2, "sqa": 2, "textvqa": 6, "caption": 24})
    env = Environment(flowkern="0", torch="0", python="3", machine="x86_64", cpu_count=2, platform="linux",
                      load_average=[1.0, 1.0, 1.0], created="2000-01-01 00:00:00")
    model = ModelFacts(name="demo", path="/m", model_type="llava", num_layers=8, hidden_size=64, parameters=10 ** 6,
                       image_tokens=64)
    return DemoSummary(settings=settings, environment=env, model=model, tasks=tasks, **{"speed": [_speed()], **kw})


def _verdict(cs: list[Conclusion], start: str) -> Conclusion:
    return next(c for c in cs if c.topic.startswith(start))


def _papers_tasks() -> dict[str, TaskResult]:
    return {
        "pope": _task("shapes-POPE", "pope", 0.9, [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.9, 0.9], cliff=5),
        "sqa": _task("shapes-SQA", "sqa", 0.8, [0.4, 0.6, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], cliff=2),
        "textvqa": _task("shapes-TextVQA", "textvqa", 0.7, [0.0, 0.2, 0.4, 0.7, 0.7, 0.7, 0.7, 0.7], cliff=3),
    }


def test_words_for_a_model_that_ignores_the_image():
    flat = [0.5] * 8
    tasks = {k: _task(f"shapes-{k}", k, 0.5, flat, cliff=0) for k in ("sqa", "textvqa")}
    tasks["pope"] = _task("shapes-pope", "pope", 0.5, flat, cliff=0,
                          metrics={"accuracy": 0.5, "f1": 0.0, "yes_ratio": 0.0})
    cs = words.conclusions(_summary(tasks))
    assert all(isinstance(c, Conclusion) and c.verdict in words.VERDICTS for c in cs)
    assert _verdict(cs, "claim: image information converges").verdict == "cannot tell"
    assert _verdict(cs, "claim: complex reasoning").verdict == "cannot tell"
    assert _verdict(cs, "claim: truncating at the cliff").verdict == "cannot tell"
    assert "no task clearly uses the image" in _verdict(cs, "keeping 16 image tokens").text
    effect = _verdict(cs, "does the image matter").text
    assert effect.count("the image does not matter for this task") == 3
    assert "answers \u201cNo\u201d to (almost) every question" in _verdict(cs, "the model").text
    assert "attends to the image without its answers depending on it" in _verdict(cs, "claim: the answer's").text


def test_words_for_a_model_like_the_papers():
    tasks = _papers_tasks()
    cs = words.conclusions(_summary(tasks))
    assert _verdict(cs, "claim: complex reasoning").verdict == "matches"
    assert _verdict(cs, "claim: image information converges").verdict == "partly"  # POPE's cliff is at 5 of 8
    assert _verdict(cs, "claim: the answer's attention").verdict == "matches"
    assert _verdict(cs, "claim: truncating at the cliff").verdict == "matches"
    assert [c.topic for c in cs][:3] == ["the model", "does the image matter", "resolution"]
    # the reasoning task cliffing last contradicts the paper
    tasks["sqa"] = _task("shapes-SQA", "sqa", 0.8, [0.4, 0.5, 0.6, 0.6, 0.6, 0.7, 0.8, 0.8], cliff=6)
    cs = words.conclusions(_summary(tasks))
    assert _verdict(cs, "claim: complex reasoning").verdict == "does not match"
    flat = {w: replace(t, image_share=[0.4] * 8) for w, t in tasks.items()}
    cs = words.conclusions(_summary(flat))
    assert _verdict(cs, "claim: the answer's attention").verdict == "does not match"
    assert words.headline(_summary(flat)).cliff == {"shapes-POPE": 5, "shapes-SQA": 6, "shapes-TextVQA": 3}


def test_words_top_k_and_speed():
    tasks = _papers_tasks()
    tasks["pope"] = _task("shapes-POPE", "pope", 0.9, [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.9, 0.9], cliff=5,
                          random=[0.5] * 8)
    text = _verdict(words.conclusions(_summary(tasks)), "keeping 16 image tokens").text
    assert "shapes-POPE +30.7 points; shapes-SQA +0.0 points" in text and "beats random for shapes-POPE." in text
    slow = _summary(tasks, speed=[_speed(batch=1, prefill_speedup=3.0), _speed(prefill_speedup=1.01,
                                                                              decode_speedup=0.9)],
                    speed_note="a cliff at L = 0 is timed at L = 1")
    text = _verdict(words.conclusions(slow), "speed").text
    assert text.startswith("At batch 16, pruning every image token from the cliff layer on made the prefill 1.01x "
                           "(shapes-POPE, L = 2) as fast and decoding 0.90x.")
    assert "No real gain at this size" in text and "(A cliff at L = 0 is timed at L = 1.)" in text
    assert "With 64 image tokens in a ~108-token prompt" in text and "below the measurement noise" in text
    assert not [c for c in words.conclusions(_summary(tasks, speed=[])) if c.topic.startswith("speed")]
    head = words.headline(slow)
    assert head.speed["shapes-POPE"].batch == 16
    assert head.to_json()["speed"] == {"shapes-POPE": dict(batch=16, layer=2, cliff_layer=2, prefill_speedup=1.01,
                                                           decode_speedup=0.9)}


def test_image_use_needs_the_tolerance_and_two_standard_errors():
    se = words.standard_error_points(0.38, 200)
    assert se == pytest.approx(3.43, abs=0.01)
    assert words.image_use(0.5, 1.0, se) == "none"
    assert words.image_use(3.5, 1.0, se) == "weak"  # what the shipped checkpoint does on shapes-SQA
    assert words.image_use(21.0, 1.0, 4.1) == "clear"
    assert words.image_use(-21.0, 1.0, 4.1) == "hurts"
    assert words.image_use(None, 1.0, se) == "none"
    weak = _task("shapes-SQA", "sqa", 0.38, [0.345] + [0.38] * 7, cliff=1)
    cs = words.conclusions(_summary({"sqa": weak}))
    assert "does not show that the answers use the image" in _verdict(cs, "does the image matter").text
    assert _verdict(cs, "claim: complex reasoning").verdict == "cannot tell"


def test_tables_from_records():
    tasks = _papers_tasks()
    tasks["caption"] = _task("shapes-CHAIR", "chair", 0.2, [0.6] + [0.2] * 7, cliff=1, higher=False,
                             metrics={"chair_s": 0.2, "chair_i": 0.1})
    out = tables.tables(_summary(tasks))
    assert list(out) == ["shares", "truncation", "cliff", "table1", "speed"]
    assert out["shares"][0] == ["task", "layer", "system", "image", "user", "generated", "image_sd", "questions"]
    assert len(out["shares"]) == 1 + 4 * 8 and out["shares"][2] == ["shapes-POPE", 1, 0.1, 0.4, 0.8 - 0.4, 0.1, 0.01, 8]
    trunc = out["truncation"]
    assert trunc[1] == ["shapes-POPE", "baseline", None, None, None, "accuracy", 0.9, 0.0, True]
    assert trunc[2][:4] == ["shapes-POPE", "k=0", 0, 0] and trunc[2][7] == pytest.approx(-40.0)
    assert len(trunc) == 1 + 4 * (1 + 8 + 7 + 7)  # baseline, k = 0 at every layer, keep-16 series from layer 1
    cliff = dict(zip(out["cliff"][0], out["cliff"][1], strict=True))
    assert cliff["cliff_layer"] == 5 and cliff["paper_layer"] == 6 and cliff["image_use"] == "clear"
    assert out["table1"] == tables.table1_rows(list(tasks.values()))
    assert out["table1"][1:3] == [["shapes-POPE", "Acc \u2191", 90.0, 90.0, 5, 200],
                                  ["shapes-POPE", "F1 \u2191", 90.0, 90.0, 5, 200]]
    assert out["table1"][-1] == ["shapes-CHAIR", "CHAIR_S \u2193", 20.0, None, 1, 200]  # no chair_s at the cliff
    assert out["speed"][1] == ["shapes-POPE", 2, 16, 108, 16, 2, 10.0, 5.0, 2.0, 100.0, 130.0, 1.3]
    assert tables.to_csv([["a", "b", "c"], [None, 1 / 3, True]]) == "a,b,c\n,0.333333,True\n"


def test_summary_json_and_finite():
    ex = Example(id="q1", image="1.png", question="Is there a circle?", answer="Yes", reference="yes",
                 image_share=[0.5], attention_maps=[[[0.1]]],
                 cam=ExampleCam(answer="Yes", error=None, peaks=[[0, 0, 0, 1.0]], maps=[[[1.0]]]))
    plain = replace(ex, cam=None)
    s = finite(_summary({"pope": _task("shapes-POPE", "pope", 0.9, [0.5] * 8, cliff=None)},
                        speed=[_speed(decode_speedup=float("nan"))], examples={"pope": [ex, plain]}))
    assert isinstance(s, DemoSummary) and s.speed[0].decode_speedup is None
    j = s.to_json(maps=False)
    assert list(j) == ["settings", "environment", "model", "tasks", "speed", "speed_note", "examples", "headline",
                       "conclusions", "figures", "timings", "tables", "methods"]
    assert j["methods"] is None  # no comparison in this summary
    assert list(j["tasks"]["pope"])[:3] == ["label", "kind", "loader"] and list(j["tasks"]["pope"])[-2:] == [
        "image_use", "flow"]
    assert j["tasks"]["pope"]["curve"]["0"] == 0.5 and j["settings"]["sizes"]["speed_batches"] == [1, 16]
    assert j["examples"]["pope"] == [
        dict(id="q1", image="1.png", question="Is there a circle?", answer="Yes", reference="yes", image_share=[0.5],
             cam_answer="Yes", cam_error=None, cam_peaks=[[0, 0, 0, 1.0]]),
        dict(id="q1", image="1.png", question="Is there a circle?", answer="Yes", reference="yes", image_share=[0.5])]
    assert s.to_json()["examples"]["pope"][0]["cam_maps"] == [[[1.0]]]
    json.dumps(j, allow_nan=False)


def test_page_from_records(tmp_path):
    """The page from hand-built records: escaped text, verdicts, the tables, links only to files that exist."""
    tasks = _papers_tasks()
    tasks["pope"] = replace(tasks["pope"], note="<b>odd</b> & noted")
    speed = [_speed(), _speed(task="shapes-SQA", cliff_layer=0, layer=1), _speed(task="shapes-X", cliff_layer=None)]
    s = _summary(tasks, speed=speed, speed_note="a note", timings={"data": 1.0, "total": 2.0},
                 tables=["tables/cliff.csv"])
    s = replace(s, headline=words.headline(s), conclusions=words.conclusions(s))
    (tmp_path / "figures").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "figures" / "speed.png")
    s = replace(s, figures=[FigureRecord(id="speed", file="figures/speed.png", section="speed", title="Speed",
                                         caption="bars")])
    page = render.render(s, tmp_path)
    p = _Checker()
    p.feed(page)
    p.close()
    assert not p.errors and not p.stack and len(p.ids) == len(set(p.ids))
    assert "&lt;b&gt;odd&lt;/b&gt; &amp; noted" in page and "<b>odd</b>" not in page
    assert page.count('<span class="verdict v-') == len(s.conclusions)
    assert '<span class="verdict v-matches">matches</span>' in page
    assert "2 s on 1 torch thread(s)" in page and "Time per stage (s): data 1.0, total 2.0." in page
    assert "shapes-POPE (L = 2) prefill <b>2.00x</b>, decode <b>1.30x</b>; shapes-SQA (cliff 0, timed at L = 1) " \
        "prefill" in page and "shapes-X (no cliff, timed at L = 2)" in page
    assert '<img src="data:image/png;base64,' in page and 'width="40" height="30"' in page
    assert "<p><b>a note.</b></p>" in page and "load average at the end: [1.0, 1.0, 1.0]" in page
    assert "<td>\u2013</td>" not in page.split("Table 1 form")[1].split("Every point")[0]  # every cell measured
    for tag, ref in p.refs:
        assert ref.startswith(("data:", "#")) or ref in ("summary.json", "tables/cliff.csv") or \
            (tmp_path / ref).is_file(), (tag, ref)


def test_spread_picks_evenly():
    assert stages.spread(list(range(10)), 3) == [0, 3, 6]
    assert stages.spread([1, 2], 5) == [1, 2]
    assert stages.spread([1, 2], 0) == []


def test_figures_from_records(tmp_path):
    from flowkern.demo.report import figures

    rows = [_speed(), _speed(label="shapes-SQA L=1 B=16", task="shapes-SQA", layer=1, pruned_prefill_ms=8.0)]
    fig = figures.speed_bars(rows, tmp_path / "speed.png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [r.label for r in rows]
    tasks = _papers_tasks()
    figures.truncation_deltas({t.label: dict(t.curve) for t in tasks.values()},
                              {t.label: t.baseline for t in tasks.values()}, {t.label: True for t in tasks.values()},
                              tmp_path / "deltas.png", cliffs={t.label: t.cliff_layer for t in tasks.values()},
                              tolerances={t.label: t.tolerance for t in tasks.values()})
    for name in ("speed.png", "deltas.png"):
        with Image.open(tmp_path / name) as im:
            assert np.asarray(im.convert("L")).std() > 5
    with pytest.raises(ValueError, match="at least one row"):
        figures.speed_bars([], tmp_path / "none.png")


# ----------------------------------------------------------------------------------------------------------
# the causal-flow section from hand-built records


def test_guided_heads_and_the_decodable_layer(tmp_path):
    from flowkern.demo.report import flow

    assert flow.guided_heads(tmp_path, 8, 4) == []  # no training.json: nothing guided
    (tmp_path / "training.json").write_text(json.dumps({"guides": {
        "focus": [[1, 2], [0, 2]], "names": [[2], [2, 4]], "read": [[7, 9], [3, 6]], "bad": "x"}}))
    pairs = flow.guided_heads(tmp_path, 8, 4)
    assert pairs == [[1, 0], [1, 1], [2, 0], [2, 1], [2, 2], [2, 3], [7, 3]]  # out-of-range pairs dropped
    assert words.guided_text(pairs) == "heads 0-1 of layer 1, heads 0-3 of layer 2 and head 3 of layer 7"
    assert words.guided_text([[4, 0], [5, 0], [6, 0], [4, 2], [5, 2], [6, 2]]) == "heads 0, 2 of layers 4-6"
    model = ModelFacts(name="m", path=str(tmp_path), model_type="llava", num_layers=8, hidden_size=8, parameters=1,
                       image_tokens=4, num_heads=4, guided_heads=pairs)
    mask = flow.head_mask(model)
    assert mask.sum() == 7 and mask[2].all() and mask[7, 3]
    shares = np.arange(32, dtype=float).reshape(8, 4) / 32
    assert flow.share_over_heads(shares, mask, unguided=False)[1] == pytest.approx(shares[1].mean())
    unguided = flow.share_over_heads(shares, mask, unguided=True)
    assert unguided[1] == pytest.approx(shares[1, 2:].mean()) and unguided[2] is None
    assert flow.decodable_layer([0.0, 0.6, 0.4, 0.5, 0.9]) == 3  # from 3 on it stays >= 0.5
    assert flow.decodable_layer([0.9, 0.9, 0.2]) is None
    record = flow.flow_record([[0.1, 0.9], [0.3, 0.7]], [[0, 1], [1, 1]], np.ones((2, 2, 4)) / 4,
                              [np.full((2, 4, 4), np.nan), np.full((2, 4, 4), 0.25)])
    assert record.answer_prob == pytest.approx([0.2, 0.8]) and record.answer_top1 == [0.5, 1.0]
    assert record.decodable_layer == 0 and record.traced == 2 and record.segment_flow[0][0][0] == 0.25


def _flow(top1: list[float], head_image: np.ndarray) -> FlowResult:
    table = np.full((8, 4, 4), 0.25)
    table[:, 2] = [0.1, 0.6, 0.2, 0.1]  # question rows: 60 % on the image
    return FlowResult(traced=8, answer_prob=[v * 0.9 for v in top1], answer_top1=top1,
                      decodable_layer=next((i for i in range(8) if min(top1[i:]) >= 0.5), None),
                      head_image=head_image.tolist(), segment_flow=table.tolist())


def _flow_summary(head_image: np.ndarray, guided: list[list[int]]) -> DemoSummary:
    tasks = {w: replace(t, flow=_flow([0.0, 0.1, 0.2, 0.6, 0.8, 0.9, 1.0, 1.0], head_image))
             for w, t in _papers_tasks().items()}
    s = _summary(tasks)
    return replace(s, model=replace(s.model, num_heads=4, guided_heads=guided))


def test_flow_words_from_records():
    falls = np.repeat(np.array([0.8, 0.8, 0.8, 0.8, 0.2, 0.2, 0.2, 0.2])[:, None], 4, axis=1)  # [8 layers, 4 heads]
    guided = [[layer, h] for layer in range(1, 8) for h in (0, 1)]
    cs = words.conclusions(_flow_summary(falls, guided))
    lens = _verdict(cs, "when the answer becomes decodable")
    assert lens.verdict == "note" and "shapes-POPE from layer 3 (54 % there, 90 % at the last layer; cliff L = 5)" \
        in lens.text and "decodable before the cliff layer" in lens.text
    heads = _verdict(cs, "claim: the answer's attention to the image fades after the shallow layers, on the unguided")
    assert heads.verdict == "matches" and "guided 14 of 32 attention heads (heads 0-1 of layers 1-7" in heads.text
    assert "falls with depth for shapes-POPE, shapes-SQA and shapes-TextVQA" in heads.text
    # the fall only on the guided heads: the unguided ones stay flat, and disagree with all heads
    only_guided = falls.copy()
    only_guided[:, 2:] = 0.5
    heads = _verdict(words.conclusions(_flow_summary(only_guided, guided)), "claim: the answer's attention to the "
                     "image fades after the shallow layers, on the unguided")
    assert heads.verdict == "does not match" and "rests on the guided heads" in heads.text
    none = _verdict(words.conclusions(_flow_summary(falls, [])), "claim: the answer's attention to the image fades "
                    "after the shallow layers, on the unguided")
    assert none.verdict == "cannot tell"
    every = [[layer, h] for layer in range(8) for h in range(4) if layer < 4]  # no unguided head in the first half
    assert _verdict(words.conclusions(_flow_summary(falls, every)), "claim: the answer's attention to the image "
                    "fades after the shallow layers, on the unguided").verdict == "cannot tell"
    flow_note = _verdict(cs, "where the image's attention goes")
    assert "shapes-POPE: question tokens 60 % / 60 %" in flow_note.text
    # no flow measured: no flow sentence, no flow tables
    assert not words.flow_claims(_summary(_papers_tasks()))
    out = tables.tables(_flow_summary(falls, guided))
    assert out["lens"][0] == ["task", "layer", "p_answer", "top1_is_answer", "decodable_layer", "questions"]
    assert out["heads"][1] == ["shapes-POPE", 0, 0, 0.8, False] and out["heads"][5] == ["shapes-POPE", 1, 0, 0.8, True]


def test_flow_section_of_the_page(tmp_path):
    """The flow section: the lens and per-head tables; the knockout figures are drawn in their own section."""
    falls = np.full((8, 4), 0.3)
    s = _flow_summary(falls, [[1, 0]])
    (tmp_path / "figures").mkdir()
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "figures" / "knockout_pope.png")
    s = replace(s, figures=[FigureRecord(id="knockout_pope", file="figures/knockout_pope.png", section="knockout",
                                         title="Knockout", caption="curves")])
    page = render.render(s, tmp_path)
    section = page.split('<section id="flow">')[1].split("</section>")[0]
    assert 'id="fig-knockout_pope"' not in section and "Lens probability of the answer token" in section
    assert "head 0 of layer 1" in section and "unguided heads" in section
    assert '<a href="#flow">Causal flow</a>' in page
    plain = render.render(_summary(_papers_tasks()), tmp_path)
    assert "were not measured" in plain.split('<section id="flow">')[1].split("</section>")[0]


def test_flow_figures_from_records(tmp_path):
    from flowkern.demo.report import figures

    falls = np.repeat(np.linspace(0.9, 0.1, 8)[:, None], 4, axis=1)
    s = _flow_summary(falls, [[1, 0], [1, 1]])
    flows = {t.label: t.flow for t in s.tasks.values()}
    guided = np.zeros((8, 4), dtype=bool)
    guided[1, :2] = True
    fig = figures.lens_by_task(flows, tmp_path / "lens.png")
    assert len([ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "decodable"]) == 3
    figures.heads_by_task({k: f.head_image for k, f in flows.items()}, guided, tmp_path / "unguided.png")
    fig = figures.head_shares_by_task({k: f.head_image for k, f in flows.items()}, guided, tmp_path / "heads.png")
    assert len(fig.axes) == 3 + 1 and len(fig.axes[0].patches) == 2  # a panel per task + the colour bar
    figures.segment_flow_by_task({k: np.asarray(f.segment_flow) for k, f in flows.items()},
                                 ["system", "image", "user", "generated"], tmp_path / "flow.png")
    for name in ("lens.png", "unguided.png", "heads.png", "flow.png"):
        with Image.open(tmp_path / name) as im:
            assert np.asarray(im.convert("L")).std() > 5, name
