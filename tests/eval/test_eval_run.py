"""``flowkern eval`` (flowkern/cli/eval.py, flowkern/eval/run.py) end to end on a tiny LLaVA saved in the official
format, on benchmark files written in the official formats: answer file -> the same metrics as ``flowkern score``,
batch sizes agree, pruning, resume after a real SIGKILL / SIGINT, settings mismatch, bad input."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from flowkern.cli import main
from flowkern.eval.answers import ANSWERS_FILE, METRICS_FILE, SETTINGS_FILE
from flowkern.eval.run import EvalConfig, run_eval
from flowkern.hf.loading import load_model
from flowkern.plan import PruneSpec
from tests.fixtures import (
    save_eval_llava,
    save_image,
    signal_when,
    slowed_flowkern,
    write_coco,
    write_pope,
    write_sqa,
    write_textvqa,
)

NEW = "3"
REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LLaVA (16 image tokens, 4 text layers) and POPE (two splits, ids repeating), ScienceQA, TextVQA and
    COCO/CHAIR files with their images."""
    root = tmp_path_factory.mktemp("eval_run")
    save_eval_llava(root / "llava")
    for i in range(4):
        save_image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
    objects = ["dog", "cat", "car", "red dog"]
    for split, shift in (("random", 0), ("popular", 1)):
        write_pope(root / "pope", split, [(q, f"COCO_val2014_{(q + shift) % 4:012d}.jpg", objects[(q + shift) % 4],
                                           "yes" if (q + shift) % 2 else "no") for q in range(1, 6)])
    write_sqa(root / "sqa", {
        "7": {"question": "Which is a dog?", "choices": ["cat", "dog"], "answer": 1, "image": "image.png",
              "hint": "A dog."},
        "8": {"question": "Which is a car?", "choices": ["car", "dog", "cat"], "answer": 0, "image": "image.png"},
        "9": {"question": "No image here?", "choices": ["yes", "no"], "answer": 0}}, {"test": ["7", "8", "9"]})
    for pid in ("7", "8"):
        save_image(root / "sqa" / "images" / "test" / pid / "image.png", int(pid))
    write_textvqa(root / "textvqa", [
        {"question_id": 11, "image_id": "t1", "question": "what word?", "answers": ["yes"] * 4 + ["no"] * 6},
        {"question_id": 12, "image_id": "t2", "question": "which car?", "answers": ["car"] * 10}])
    for name in ("t1", "t2"):
        save_image(root / "textvqa" / "train_images" / f"{name}.jpg", len(name))
    write_coco(root / "coco", {1: (["dog"], ["A dog on a couch."]), 2: (["car", "person"], ["A man by a car."])})
    for i in (1, 2):
        save_image(root / "coco" / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
    return root


@pytest.fixture(scope="module")
def llava(files):
    return load_model(files / "llava", device="cpu")


def _eval_args(files: Path, out: Path, *extra: str, task: str = "pope") -> list[str]:
    data = {"pope": files / "pope", "sqa": files / "sqa", "textvqa": files / "textvqa", "chair": files / "coco"}[task]
    images = ["--images", str(files / "val2014")] if task == "pope" else []
    return ["eval", "--model", str(files / "llava"), "--task", task, "--data", str(data), *images,
            "--max-new-tokens", NEW, "--device", "cpu", "--out", str(out), *extra]


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _answers(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / ANSWERS_FILE).read_text().splitlines()]


def _by_key(rows: list[dict]) -> dict:
    return {(r.get("category"), r.get("question_id", r.get("image_id"))): r.get("text", r.get("caption")) for r in rows}


def _score(capsys, task: str, data: Path, predictions: Path, *extra: str) -> dict:
    code, out, err = _run(capsys, ["score", "--task", task, "--data", str(data), "--predictions", str(predictions),
                                   *extra])
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


# ----------------------------------------------------------------------------------------------------------


def test_pope_eval_then_score_and_rerun(files, tmp_path, capsys):
    out = tmp_path / "pope"
    code, stdout, err = _run(capsys, _eval_args(files, out, "--batch-size", "4"))
    assert code == 0, err
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert "answered 10 questions" in stdout and "questions/s" in stdout
    assert sorted(os.listdir(out)) == sorted([ANSWERS_FILE, SETTINGS_FILE, METRICS_FILE])
    rows = _answers(out)
    assert len(rows) == 10 and {tuple(sorted(r)) for r in rows} == {
        ("category", "model_id", "prompt", "question_id", "text")}
    assert {r["category"] for r in rows} == {"random", "popular"} and rows[0]["model_id"] == "llava"
    assert rows[0]["prompt"].endswith("\nAnswer the question using a single word or phrase.")
    assert json.loads((out / METRICS_FILE).read_text()) == metrics
    assert _score(capsys, "pope", files / "pope", out / ANSWERS_FILE) == metrics  # the same numbers, exactly
    assert metrics["n"] == 10 and set(metrics["splits"]) == {"random", "popular"}
    settings = json.loads((out / SETTINGS_FILE).read_text())["settings"]
    assert settings["task"] == "pope" and settings["prune_layer"] is None and settings["max_new_tokens"] == 3

    # a rerun answers nothing new; --strict only re-scores (the answers do not depend on it)
    before = (out / ANSWERS_FILE).read_bytes()
    code, stdout, err = _run(capsys, _eval_args(files, out, "--strict"))
    assert code == 0, err
    assert "answered 0 questions" in stdout and "10 already answered" in stdout
    assert (out / ANSWERS_FILE).read_bytes() == before
    strict = json.loads(stdout.strip().splitlines()[-1])
    assert strict == _score(capsys, "pope", files / "pope", out / ANSWERS_FILE, "--strict")
    assert strict["parsing"].startswith("strict")


def test_batch_sizes_and_pruning(files, llava, tmp_path):
    """The Python engine with a preloaded model (what a sweep does): batch 1 == batch 4 (left padding), unpruned and
    pruned; pruning at layer 1 changes answers."""
    model, processor = llava

    def answers(name: str, batch: int, **prune) -> dict:
        cfg = EvalConfig(model=str(files / "llava"), task="pope", data=files / "pope", images=files / "val2014",
                         out=tmp_path / name, batch_size=batch, max_new_tokens=4, device="cpu",
                         prune=PruneSpec(**prune))
        result = run_eval(cfg, model=model, processor=processor)
        assert result.generated == 10 and result.skipped == 0 and result.questions_per_second > 0
        return _by_key(_answers(tmp_path / name))

    full1, full4 = answers("b1", 1), answers("b4", 4)
    assert full1 == full4
    drop1, drop3 = answers("p1", 1, layer=1, keep=0), answers("p3", 3, layer=1, keep=0)
    assert drop1 == drop3
    assert drop1 != full1
    top1, top4 = (answers(f"k{b}", b, layer=2, keep=4, rank="attention") for b in (1, 4))
    assert top1 == top4
    settings = json.loads((tmp_path / "k4" / SETTINGS_FILE).read_text())["settings"]
    assert (settings["prune_layer"], settings["keep"], settings["rank"]) == (2, 4, "attention")


@pytest.mark.parametrize("task", ["sqa", "textvqa", "chair"])
def test_other_tasks_eval_then_score(files, tmp_path, capsys, task):
    out = tmp_path / task
    code, stdout, err = _run(capsys, _eval_args(files, out, "--batch-size", "2", task=task))
    assert code == 0, err
    metrics = json.loads(stdout.strip().splitlines()[-1])
    data = {"sqa": files / "sqa", "textvqa": files / "textvqa", "chair": files / "coco"}[task]
    assert _score(capsys, task, data, out / ANSWERS_FILE) == metrics
    rows = _answers(out)
    assert len(rows) == 2 and metrics["n"] == 2  # sqa: the question without an image is not asked
    if task == "chair":
        assert set(rows[0]) == {"image_id", "caption", "prompt", "model_id"}
        assert rows[0]["prompt"] == "Please describe this image in detail."
    else:
        assert set(rows[0]) == {"question_id", "prompt", "text", "model_id"}


def _start_and_signal(argv: list[str], out: Path, sig: int, min_lines: int) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    answers = out / ANSWERS_FILE
    return signal_when(slowed_flowkern("flowkern.eval.run", argv, 1.0), env,
                       lambda: answers.is_file() and answers.read_bytes().count(b"\n") >= min_lines, sig)


def test_resume_after_sigkill_and_sigint(files, tmp_path, capsys):
    out = tmp_path / "killed"
    argv = _eval_args(files, out, "--batch-size", "2")
    code, err = _start_and_signal(argv, out, signal.SIGKILL, 1)
    assert code == -signal.SIGKILL, err
    lines_after_kill = _answers(out)
    assert 2 <= len(lines_after_kill) < 10 and len(lines_after_kill) % 2 == 0  # whole batches only

    code, err = _start_and_signal(argv, out, signal.SIGINT, len(lines_after_kill) + 2)
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("flowkern eval: interrupted;") and "answers kept" in last and "Traceback" not in err
    kept = _answers(out)
    assert len(kept) > len(lines_after_kill) and kept[: len(lines_after_kill)] == lines_after_kill

    code, stdout, err = _run(capsys, argv)
    assert code == 0, err
    assert f"{len(kept)} already answered" in stdout
    resumed = _answers(out)
    assert len(resumed) == 10 and resumed[: len(kept)] == kept

    full = tmp_path / "uninterrupted"
    code, _, err = _run(capsys, _eval_args(files, full, "--batch-size", "2"))
    assert code == 0, err
    assert _by_key(resumed) == _by_key(_answers(full))
    assert (out / METRICS_FILE).read_text() == (full / METRICS_FILE).read_text()


def test_torn_last_line_is_dropped(files, tmp_path, capsys):
    out = tmp_path / "torn"
    assert _run(capsys, _eval_args(files, out, "--limit", "3"))[0] == 0
    whole = (out / ANSWERS_FILE).read_bytes()
    (out / ANSWERS_FILE).write_bytes(whole[: whole.rstrip(b"\n").rfind(b"\n") + 15])  # a kill mid-line
    code, stdout, err = _run(capsys, _eval_args(files, out, "--limit", "3"))
    assert code == 0, err
    assert "answered 1 questions" in stdout and "torn last line" in stdout
    assert (out / ANSWERS_FILE).read_bytes() == whole


def test_settings_mismatch_is_refused(files, tmp_path, capsys):
    out = tmp_path / "mismatch"
    assert _run(capsys, _eval_args(files, out, "--limit", "2"))[0] == 0
    before = _snapshot(out)
    for extra, needle in ((["--prune-layer", "2"], "--prune-layer was None, now 2"),
                          (["--max-new-tokens", "5"], "--max-new-tokens was 3, now 5")):
        argv = _eval_args(files, out, "--limit", "2", *extra)
        if extra[0] == "--max-new-tokens":
            argv = [a for i, a in enumerate(argv) if not (a == "--max-new-tokens" or argv[i - 1] == "--max-new-tokens")
                    ] + extra
        _one_line_error(*_run(capsys, argv)[::2], "--out", "other settings", needle)
        assert _snapshot(out) == before
    other = ["eval", "--model", str(files / "llava"), "--task", "pope", "--data", str(files / "pope" /
             "coco_pope_random.json"), "--images", str(files / "val2014"), "--max-new-tokens", NEW, "--out", str(out)]
    _one_line_error(*_run(capsys, other)[::2], "--data was")
    assert _snapshot(out) == before
    # --overwrite starts afresh; a larger --limit with the same settings resumes
    code, stdout, err = _run(capsys, _eval_args(files, out, "--limit", "1", "--prune-layer", "1", "--overwrite"))
    assert code == 0, err
    assert len(_answers(out)) == 1 and json.loads((out / SETTINGS_FILE).read_text())["settings"]["prune_layer"] == 1
    code, stdout, err = _run(capsys, _eval_args(files, out, "--limit", "3", "--prune-layer", "1"))
    assert code == 0 and "answered 2 questions" in stdout and "1 already answered" in stdout, err


def test_schedule_merge_and_scorer_parameters_recorded(files, llava, tmp_path, capsys):
    """`flowkern eval --prune-schedule ... --rank <scorer> --prune-merge` answers as the Python engine does with that
    PruneSpec; run.json records the schedule, the merge and the scorer with its parameters, and a resume under
    another schedule, merge or scorer parameter is refused naming it."""
    model, processor = llava
    out = tmp_path / "sched"
    flags = ["--limit", "2", "--prune-schedule", "0:0.5,2:4", "--rank", "diversity", "--prune-merge"]
    code, stdout, err = _run(capsys, _eval_args(files, out, *flags))
    assert code == 0, err
    spec = PruneSpec(schedule=((0, 0.5), (2, 4)), rank="diversity", merge=True)
    ref = run_eval(EvalConfig(model=str(files / "llava"), task="pope", data=files / "pope", images=files / "val2014",
                              out=tmp_path / "ref", limit=2, max_new_tokens=int(NEW), device="cpu", prune=spec),
                   model=model, processor=processor)
    assert _answers(out) == _answers(ref.out)
    settings = json.loads((out / SETTINGS_FILE).read_text())["settings"]
    assert (settings["prune_schedule"], settings["prune_merge"], settings["rank"], settings["prune_layer"]) == (
        [[0, 0.5], [2, 4]], True, "diversity", None)
    before = _snapshot(out)
    for i, needle in ((flags.index("0:0.5,2:4"), "--prune-schedule was [[0, 0.5], [2, 4]], now [[0, 0.5], [3, 4]]"),
                      (len(flags) - 1, "--prune-merge was True, now False")):
        other = list(flags)
        if other[i] == "--prune-merge":
            del other[i]
        else:
            other[i] = "0:0.5,3:4"
        _one_line_error(*_run(capsys, _eval_args(files, out, *other))[::2], "other settings", needle)
        assert _snapshot(out) == before
    bad = ["--prune-schedule", "0:4,2:2", "--rank", "text-attention"]  # no layer -1 to rank by: before the load
    _one_line_error(*_run(capsys, _eval_args(files, tmp_path / "bad", *bad))[::2], "rank='text-attention'",
                    "layer >= 1")
    # a scorer with parameters: recorded whole, and another parameter value is another setting
    from flowkern.eval.run import EvalUsageError
    from flowkern.scorers import get_scorer

    def union(share: float) -> EvalConfig:
        return EvalConfig(model=str(files / "llava"), task="pope", data=files / "pope", images=files / "val2014",
                          out=tmp_path / "union", limit=2, max_new_tokens=int(NEW), device="cpu",
                          prune=PruneSpec(layer=2, keep=4, rank=get_scorer("grid+attention", share=share)))

    run_eval(union(0.25), model=model, processor=processor)
    rank = json.loads((tmp_path / "union" / SETTINGS_FILE).read_text())["settings"]["rank"]
    assert rank == {"name": "grid+attention", "first": "grid", "then": "attention", "share": 0.25}
    with pytest.raises(EvalUsageError, match=r"--rank was \{.*'share': 0.25\}, now \{.*'share': 0.75\}"):
        run_eval(union(0.75), model=model, processor=processor)
    with pytest.raises(EvalUsageError, match=r"'share': 0.25\}, now 'grid\+attention'"):  # the defaults: its name
        run_eval(union(0.5), model=model, processor=processor)


def test_bad_input_is_one_line_exit_2_before_loading(files, tmp_path, capsys, monkeypatch):
    import flowkern.hf.loading

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(flowkern.hf.loading, "load_model", no_model)
    out = tmp_path / "out"

    # an existing run whose files must survive every failed attempt
    (tmp_path / "prev").mkdir()
    prev_answers = '{"question_id": 1, "prompt": "p", "text": "yes", "model_id": "m", "category": "random"}\n'
    (tmp_path / "prev" / ANSWERS_FILE).write_text(prev_answers + "{not json\n" + prev_answers)
    (tmp_path / "prev" / SETTINGS_FILE).write_text('{"settings": {}}\n')  # an eval folder (run.json): read, refused
    pope_bad = tmp_path / "pope_bad"
    pope_bad.mkdir()
    (pope_bad / "coco_pope_random.json").write_text(
        '{"question_id": 1, "image": "COCO_val2014_000000000000.jpg", "text": "Is there a dog?", "label": "yes"}\n'
        '{"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat?", \n')
    pope_missing = tmp_path / "pope_missing"
    write_pope(pope_missing, "random", [(1, "COCO_val2014_000000000000.jpg", "dog", "yes"),
                                        (2, "COCO_val2014_000000000099.jpg", "cat", "no")])
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    base = ["eval", "--model", str(files / "llava"), "--max-new-tokens", NEW]
    img = ["--images", str(files / "val2014")]
    cases = [
        (["--task", "vqav2", "--data", str(files / "pope"), "--out", str(out)], ["--task", "vqav2", "pope"]),
        (["--task", "pope", "--data", str(tmp_path / "nope.json"), *img, "--out", str(out)], ["--data", "nope.json"]),
        (["--task", "pope", "--data", str(pope_bad), *img, "--out", str(out)], ["coco_pope_random.json:2"]),
        (["--task", "pope", "--data", str(pope_missing), *img, "--out", str(out)],
         ["--images", "question 2", "COCO_val2014_000000000099.jpg", "not found"]),
        (["--task", "pope", "--data", str(files / "pope"), "--out", str(out)], ["--images", "not found"]),
        (["--task", "pope", "--data", str(files / "pope"), *img, "--out", str(blocker)], ["--out", "is a file"]),
        (["--task", "pope", "--data", str(files / "pope"), *img, "--out", str(blocker / "sub")],
         ["--out", "not a directory"]),
        (["--task", "pope", "--data", str(files / "pope"), *img, "--out", str(tmp_path / "prev")],
         ["--out", f"{ANSWERS_FILE}:2", "not a valid JSON line"]),
        (["--task", "sqa", "--data", str(files / "sqa"), "--strict", "--out", str(out)], ["--strict"]),
        (["--task", "pope", "--data", str(files / "pope"), *img, "--keep", "5", "--out", str(out)], ["--keep"]),
        (["--task", "pope", "--data", str(files / "pope"), *img, "--batch-size", "0", "--out", str(out)],
         ["--batch-size"]),
    ]
    prev = _snapshot(tmp_path / "prev")
    for extra, needles in cases:
        _one_line_error(*_run(capsys, [*base, *extra])[::2], *needles)
        assert not out.exists() and blocker.read_text() == "x" and _snapshot(tmp_path / "prev") == prev

    # a model that is not there: exit 2 after the checks, and nothing written
    monkeypatch.undo()
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--task", "pope", "--data", str(files / "pope"), *img,
            "--out", str(out)]
    _one_line_error(*_run(capsys, argv)[::2], "--model", "no-model")
    assert not (out / ANSWERS_FILE).exists()
    argv = [*base, "--task", "pope", "--data", str(files / "pope"), *img, "--prune-layer", "9", "--out", str(out)]
    code, _, err = _run(capsys, argv)  # after loading: transformers' loading bar precedes the one error line
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("flowkern eval: error: --prune-layer 9:") and "[0, 4)" in err
    assert not (out / ANSWERS_FILE).exists()
