"""``flowkern sweep`` (flowkern/eval/sweep/, flowkern/hf/reuse.py, flowkern/cli/sweep.py) on a tiny LLaVA saved in the
official format: points equal independent ``flowkern eval`` runs (answers byte for byte, ``flowkern score`` numbers),
the cliff layer definition, bisection and its fallback (on a fake evaluate), resume after a real SIGKILL, refused
settings, torchrun with 2 gloo processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flowkern.cli import main
from flowkern.eval.answers import ANSWERS_FILE
from flowkern.eval.run import EvalConfig, run_eval
from flowkern.eval.sweep import (
    Point,
    SweepConfig,
    SweepUsageError,
    cliff_report,
    parse_layer_spec,
    run_sweep,
    search_cliff,
)
from flowkern.hf import compat
from flowkern.hf.loading import load_model
from flowkern.hf.reuse import ImageCache
from flowkern.plan import PruneSpec
from tests.fixtures import signal_when, slowed_flowkern, write_llava_pope

REPO = Path(__file__).resolve().parents[2]
SPEC = PruneSpec(keep=0.25, rank="attention")  # the main series of the keep-k sweeps below


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LLaVA (16 image tokens on a 4 x 4 grid, 4 text layers) and 6 POPE questions on 4 images."""
    root = tmp_path_factory.mktemp("sweep")
    return write_llava_pope(root)


@pytest.fixture(scope="module")
def llava(files):
    return load_model(files / "llava", device="cpu")


def _common(files: Path) -> dict:
    return dict(model=str(files / "llava"), task="pope", data=str(files / "pope"), images=str(files / "val2014"),
                max_new_tokens=3, batch_size=2, device="cpu")


def _argv(files: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--model", str(files / "llava"), "--task", "pope", "--data", str(files / "pope"), "--images",
            str(files / "val2014"), "--max-new-tokens", "3", "--batch-size", "2", "--device", "cpu", "--out", str(out),
            *extra]


# ----------------------------------------------------------------------------------------------------------
# pure pieces


def test_layer_spec():
    assert parse_layer_spec("all", 4) == [0, 1, 2, 3]
    assert parse_layer_spec("0,2,4,8-12", 32) == [0, 2, 4, 8, 9, 10, 11, 12]
    assert parse_layer_spec(" 5, 1-2 ,1", 8) == [1, 2, 5]
    for bad, needle in (("x", "expected"), ("3-1", "backwards"), ("0-40", "out of range"), (",", "no layer")):
        with pytest.raises(SweepUsageError, match=needle):
            parse_layer_spec(bad, 32)


def test_config_refusals():
    """A schedule (a sweep varies one layer), a Scorer object (points are named after a registered scorer), a
    registered scorer without default parameters, an unknown one: refused by name before any work."""
    from flowkern.eval.sweep.points import check_config, ranks_at
    from flowkern.scorers import get_scorer

    def config(**kw):
        return SweepConfig(model="m", task="pope", data="d", out="o", **kw)

    for kw, needle in ((dict(prune=PruneSpec(schedule=((2, 0.5),))), "flowkern compare"),
                       (dict(prune=PruneSpec(keep=4, rank=get_scorer("diversity"))), "registered name"),
                       (dict(prune=PruneSpec(keep=4), controls=("union",)), "--control 'union'"),
                       (dict(prune=PruneSpec(keep=4), controls=("nope",)), "expected one of")):
        with pytest.raises(SweepUsageError, match=needle):
            check_config(config(**kw))
    check_config(config(prune=PruneSpec(keep=4, rank="cls", merge=True), controls=("text-attention", "duplicates")))
    assert [ranks_at(r, 0, 4) for r in ("attention", "text-attention", "prerope-attention", "grid+attention")] == [
        False] * 4
    assert all(ranks_at(r, 0, 4) for r in ("random", "none", "grid", "diversity", "duplicates", "cls"))
    assert ranks_at("attention", 0, 0) and ranks_at("attention", 1, 4)


def test_cliff_definition():
    base = 0.80
    # monotone: far below, then within 1 point from layer 4 on
    curve = {0: 0.50, 1: 0.55, 2: 0.70, 3: 0.78, 4: 0.795, 5: 0.805, 6: 0.80, 7: 0.80}
    r = cliff_report(curve, base, tolerance=1.0)
    assert r["cliff_layer"] == 4 and r["monotone"] and r["meaningful"]
    assert r["no_harm_layer"] == 5 and r["first_no_harm_layer"] == 5
    assert r["within"]["3"] is False and r["delta_points"]["3"] == pytest.approx(-2.0)
    assert cliff_report(curve, base, tolerance=2.0)["cliff_layer"] == 3  # 2 points: layer 3 (-2.0) is within
    # not monotone: layer 1 within, 2 far off again; last layer off -> no cliff at all
    wobbly = {0: 0.5, 1: 0.80, 2: 0.60, 3: 0.80}
    r = cliff_report(wobbly, base, tolerance=1.0)
    assert r["cliff_layer"] == 3 and not r["monotone"] and not r["meaningful"]
    assert r["within_below_cliff"] == [1] and "not monotone" in r["note"]
    assert r["violations"][0]["from"] == 1 and r["violations"][0]["to"] == 2
    none = cliff_report({0: 0.5, 1: 0.6}, base, tolerance=1.0)
    assert none["cliff_layer"] is None and "no cliff" in none["note"]
    # CHAIR: lower is better; a lower score does not "hurt"
    chair = cliff_report({0: 0.30, 1: 0.12, 2: 0.125}, 0.13, tolerance=1.0, higher_is_better=False)
    assert chair["cliff_layer"] == 1 and chair["no_harm_layer"] == 1
    assert chair["within"]["2"] and chair["first_no_harm_layer"] == 1


def test_grid_rank_prunes_a_uniform_subgrid(llava):
    import flowkern
    from flowkern.hf.inputs import build_inputs

    model, processor = llava
    images = [str(p) for p in sorted((Path(model.name_or_path).parent / "val2014").glob("*.jpg"))[:2]]
    inputs = build_inputs(processor, model, images, ["Is there a dog in the image?", "Is there a cat?"])
    image_pos = torch.nonzero(inputs["input_ids"][1] == model.config.image_token_id).flatten()
    for keep, ordinals in ((4, [0, 2, 8, 10]), (1, [5]), (0.5, None)):
        with torch.inference_mode(), flowkern.prune(model, layer=2, keep=keep, rank="grid") as p:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert p.num_kept_image_tokens.tolist() == [round(16 * keep) if isinstance(keep, float) else keep] * 2
        if ordinals is not None:  # 4 x 4 grid: stride 2 -> cells (0,0) (0,2) (2,0) (2,2); k=1 -> the centre (1,1)
            assert p.kept_image_positions[1].tolist() == image_pos[ordinals].tolist()
    with pytest.raises(ValueError, match="rank must be one of"):
        flowkern.prune(model, layer=2, keep=4, rank="grids")


# ----------------------------------------------------------------------------------------------------------
# the engine


def test_points_equal_independent_eval_runs(files, llava, tmp_path, capsys):
    """Every point's answer file is byte-identical to `flowkern eval` at that point (with and without the shared
    prefill), and `flowkern score` on it gives the sweep's number; outputs are complete."""
    model, processor = llava
    kw = _common(files)
    out = tmp_path / "sweep"
    result = run_sweep(SweepConfig(out=out, prune=SPEC, controls=("random", "grid"), **kw),
                       model=model, processor=processor)
    names = [r["point"] for r in result.points]
    assert names == ["baseline"] + [f"L0{x}-{r}" for r in ("attention", "random", "grid") for x in (1, 2, 3)]
    plain = run_sweep(SweepConfig(out=tmp_path / "plain", prune=SPEC, controls=("random", "grid"),
                                  reuse=False, **kw), model=model, processor=processor)
    texts = set()
    for rec in result.points:
        prune = PruneSpec() if rec["layer"] is None else PruneSpec(rec["layer"], 0.25, rec["rank"])
        ind = run_eval(EvalConfig(out=tmp_path / "ind" / rec["point"], **kw, prune=prune), model=model,
                       processor=processor)
        got = (out / rec["answers"]).read_text()
        assert got == ind.answers_path.read_text(), rec["point"]
        assert got == (tmp_path / "plain" / rec["answers"]).read_text(), rec["point"]
        assert ind.metrics == rec["metrics"]
        texts.update(json.loads(line)["text"] for line in got.splitlines())
        assert main(["score", "--task", "pope", "--data", str(files / "pope"), "--predictions",
                     str(out / rec["answers"])]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["f1"] == rec["value"]
    assert len(texts) > 6  # the points really answer differently: the comparison is not vacuous
    assert plain.curve == result.curve
    cliff = json.loads((out / "cliff.json").read_text())
    assert cliff["cliff_layer"] == result.cliff["cliff_layer"] and set(cliff["control_curves"]) == {"random", "grid"}
    assert "layer 0" in cliff["skipped"]
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("point,series,layer,rank,keep,n,f1,") and len(rows) == 1 + 10
    assert len((out / "results.jsonl").read_text().splitlines()) == 10
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun does nothing and appends nothing
    again = run_sweep(SweepConfig(out=out, prune=SPEC, controls=("random", "grid"), **kw),
                      model=model, processor=processor)
    assert again.generated == 0 and len((out / "results.jsonl").read_text().splitlines()) == 10


@pytest.mark.parametrize(("spec", "controls"), [
    (PruneSpec(keep=0.25, rank="diversity"), ("text-attention", "prerope-attention", "cls")),
    (PruneSpec(keep=0.25, rank="cls", merge=True), ("attention", "duplicates", "grid+attention")),
], ids=["scorers", "merge"])
def test_registered_scorers_and_merge_equal_independent_eval_runs(files, llava, tmp_path, spec, controls):
    """Any registered scorer as --rank / --control, and merging, at layer 0 and deeper: each point's answers equal an
    independent `flowkern eval` at that point, through the shared prefill (layer L-1 computed for the scorers reading
    its attention, replayed below) and the image memo (paused for `cls`, which reads the vision tower as it runs).
    Scorers that cannot rank before the decoder have no point at layer 0."""
    model, processor = llava
    kw = dict(_common(files), limit=4)
    out = tmp_path / "sweep"
    result = run_sweep(SweepConfig(out=out, prune=spec, controls=controls, layers="0,2,3", **kw),
                       model=model, processor=processor)
    names = {r["point"] for r in result.points}
    early = {r for r in (spec.rank, *controls) if r in ("attention", "text-attention", "prerope-attention",
                                                       "grid+attention")}
    assert names == {"baseline"} | {f"L0{x}-{r}" for r in (spec.rank, *controls) for x in (0, 2, 3)
                                    if not (x == 0 and r in early)}
    assert "skipped" not in json.loads((out / "cliff.json").read_text())  # the main rank ranks before the decoder
    assert json.loads((out / "sweep.json").read_text())["settings"]["prune_merge"] is spec.merge
    texts = set()
    for rec in result.points:
        prune = PruneSpec() if rec["layer"] is None else replace(spec, layer=rec["layer"], rank=rec["rank"])
        ind = run_eval(EvalConfig(out=tmp_path / "ind" / rec["point"], **kw, prune=prune), model=model,
                       processor=processor)
        got = (out / rec["answers"]).read_text()
        assert got == ind.answers_path.read_text(), rec["point"]
        texts.update(json.loads(line)["text"] for line in got.splitlines())
    assert len(texts) > 4  # the points answer differently: the comparison is not vacuous


def test_images_encoded_once_per_batch_and_model_left_as_found(files, llava, tmp_path, monkeypatch):
    """With reuse the vision tower runs once per batch for all points (ImageCache), without it once per point and
    batch, the answers are the same, and afterwards the model is as it was found (its own attention, no memo, no
    session). With reuse the model's session lasts across a batch's pruned points, so its attention modules are
    looked for once per batch, not at every point's flowkern.prune."""
    from flowkern.hf import session as session_module

    model, processor = llava
    walks: list[int] = []
    find = session_module.language_attention_modules
    monkeypatch.setattr(session_module, "language_attention_modules", lambda *a: walks.append(1) or find(*a))
    kw = _common(files)
    owner, name = compat.image_encoder(model)
    before = compat.attn_implementation(model.config.text_config)
    calls: list[int] = []
    handle = model.model.vision_tower.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        run_sweep(SweepConfig(out=tmp_path / "shared", **kw), model=model, processor=processor)
        shared, shared_walks = len(calls), len(walks)
        calls.clear()
        walks.clear()
        run_sweep(SweepConfig(out=tmp_path / "plain", reuse=False, **kw), model=model, processor=processor)
        plain, plain_walks = len(calls), len(walks)
    finally:
        handle.remove()
    batches, points = 3, 1 + 4  # 6 questions at batch 2; the baseline and L = 0..3
    assert (shared, plain) == (batches, batches * points)
    assert (shared_walks, plain_walks) == (batches, batches * (points - 1))  # the pruned points
    for point in ["baseline", "L00", "L01", "L02", "L03"]:
        answers = f"points/{point}/{ANSWERS_FILE}"
        assert (tmp_path / "shared" / answers).read_text() == (tmp_path / "plain" / answers).read_text(), point
    assert name not in vars(owner) and compat.attn_implementation(model.config.text_config) == before
    assert model not in session_module._SESSIONS


def test_image_cache_compares_arguments_by_value(llava):
    """A call with equal arguments (a copy of the pixels, passed by position) is answered from the memo; pixels
    changed in place after the first call are encoded again; outside the block the encoder is the model's own."""
    model, _ = llava
    owner, name = compat.image_encoder(model)
    size = model.config.vision_config.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    cache = ImageCache(model)
    with torch.inference_mode():
        with cache.active():
            first = getattr(owner, name)(pixel_values=pixels)
            assert getattr(owner, name)(pixels.clone()) is first
            assert (cache.computed, cache.reused) == (1, 1)
            with cache.paused():  # runs the encoder; the memo is neither read nor written
                assert getattr(owner, name)(pixel_values=pixels) is not first
            assert (cache.computed, cache.reused, len(cache.entries)) == (1, 1, 1)
            pixels.add_(0.5)
            changed = getattr(owner, name)(pixel_values=pixels)
            assert changed is not first and (cache.computed, cache.reused) == (2, 1)
            assert getattr(owner, name)(pixel_values=pixels.double()) is not changed  # another dtype: computed
            assert cache.computed == 3
        assert name not in vars(owner)
        fresh = getattr(owner, name)(pixel_values=pixels)
    assert all(torch.equal(a, b) for a, b in zip(fresh.pooler_output, changed.pooler_output, strict=True))
    cache.clear()
    assert cache.entries == []


class _Encoder(torch.nn.Module):
    """A model whose image encoder takes nested arguments and counts its runs."""

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def get_image_features(self, pixels, options=None):
        self.runs += 1
        return [pixels.sum()]


def test_image_cache_compares_nested_arguments():
    """Containers are compared item by item (tensors by shape and value), other values with ==."""
    model = _Encoder()
    cache = ImageCache(model)
    with cache.active():
        first = model.get_image_features(torch.zeros(2), options={"a": [1, torch.ones(2)], "b": (2, "x")})
        assert model.get_image_features(torch.zeros(2), {"a": [1, torch.ones(2)], "b": (2, "x")}) is first
        for pixels, options in ((torch.zeros(3), {"a": [1, torch.ones(2)], "b": (2, "x")}),
                                (torch.zeros(2), {"a": [1, torch.ones(3)], "b": (2, "x")}),
                                (torch.zeros(2), {"a": (1, torch.ones(2)), "b": (2, "x")}),
                                (torch.zeros(2), {"a": [1, torch.ones(2)], "b": (2, "y")})):
            assert model.get_image_features(pixels, options) is not first
    assert (cache.computed, cache.reused, model.runs) == (5, 1, 5)
    assert "get_image_features" not in vars(model)


def _fake_evaluate(curve: dict[int, float], base: float) -> tuple[list[list[int | None]], object]:
    """An ``evaluate`` scoring layers from a given curve (None: the baseline), and the rounds it was asked for."""
    rounds: list[list[int | None]] = []

    def evaluate(layers):
        rounds.append(list(layers))
        return {x: base if x is None else curve[x] for x in layers}

    return rounds, evaluate


def test_bisect_monotone_and_fallback():
    layers = list(range(32))
    monotone = {x: 0.5 + 0.3 * min(1.0, x / 20) for x in layers}  # reaches the baseline 0.8 at layer 20
    rounds, evaluate = _fake_evaluate(monotone, 0.8)
    base, curve, search = search_cliff(layers, evaluate, mode="bisect", tolerance=1.0)
    evaluated = [x for rd in rounds for x in rd if x is not None]
    assert base == 0.8 and rounds[0] == [None, 0, 31] and not search["fallback"]
    assert cliff_report(curve, base)["cliff_layer"] == 20 == cliff_report(monotone, 0.8)["cliff_layer"]
    assert len(evaluated) <= 2 + 5 and len(set(evaluated)) == len(evaluated)  # first, last + log2(32)
    assert sorted(curve) == sorted(evaluated) and all(curve[x] == monotone[x] for x in curve)

    wobbly = dict(monotone)
    wobbly[23] = 0.5  # a relapse the bisection steps on (its second point): it must say so and evaluate every layer
    rounds, evaluate = _fake_evaluate(wobbly, 0.8)
    base, curve, search = search_cliff(layers, evaluate, mode="bisect", tolerance=1.0)
    assert search["fallback"] and "not monotone" in search["note"] and sorted(curve) == layers
    evaluated = [x for rd in rounds for x in rd if x is not None]
    assert sorted(evaluated) == layers  # never a layer twice
    report = cliff_report(curve, base)
    assert report["cliff_layer"] == 24 and not report["monotone"]

    rounds, evaluate = _fake_evaluate({x: 0.5 for x in layers}, 0.8)
    base, curve, search = search_cliff(layers, evaluate, mode="bisect", tolerance=1.0)
    assert cliff_report(curve, base)["cliff_layer"] is None and len(rounds) == 1  # the last layer is off: done

    rounds, evaluate = _fake_evaluate(monotone, 0.8)
    base, curve, search = search_cliff(layers, evaluate, mode="full")
    assert rounds == [[None, *layers]] and curve == monotone and search == {"mode": "full", "layers": layers}


def test_bisect_sweep_evaluates_a_subset_of_the_full_sweep(files, llava, tmp_path):
    """search="bisect" on the model: every point it evaluated scores what the full sweep's does."""
    model, processor = llava
    kw = dict(_common(files), limit=2)
    full = run_sweep(SweepConfig(out=tmp_path / "full", **kw), model=model, processor=processor)
    bisect = run_sweep(SweepConfig(out=tmp_path / "bisect", search="bisect", **kw), model=model, processor=processor)
    assert bisect.cliff["search"]["mode"] == "bisect" and {0, 3} <= set(bisect.curve)
    assert bisect.baseline == full.baseline and all(full.curve[x] == v for x, v in bisect.curve.items())
    for rec in bisect.points:
        assert (tmp_path / "bisect" / rec["answers"]).read_text() == (tmp_path / "full" / rec["answers"]).read_text()


def test_changed_setting_and_bad_options_are_refused(files, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(_argv(files, out, "--layers", "2-3", "--limit", "2")) == 0
    capsys.readouterr()
    for extra, needle in ((["--keep", "4"], "--keep was 0, now 4"), (["--max-new-tokens", "5"], "--max-new-tokens"),
                          (["--layers", "9"], "out of range"), (["--layers", "2-x"], "expected 'all'"),
                          (["--control", "random"], "needs --keep"), (["--tolerance", "-1"], "--tolerance"),
                          (["--prune-schedule", "2:0.5"], "flowkern compare"),
                          (["--keep", "4", "--control", "nope"], "--control 'nope': expected one of"),
                          (["--prune-merge"], "no kept token to merge into")):
        argv = _argv(files, out, "--layers", "2-3", "--limit", "2")
        argv[argv.index("--max-new-tokens") + 1] = "3"
        code = main(argv + extra)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (extra, err)
        assert "Traceback" not in err


def test_cli_takes_registered_scorers_and_merge(files, tmp_path, capsys):
    """`flowkern sweep --rank <scorer> --control <scorers> --prune-merge` runs; sweep.json records the merge and the
    scorer, and a rerun without --prune-merge is refused by name."""
    out = tmp_path / "s"
    argv = _argv(files, out, "--layers", "0,3", "--limit", "2", "--keep", "4", "--rank", "diversity", "--control",
                 "cls,text-attention", "--prune-merge")
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    settings = json.loads((out / "sweep.json").read_text())["settings"]
    assert (settings["rank"], settings["prune_merge"]) == ("diversity", True)
    assert {p.name for p in (out / "points").iterdir()} == {"baseline", "L00-diversity", "L03-diversity", "L00-cls",
                                                             "L03-cls", "L03-text-attention"}
    run = json.loads((out / "points" / "L03-cls" / "run.json").read_text())["settings"]
    assert (run["prune_layer"], run["rank"], run["prune_merge"]) == (3, "cls", True)
    assert main(argv[:-1]) == 2
    err = capsys.readouterr().err
    assert "--prune-merge was True, now False" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------
# processes: SIGKILL + resume, torchrun


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _lines(folder: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in folder.glob(f"points/*/{ANSWERS_FILE}"))


def test_kill_mid_run_then_resume_equals_uninterrupted(files, llava, tmp_path):
    out = tmp_path / "killed"
    argv = _argv(files, out, "--layers", "1-3")
    code, err = signal_when(slowed_flowkern("flowkern.eval.sweep.engine", argv, 0.25), _env(),
                            lambda: out.is_dir() and _lines(out) >= 6, signal.SIGKILL)
    assert code == -signal.SIGKILL, err
    kept = _lines(out)
    assert 6 <= kept < 24 and kept % 2 == 0  # whole (point, batch) pieces only
    assert not (out / "cliff.json").exists()
    model, processor = llava
    resumed = run_sweep(SweepConfig(out=out, layers="1-3", **_common(files)), model=model, processor=processor)
    assert resumed.generated == 24 - kept
    full = run_sweep(SweepConfig(out=tmp_path / "full", layers="1-3", **_common(files)), model=model,
                     processor=processor)
    for rec in full.points:
        a = sorted((out / rec["answers"]).read_text().splitlines())
        assert a == sorted((tmp_path / "full" / rec["answers"]).read_text().splitlines()), rec["point"]
    assert resumed.points == [dict(r, answers=r["answers"]) for r in full.points]
    assert json.loads((out / "cliff.json").read_text())["curve"] == json.loads(
        (tmp_path / "full" / "cliff.json").read_text())["curve"]


def test_torchrun_two_gloo_ranks_equal_one_process(files, llava, tmp_path):
    out = tmp_path / "ddp"
    argv = _argv(files, out, "--layers", "1,3", "--keep", "4", "--control", "grid")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flowkern.cli",
           *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any((out / ".shards").glob("rank*/points/*/answers.jsonl"))
    model, processor = llava
    one = run_sweep(SweepConfig(out=tmp_path / "one", layers="1,3", prune=PruneSpec(keep=4), controls=("grid",),
                                 **_common(files)),
                    model=model, processor=processor)
    for rec in one.points:
        assert (out / rec["answers"]).read_text() == (tmp_path / "one" / rec["answers"]).read_text(), rec["point"]
        assert json.loads((out / "points" / rec["point"] / "metrics.json").read_text()) == rec["metrics"]
    assert json.loads((out / "cliff.json").read_text())["curve"] == one.cliff["curve"]
    assert Point(3, "grid", "control", 4).name == "L03-grid"
