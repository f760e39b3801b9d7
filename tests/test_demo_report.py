"""``flowkern demo``: the quick run end to end on the shipped model, every file it promises, a report that is well
formed, references only files that exist and renders in a real headless browser, conclusions computed from the
numbers, and the usual argument errors and interrupt safety."""

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
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowkern import _io
from flowkern.cli import main
from flowkern.demo import report, report_words

TASK_WORLDS = [t.world for t in report.TASKS]
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
    figures = ["attention_shares", "image_share", "truncation_all", "speed"]
    for w in TASK_WORLDS:
        figures += [f"attention_maps_{w}", f"cam_{w}", f"truncation_{w}"]
        for folder in (f"sweeps/{w}", f"sweeps/{w}-keep{keep}"):
            names += [f"{folder}/{n}" for n in ("cliff.json", "summary.csv", "results.jsonl", "sweep.png")]
            names.append(f"{folder}/points/baseline/answers.jsonl")
    names += [f"figures/{f}.png" for f in figures]
    names += [f"tables/{t}.{ext}" for t in ("shares", "truncation", "cliff", "table1", "speed")
              for ext in ("csv", "json")]
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
    for name in ("shares", "truncation", "cliff", "table1", "speed"):
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
    assert "[4/6] truncation sweeps" in stderr and "[6/6] writing the report" in stderr and "trace:" in stderr
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
    assert {c["verdict"] for c in summary["conclusions"]} <= set(report_words.VERDICTS)


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

    monkeypatch.setattr(report, "cam_stage", stop)  # after the data and attention stages have written files
    assert main(["demo", "--quick", "--out", str(copy), "--overwrite"]) == 130
    assert capsys.readouterr().err.strip().endswith("flowkern demo: interrupted")
    assert (copy / _io.MANIFEST).read_text() == before
    assert {p.relative_to(copy) for p in copy.rglob("*")} == {p.relative_to(out) for p in out.rglob("*")}
    assert not list(tmp_path.glob(".demo.tmp-*"))


# ----------------------------------------------------------------------------------------------------------
# the plain words, from synthetic numbers


def _task(label: str, loader: str, baseline: float, curve: list[float], *, cliff: int | None, n: int = 200,
          higher: bool = True, share: list[float] | None = None, metrics: dict | None = None) -> dict:
    tol = max(1.0, 100 / n)
    eff = (baseline - curve[0]) * 100 * (1 if higher else -1)
    se = report_words.standard_error_points(baseline, n)
    share = share or [0.5, 0.4, 0.2, 0.1, 0.05, 0.05, 0.05, 0.05]
    return dict(label=label, loader=loader, metric="accuracy" if loader != "chair" else "chair_s",
                higher_is_better=higher, n=n, tolerance=tol, baseline=baseline,
                baseline_metrics=metrics or {"accuracy": baseline, "f1": baseline, "yes_ratio": 0.5},
                chance=0.4 if loader == "sqa" else None, curve={str(i): v for i, v in enumerate(curve)},
                attention_k={str(i): v for i, v in enumerate(curve)}, random_k={str(i): v for i, v in enumerate(curve)},
                cliff_layer=cliff, monotone=True, no_image=curve[0], image_effect_points=eff, se_points=se,
                image_use=report_words.image_use(eff, tol, se), at_cliff=None if cliff is None else curve[cliff],
                image_share=share)


def _summary(tasks: dict) -> dict:
    return dict(tasks=tasks, model=dict(num_layers=8, image_tokens=64), settings=dict(keep=16, tolerance_rule="x"),
                speed=[dict(task="shapes-POPE", layer=2, cliff_layer=2, batch=16, prefill_speedup=2.0,
                            decode_speedup=1.3, prompt_tokens=108)])


def _verdict(cs: list[dict], start: str) -> dict:
    return next(c for c in cs if c["topic"].startswith(start))


def test_words_for_a_model_that_ignores_the_image():
    flat = [0.5] * 8
    tasks = {k: _task(f"shapes-{k}", k, 0.5, flat, cliff=0) for k in ("pope", "sqa", "textvqa")}
    tasks["pope"]["baseline_metrics"]["yes_ratio"] = 0.0
    cs = report_words.conclusions(_summary(tasks))
    assert _verdict(cs, "claim: image information converges")["verdict"] == "cannot tell"
    assert _verdict(cs, "claim: complex reasoning")["verdict"] == "cannot tell"
    effect = _verdict(cs, "does the image matter")["text"]
    assert effect.count("the image does not matter for this task") == 3
    assert "answers \u201cNo\u201d to (almost) every question" in _verdict(cs, "the model")["text"]


def test_words_for_a_model_like_the_papers():
    tasks = {
        "pope": _task("shapes-POPE", "pope", 0.9, [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.9, 0.9], cliff=5),
        "sqa": _task("shapes-SQA", "sqa", 0.8, [0.4, 0.6, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], cliff=2),
        "textvqa": _task("shapes-TextVQA", "textvqa", 0.7, [0.0, 0.2, 0.4, 0.7, 0.7, 0.7, 0.7, 0.7], cliff=3),
    }
    cs = report_words.conclusions(_summary(tasks))
    assert _verdict(cs, "claim: complex reasoning")["verdict"] == "matches"
    assert _verdict(cs, "claim: image information converges")["verdict"] == "partly"  # POPE's cliff is at 5 of 8
    assert _verdict(cs, "claim: the answer's attention")["verdict"] == "matches"
    assert _verdict(cs, "claim: truncating at the cliff")["verdict"] == "matches"
    # the reasoning task cliffing last contradicts the paper
    tasks["sqa"] = _task("shapes-SQA", "sqa", 0.8, [0.4, 0.5, 0.6, 0.6, 0.6, 0.7, 0.8, 0.8], cliff=6)
    cs = report_words.conclusions(_summary(tasks))
    assert _verdict(cs, "claim: complex reasoning")["verdict"] == "does not match"
    flat_share = [0.4] * 8
    for t in tasks.values():
        t["image_share"] = flat_share
    cs = report_words.conclusions(_summary(tasks))
    assert _verdict(cs, "claim: the answer's attention")["verdict"] == "does not match"
    assert report_words.headline(_summary(tasks))["cliff"] == {"shapes-POPE": 5, "shapes-SQA": 6,
                                                                "shapes-TextVQA": 3}


def test_image_use_needs_the_tolerance_and_two_standard_errors():
    se = report_words.standard_error_points(0.38, 200)
    assert se == pytest.approx(3.43, abs=0.01)
    assert report_words.image_use(0.5, 1.0, se) == "none"
    assert report_words.image_use(3.5, 1.0, se) == "weak"  # what the shipped checkpoint does on shapes-SQA
    assert report_words.image_use(21.0, 1.0, 4.1) == "clear"
    assert report_words.image_use(-21.0, 1.0, 4.1) == "hurts"
    assert report_words.image_use(None, 1.0, se) == "none"
    weak = _task("shapes-SQA", "sqa", 0.38, [0.345] + [0.38] * 7, cliff=1)
    cs = report_words.conclusions(_summary({"sqa": weak}))
    assert "does not show that the answers use the image" in _verdict(cs, "does the image matter")["text"]
    assert _verdict(cs, "claim: complex reasoning")["verdict"] == "cannot tell"


def test_spread_picks_evenly():
    assert report.spread(list(range(10)), 3) == [0, 3, 6]
    assert report.spread([1, 2], 5) == [1, 2]
    assert report.spread([1, 2], 0) == []
