"""Benchmarks read from the lmms-lab parquet releases (flowkern/eval/tasks/{parquet,lmms_lab,hubcache}.py): the same
questions written by the tests in both formats — the official JSON + image files, and parquet with the images
embedded, following the published schemas — give identical prompts, answers and metrics; dataset ids resolve in a
temporary Hugging Face cache, offline; malformed tables are one error naming the row and column, nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flowkern.cli import main
from flowkern.eval import get_task
from flowkern.eval.answers import METRICS_FILE
from flowkern.eval.run import EvalConfig, EvalUsageError, run_eval
from flowkern.eval.tasks.parquet import EmbeddedImage, open_images
from flowkern.hf.loading import load_model
from tests.fixtures import (
    save_eval_llava,
    save_image,
    write_coco,
    write_datasets_cache,
    write_lmms_pope,
    write_pope,
    write_sqa,
    write_table,
    write_textvqa,
)

pytestmark = pytest.mark.usefixtures("one_thread")

OBJECTS = ["dog", "cat", "car"]
CATEGORIES = ["adversarial", "random"]


def _pope_rows() -> list[dict]:
    return [{"question_id": q, "image": f"COCO_val2014_{(q + c) % 3:012d}.jpg",
             "question": f"Is there a {OBJECTS[(q + c) % 3]} in the image?", "answer": "yes" if (q + c) % 2 else "no",
             "category": cat} for c, cat in enumerate(CATEGORIES) for q in range(1, 4)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    save_eval_llava(root / "llava")
    for i in range(3):
        save_image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
    rows = _pope_rows()
    for cat in CATEGORIES:  # the official files: question ids 1.. in each split, as released
        write_pope(root / "pope", cat, [(r["question_id"], r["image"], r["question"].split()[3], r["answer"])
                                        for r in rows if r["category"] == cat])
    write_lmms_pope(root / "POPE", rows, images=root / "val2014")
    return root


@pytest.fixture(scope="module")
def llava(files):
    return load_model(files / "llava", device="cpu")


def _answers(path: Path) -> list[dict]:
    return [{k: r[k] for k in ("question_id", "prompt", "text", "category")} for r in map(json.loads, path.open())]


def _without_protocol(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "protocol"}


@pytest.mark.parametrize("split", [None, "adversarial", "Full/random"])
def test_pope_parquet_equals_official_json(files, llava, tmp_path, split):
    model, processor = llava
    official = files / "pope" if split is None else files / "pope" / f"coco_pope_{split.split('/')[-1]}.json"
    common = dict(model=str(files / "llava"), task="pope", max_new_tokens=3, batch_size=2)
    a = run_eval(EvalConfig(data=official, images=files / "val2014", out=tmp_path / "json", **common),
                 model=model, processor=processor)
    b = run_eval(EvalConfig(data=files / "POPE", split=split, out=tmp_path / "parquet", **common),
                 model=model, processor=processor)
    assert _answers(a.answers_path) == _answers(b.answers_path)
    assert _without_protocol(a.metrics) == _without_protocol(b.metrics)
    if split is None:
        assert set(b.metrics["splits"]) == set(CATEGORIES) and "split_mean" in b.metrics
    source = json.loads((tmp_path / "parquet" / METRICS_FILE).read_text())["protocol"]["source"]
    assert source["format"] == "parquet" and source["subset"] == ("default" if split is None else "Full")
    assert json.loads((tmp_path / "json" / METRICS_FILE).read_text())["protocol"]["source"]["format"] == \
        "official json"
    # `flowkern score` reads the parquet run's answers against either format
    for data in (files / "POPE", official):
        assert main(["score", "--task", "pope", "--data", str(data), "--predictions",
                     str(b.answers_path)]) == 0


def test_embedded_images_decode_like_the_files(files):
    task = get_task("pope", files / "POPE")
    assert all(isinstance(s.image, EmbeddedImage) for s in task.samples)
    decoded = open_images([s.image for s in task.samples])
    from PIL import Image

    for sample, image in zip(task.samples, decoded, strict=True):
        name = next(r["image"] for r in _pope_rows() if r["category"] == sample.split
                    and str(r["question_id"]) == str(sample.id))
        with Image.open(files / "val2014" / name) as ref:
            assert image.tobytes() == ref.convert("RGB").tobytes()


def test_split_errors_list_what_exists(files, tmp_path):
    with pytest.raises(ValueError, match=r"no split 'nope' \(it has: Full \(adversarial, random\); default \(test\)\)"):
        get_task("pope", files / "POPE", split="nope")
    with pytest.raises(ValueError, match="no subset 'Bad'"):
        get_task("pope", files / "POPE", split="Bad/test")
    with pytest.raises(ValueError, match="--images"):
        get_task("pope", files / "POPE", images=files / "val2014")
    with pytest.raises(EvalUsageError, match="--split applies"):
        run_eval(EvalConfig(model="x", task="pope", data=files / "pope", split="random", out=tmp_path / "o"))


def test_dataset_id_in_the_hub_cache(files, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "datasets--lmms-lab--POPE" / "snapshots" / rev
    snapshot.parent.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(rev)
    snapshot.symlink_to(files / "POPE", target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.chdir(tmp_path)
    task = get_task("pope", "lmms-lab/POPE", split="random")
    assert len(task.samples) == 3
    source = task.score({s.id: "yes" for s in task.samples})["protocol"]["source"]
    assert source["dataset"] == "lmms-lab/POPE" and source["revision"] == rev and source["split"] == ["random"]
    assert len(get_task("pope", f"lmms-lab/POPE@{rev[:8]}")) == 6

    with pytest.raises(FileNotFoundError, match="huggingface-cli download --repo-type dataset lmms-lab/TextVQA"):
        get_task("textvqa", "lmms-lab/TextVQA")
    code = main(["eval", "--model", str(files / "llava"), "--task", "pope", "--data", "lmms-lab/POPE-missing",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(cache / "datasets--lmms-lab--POPE-missing") in err
    assert not (tmp_path / "out").exists()


def test_save_to_disk_arrow_layout(files, tmp_path):
    """A ``datasets`` ``save_to_disk`` export: ``dataset_dict.json`` and ``<split>/data-*.arrow`` (Arrow streams)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(files / "POPE" / "data" / "test-00000-of-00001.parquet")
    out = tmp_path / "pope_disk"
    (out / "test").mkdir(parents=True)
    (out / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    (out / "test" / "state.json").write_text(json.dumps({"_split": "test"}))
    with pa.OSFile(str(out / "test" / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)
    a, b = get_task("pope", files / "POPE"), get_task("pope", out)
    assert [(s.key, s.prompt, s.reference, s.split) for s in a] == [(s.key, s.prompt, s.reference, s.split) for s in b]
    assert [im.tobytes() for im in open_images([s.image for s in a])] == \
        [im.tobytes() for im in open_images([s.image for s in b])]


def _bad_pope(tmp_path: Path, files: Path, change: str) -> Path:
    rows = _pope_rows()[:3]
    images = [(files / "val2014" / r["image"]).read_bytes() for r in rows]
    cols = {"question_id": ("str", [str(r["question_id"]) for r in rows]),
            "question": ("str", [r["question"] for r in rows]), "answer": ("str", [r["answer"] for r in rows]),
            "category": ("str", [r["category"] for r in rows]), "image": ("image", images)}
    if change == "missing":
        del cols["answer"]
    elif change == "type":
        cols["question"] = ("int", [1, 2, 3])
    elif change == "null":
        images[1] = None
    elif change == "truncated":  # the header reads, the pixels do not: only a full decode finds it
        images[2] = images[2][: len(images[2]) // 2]
    else:
        images[2] = b"not an image"
    return write_table(tmp_path / "bad" / "test-00000-of-00001.parquet", cols)


@pytest.mark.parametrize("change,message", [
    ("missing", r"no column 'answer' \(columns: "),
    ("type", "column 'question' has type int64, expected a string"),
    ("image", r"row 2: column 'image': not a readable image"),
    ("truncated", r"row 2: column 'image': not a readable image"),
    ("null", r"row 1: column 'image': no image bytes"),
])
def test_malformed_parquet_is_one_error_nothing_written(files, tmp_path, capsys, change, message):
    bad = _bad_pope(tmp_path, files, change)
    out = tmp_path / "out"
    code = main(["eval", "--model", str(files / "llava"), "--task", "pope", "--data", str(bad.parent),
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(bad) in err
    assert re.search(message, err), err
    assert not out.exists()


def _png(i: int, tmp: Path) -> bytes:
    return save_image(tmp / f"{i}.png", i).read_bytes()


def test_sqa_textvqa_chair_tables_equal_official(files, tmp_path):
    """Task level (no model): the same prompts, references and metrics of fixed answers from both formats."""
    problems = {str(p): {"question": f"Which animal is shown {p}?", "choices": ["dog", "cat", "car"][: 2 + p % 2],
                         "answer": p % 2, "hint": "A zoo." if p % 2 else "", "image": "image.png",
                         "category": ["Animals", "Cars"][p % 2]} for p in range(1, 5)}
    write_sqa(tmp_path / "sqa", problems, {"test": list(problems)})
    write_table(tmp_path / "ScienceQA" / "ScienceQA-IMG" / "test-00000-of-00001.parquet", {
        "image": ("image", [_png(int(p), tmp_path) for p in problems]),
        "question": ("str", [p["question"] for p in problems.values()]),
        "choices": ("strs", [p["choices"] for p in problems.values()]),
        "answer": ("int", [p["answer"] for p in problems.values()]),
        "hint": ("str", [p["hint"] for p in problems.values()]),
        "category": ("str", [p["category"] for p in problems.values()])})
    a, b = get_task("sqa", tmp_path / "sqa"), get_task("sqa", tmp_path / "ScienceQA")
    assert [s.prompt for s in a] == [s.prompt for s in b] and [s.reference for s in a] == [s.reference for s in b]
    texts = ["A", "b", "C.", "x"]
    ma = a.score({s.id: t for s, t in zip(a, texts, strict=True)})
    mb = b.score({s.id: t for s, t in zip(b, texts, strict=True)})
    assert _without_protocol(ma) == _without_protocol(mb)

    entries = [{"question_id": 30 + i, "image_id": f"img{i}", "question": f"what is written {i}?",
                "answers": ["stop", "stop", "go"] * 3 + ["stop"], "ocr_tokens": ["stop", f"t{i}"]} for i in range(3)]
    write_textvqa(tmp_path / "textvqa", entries)
    write_table(tmp_path / "textvqa_pq" / "data" / "validation-00000-of-00001.parquet", {
        "image_id": ("str", [e["image_id"] for e in entries]),
        "question_id": ("int", [e["question_id"] for e in entries]),
        "question": ("str", [e["question"] for e in entries]), "answers": ("strs", [e["answers"] for e in entries]),
        "ocr_tokens": ("strs", [e["ocr_tokens"] for e in entries]),
        "image": ("image", [_png(i, tmp_path) for i in range(3)])})
    write_table(tmp_path / "textvqa_pq" / "data" / "test-00000-of-00001.parquet", {
        "image_id": ("str", ["x"]), "question_id": ("int", [99]), "question": ("str", ["?"]), "answers": ("strs", [[]]),
        "ocr_tokens": ("strs", [[]]), "image": ("image", [_png(0, tmp_path)])})
    for ocr in (False, True):
        a = get_task("textvqa", tmp_path / "textvqa", ocr=ocr)
        b = get_task("textvqa", tmp_path / "textvqa_pq", ocr=ocr)
        assert [s.prompt for s in a] == [s.prompt for s in b]
        preds = {e["question_id"]: t for e, t in zip(entries, ["Stop", "go", "no"], strict=True)}
        ma, mb = a.score(preds), b.score(preds)
        assert _without_protocol(ma) == _without_protocol(mb) and mb["protocol"]["ocr"] is ocr

    captions = {1: ["a dog on a couch", "a dog sleeping"], 2: ["a car and a bus", "a red car"]}
    write_coco(tmp_path / "coco", {i: ([], c) for i, c in captions.items()})
    write_table(tmp_path / "COCO" / "data" / "val-00000-of-00001.parquet", {
        "question_id": ("str", [f"COCO_val2014_{i:012d}.jpg" for i in captions]),
        "question": ("str", ["Provide a one-sentence caption for the provided image."] * 2),
        "answer": ("strs", list(captions.values())), "id": ("int", [7, 8]),
        "image": ("image", [_png(i, tmp_path) for i in captions])})
    a, b = get_task("chair", tmp_path / "coco"), get_task("chair", tmp_path / "COCO")
    assert [(s.id, s.prompt) for s in a] == [(s.id, s.prompt) for s in b]
    preds = {1: "A dog and a cat on a couch.", 2: "A car."}
    assert _without_protocol(a.score(preds)) == _without_protocol(b.score(preds))


def test_cli_eval_and_sweep_on_parquet(files, tmp_path, capsys):
    """The commands end to end on a parquet folder: `--split` through the CLI, and every sweep point's metrics.json
    with the protocol of the tables it read."""
    common = ["--model", str(files / "llava"), "--task", "pope", "--data", str(files / "POPE"), "--split",
              "random", "--max-new-tokens", "2", "--batch-size", "3", "--device", "cpu"]
    assert main(["eval", *common, "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / METRICS_FILE).read_text())
    assert metrics["n"] == 3 and metrics["protocol"]["source"]["split"] == ["random"]
    run = json.loads((tmp_path / "eval" / "run.json").read_text())["settings"]
    assert run["split"] == "Full/random" and run["images"] is None
    answers = str(tmp_path / "eval" / "answers.jsonl")
    assert main(["score", "--task", "pope", "--data", str(files / "POPE"), "--split", "random", "--predictions",
                 answers]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["missing"] == 0
    assert main(["sweep", *common, "--layers", "1", "--out", str(tmp_path / "sweep")]) == 0
    points = sorted((tmp_path / "sweep" / "points").glob(f"*/{METRICS_FILE}"))
    assert len(points) == 2
    for path in points:
        protocol = json.loads(path.read_text())["protocol"]
        assert protocol["source"]["format"] == "parquet" and protocol["source"]["subset"] == "Full"
    capsys.readouterr()


def test_dataset_id_in_the_datasets_cache(files, tmp_path, monkeypatch):
    """Only the datasets Arrow cache under $HF_HOME (what `load_dataset` leaves): found there, the newest build of a
    subset read, never an older one beside it."""
    import os

    for k in [k for k in os.environ if k.startswith(("HF_", "HUGGINGFACE_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    parquet = files / "POPE" / "data" / "test-00000-of-00001.parquet"
    old = write_datasets_cache(tmp_path / "hf" / "datasets", "lmms-lab/POPE", "default", "test", parquet, build="a")
    new = write_datasets_cache(tmp_path / "hf" / "datasets", "lmms-lab/POPE", "default", "test", parquet, build="b")
    os.utime(old, (1, 1))
    task = get_task("pope", "lmms-lab/POPE")
    assert len(task) == 6 and {s.image.file.parent for s in task.samples} == {new}
    from flowkern.eval.tasks import Prediction

    scored = task.score([Prediction(s.id, "no", {"category": s.split}) for s in task.samples])
    source = scored["protocol"]["source"]
    assert source["format"] == "arrow" and source["revision"] is None and source["dataset"] == "lmms-lab/POPE"
    decoded = open_images([task.samples[0].image])[0]
    assert decoded.size == open_images([get_task("pope", files / "POPE").samples[0].image])[0].size
