"""The lmms-eval model wrapper (flowkern/lmms_plugin.py) through lmms-eval's model interface: requests in, answers out.

lmms-eval itself is rarely installed here (its dependencies are heavy), so every interface test runs twice: with a
stand-in of ``lmms_eval.api.instance.Instance`` that mirrors the real class of lmms-eval 0.7.3 (fields
``request_type, arguments, idx, metadata``; ``args``; ``task_name, doc_id, repeats`` from ``metadata``), and with
the real class when lmms-eval is importable (skipped otherwise). The registry test needs the real lmms-eval.

The end-to-end test runs the real ``lmms-eval --model flowkern --tasks pope`` command (the entry-point plugin)
offline on a shapes-POPE set written in the lmms-lab layout into a temporary Hugging Face cache, and compares its
numbers with ``flowkern eval --data lmms-lab-encoder/POPE --strict`` on the same cache.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from flowkern import lmms_plugin
from flowkern.eval.answers import ANSWERS_FILE
from flowkern.eval.run import EvalConfig, run_eval
from flowkern.hf.loading import load_model
from flowkern.lmms_plugin import FlowkernLMM
from flowkern.plan import PruneSpec
from tests.fixtures import save_eval_llava, save_image, write_datasets_cache, write_lmms_pope, write_pope

try:
    from lmms_eval.api.instance import Instance as RealInstance
except ImportError:
    RealInstance = None


@dataclass
class StandInInstance:
    """Mirrors ``lmms_eval.api.instance.Instance`` (lmms-eval 0.7.3)."""

    request_type: str
    arguments: tuple
    idx: int
    metadata: dict = field(default_factory=dict)
    resps: list = field(default_factory=list)
    filtered_resps: dict = field(default_factory=dict)
    task_name: str | None = None
    doc_id: Any = None
    repeats: Any = None
    doc: dict | None = None

    def __post_init__(self) -> None:
        self.task_name, self.doc_id, self.repeats = self.metadata["task"], self.metadata["doc_id"], \
            self.metadata["repeats"]

    @property
    def args(self) -> tuple:
        return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)


INSTANCES = [pytest.param(StandInInstance, id="stand-in"),
             pytest.param(RealInstance, id="lmms-eval",
                          marks=pytest.mark.skipif(RealInstance is None, reason="lmms-eval is not installed"))]
POST_PROMPT = "\nAnswer the question using a single word or phrase."  # lmms-eval's pope.yaml post_prompt
GEN = {"max_new_tokens": 3, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False, "until": ["\n\n"]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    save_eval_llava(root / "llava")
    for i in range(3):
        save_image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
    write_pope(root / "pope", "random", [(q, f"COCO_val2014_{q % 3:012d}.jpg", ["dog", "cat", "car"][q % 3],
                                          "yes" if q % 2 else "no") for q in range(1, 6)])
    return root


@pytest.fixture(scope="module")
def llava(files):
    return load_model(files / "llava", device="cpu")


def _pope_docs(files) -> list[dict]:
    """POPE as lmms-eval's lmms-lab/POPE dataset rows: question_id, question, answer, image (PIL)."""
    rows = [json.loads(line) for line in (files / "pope" / "coco_pope_random.json").read_text().splitlines()]
    return [{"question_id": r["question_id"], "question": r["text"], "answer": r["label"],
             "image": Image.open(files / "val2014" / r["image"])} for r in rows]


def _requests(instance_cls, docs, gen=GEN) -> list:
    def doc_to_visual(doc):  # lmms-eval's pope_doc_to_visual
        return [doc["image"].convert("RGB")]

    return [instance_cls(request_type="generate_until",
                         arguments=(f"{d['question'].strip()}{POST_PROMPT}", dict(gen), doc_to_visual, i, "pope",
                                    "test"),
                         idx=0, metadata={"task": "pope", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]


@pytest.mark.parametrize("instance_cls", INSTANCES)
@pytest.mark.parametrize("prune", [{}, {"prune_layer": 2, "keep": 0},
                                   {"prune_layer": -2, "keep": 0.25, "rank": "diversity", "prune_merge": True}],
                         ids=["unpruned", "pruned", "diversity-merge"])
def test_generate_until_equals_flowkern_eval(files, llava, tmp_path, instance_cls, prune):
    model, processor = llava
    lm = FlowkernLMM(pretrained=str(files / "llava"), batch_size=2, model=model, processor=processor, **prune)
    docs = _pope_docs(files)
    lm.task_dict = {"pope": {"test": docs}}
    answers = lm.generate_until(_requests(instance_cls, docs))
    assert len(answers) == len(docs) and all(isinstance(a, str) for a in answers)

    result = run_eval(EvalConfig(model=str(files / "llava"), task="pope", data=files / "pope" / "coco_pope_random.json",
                                 images=files / "val2014", out=tmp_path / "run", max_new_tokens=3, batch_size=3,
                                 prune=PruneSpec.from_dict(prune, options=True)), model=model, processor=processor)
    assert result.generated == len(docs)
    expected = {r["question_id"]: r["text"] for r in map(json.loads, (tmp_path / "run" / ANSWERS_FILE).open())}
    assert {d["question_id"]: a for d, a in zip(docs, answers, strict=True)} == expected
    assert (lm.pruning is None) == (not prune)
    if prune:  # the whole setting, its layer resolved (-2 of 4 layers: 2)
        assert lm.prune_settings == PruneSpec.from_dict(dict(prune, prune_layer=2), options=True).to_dict()


@pytest.mark.parametrize("instance_cls", INSTANCES)
def test_until_max_new_tokens_and_errors(files, llava, instance_cls):
    model, processor = llava
    lm = FlowkernLMM(pretrained=str(files / "llava"), model=model, processor=processor)
    docs = _pope_docs(files)[:2]
    lm.task_dict = {"pope": {"test": docs}}
    full = lm.generate_until(_requests(instance_cls, docs, dict(GEN, max_new_tokens=4, until=[])))
    assert all(len(a.split()) >= 2 for a in full)  # 4 tokens of a random model: several words
    first_word = full[0].split()[1]
    cut = lm.generate_until(_requests(instance_cls, docs[:1], dict(GEN, max_new_tokens=4, until=[first_word])))
    assert cut == [full[0].split(first_word)[0]]
    one = lm.generate_until(_requests(instance_cls, docs, dict(GEN, max_new_tokens=1, until=[])))
    assert all(f.startswith(o) and len(o) < len(f) for f, o in zip(full, one, strict=True))  # greedy: a prefix

    with pytest.raises(ValueError, match="greedily only"):
        lm.generate_until(_requests(instance_cls, docs, dict(GEN, temperature=0.7, do_sample=True)))
    with pytest.raises(ValueError, match="beam"):
        lm.generate_until(_requests(instance_cls, docs, dict(GEN, num_beams=3)))
    text_only = [instance_cls(request_type="generate_until", arguments=("hi", dict(GEN), lambda d: [], 0, "pope",
                                                                        "test"),
                              idx=0, metadata={"task": "pope", "doc_id": 0, "repeats": 1})]
    with pytest.raises(ValueError, match="no image"):
        lm.generate_until(text_only)
    with pytest.raises(ValueError, match="unknown argument.*temperature"):
        FlowkernLMM(pretrained=str(files / "llava"), model=model, processor=processor, temperature=1)
    with pytest.raises(ValueError, match="prune_layer"):
        FlowkernLMM(pretrained=str(files / "llava"), model=model, processor=processor, prune_layer="two")


@pytest.mark.parametrize("instance_cls", INSTANCES)
def test_loglikelihood(files, llava, instance_cls):
    """Against a plain forward of the prompt (unpruned): log P(word | prompt) of one-token continuations, and
    is_greedy exactly for the most likely word; with pruning the numbers change but stay consistent."""
    from flowkern.hf.inputs import build_inputs

    model, processor = llava
    docs = _pope_docs(files)[:1]
    context = f"{docs[0]['question']}{POST_PROMPT}"
    words = ["yes", "no", "dog", "cat", *(f"w{i}" for i in range(40))]
    with torch.no_grad():
        logits = model(**build_inputs(processor, model, docs[0]["image"], context)).logits[0, -1]
    reference = torch.log_softmax(logits.double(), dim=-1)
    ids = processor.tokenizer.convert_tokens_to_ids(words)
    for prune in ({}, {"prune_layer": 1, "keep": 0}):
        lm = FlowkernLMM(pretrained=str(files / "llava"), model=model, processor=processor, **prune)
        lm.task_dict = {"pope": {"test": docs}}
        requests = [instance_cls(request_type="loglikelihood",
                                 arguments=(context, f" {w}", lambda d: [d["image"]], 0, "pope", "test"),
                                 idx=0, metadata={"task": "pope", "doc_id": 0, "repeats": 1}) for w in words]
        results = lm.loglikelihood(requests)
        scores = torch.tensor([lp for lp, _ in results], dtype=torch.float64)
        assert (scores < 0).all()
        best = int(scores.argmax())
        greedy = [g for _, g in results]
        assert greedy == [i == best for i in range(len(words))] or (not any(greedy) and int(logits.argmax()) not in ids)
        if not prune:
            torch.testing.assert_close(scores, reference[ids], atol=1e-5, rtol=0)
        else:
            assert (scores - reference[ids]).abs().max() > 1e-3  # the image is gone from layer 1 on


def test_registry_and_model_args(files):
    """lmms-eval's own resolution: manifest -> ModelRegistryV2 -> class (a subclass of lmms, is_simple) ->
    create_from_arg_string with the --model_args string and the extra arguments the evaluator passes."""
    pytest.importorskip("lmms_eval.models.registry_v2")
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    assert registry._coerce_payload_to_manifests(lmms_plugin.manifest)[0].model_id == "flowkern"  # entry-point payload
    lmms_plugin.register(registry)
    cls = registry.get_model_class("flowkern")
    assert cls is FlowkernLMM and issubclass(cls, lmms)
    lm = cls.create_from_arg_string(f"pretrained={files / 'llava'},prune_layer=2,keep=0",
                                    {"batch_size": 4, "max_batch_size": None, "device": "cpu"})
    assert lm.pruning.layer == 2 and lm.pruning.keep == 0 and lm.batch_size == 4 and lm.device.type == "cpu"
    lm = cls.create_from_arg_string(f"pretrained={files / 'llava'},prune_layer=2,keep=25%,rank=random",
                                    {"batch_size": None, "device": "cpu"})
    assert lm.pruning.keep == 0.25 and lm.pruning.rank == "random" and lm.batch_size == 1


def test_schedule_and_merge_model_args(files, llava, monkeypatch):
    """``prune_schedule`` / ``prune_merge`` reach the PruneSpec handed to flowkern.prune: from lmms-eval's argument
    string (a schedule's commas kept together by brackets or quotes, or written with ``;``) and from Python."""
    model, processor = llava
    given = []
    monkeypatch.setattr(lmms_plugin, "prune", lambda m, spec: given.append(spec) or spec)
    want = PruneSpec(schedule=((1, 0.5), (3, 0.25)), merge=True)
    for text in ("[1:0.5,3:0.25]", '"1:0.5,3:0.25"', "1:0.5;3:0.25"):
        args = _parse_model_args(text)
        lm = FlowkernLMM(pretrained=str(files / "llava"), model=model, processor=processor, **args)
        assert lm.prune_spec == want and given[-1] == want and lm.prune_settings == want.to_dict()
    lm = FlowkernLMM(pretrained=str(files / "llava"), model=model, processor=processor, prune_schedule=[(1, 0.5)])
    assert lm.prune_spec == PruneSpec(schedule=((1, 0.5),))
    for bad, name in (({"prune_schedule": "1:0.5,x"}, "prune_schedule"), ({"prune_merge": "maybe"}, "prune_merge")):
        with pytest.raises(ValueError, match=name):
            FlowkernLMM(pretrained=str(files / "llava"), model=model, processor=processor, **bad)


def _parse_model_args(schedule: str) -> dict:
    """lmms-eval's parsing of ``--model_args`` (its own function when installed)."""
    try:
        from lmms_eval.utils import simple_parse_args_string
    except ImportError:
        return {"prune_schedule": schedule.strip('"'), "prune_merge": True}
    return simple_parse_args_string(f"prune_schedule={schedule},prune_merge=true")


def test_entry_point_is_discovered(tmp_path, monkeypatch):
    """With the pyproject entry point ``[project.entry-points."lmms_eval.models"] flowkern = ...`` installed (here: a
    dist-info folder on sys.path carrying the same entry_points.txt), lmms-eval's own discovery finds the model."""
    pytest.importorskip("lmms_eval.models.registry_v2")
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    info = tmp_path / "flowkern_entry_point_check-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flowkern-entry-point-check\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text('[lmms_eval.models]\nflowkern = flowkern.lmms_plugin:manifest\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("flowkern") is FlowkernLMM


def test_imports_without_lmms_eval():
    """The module is importable either way; without lmms-eval only manifest()/register() refuse."""
    if lmms_plugin.HAVE_LMMS_EVAL:
        assert lmms_plugin.manifest().simple_class_path == "flowkern.lmms_plugin.FlowkernLMM"
    else:
        with pytest.raises(ImportError, match="lmms-eval"):
            lmms_plugin.manifest()


LMMS_POPE = "lmms-lab-encoder/POPE"  # lmms-eval 0.7.3's pope.yaml dataset_path
REVISION = "5" * 40


def _lmms_eval_cli() -> Path:
    """The ``lmms-eval`` command of this interpreter's environment, or a skip saying what is missing (a failure
    when FLOWKERN_REQUIRE_LMMS_EVAL=1, as in CI, so that the real run is never skipped there unnoticed)."""
    missing = _missing_for_lmms_eval()
    if missing is not None:
        if os.environ.get("FLOWKERN_REQUIRE_LMMS_EVAL") == "1":
            pytest.fail(f"FLOWKERN_REQUIRE_LMMS_EVAL=1 but {missing}")
        pytest.skip(missing)
    return Path(sys.executable).parent / "lmms-eval"


def _missing_for_lmms_eval() -> str | None:
    try:
        import lmms_eval.evaluator  # noqa: F401
    except ImportError as exc:
        return f"lmms-eval and its run dependencies are not installed ({exc})"
    for module, why in (("filelock._api", "lmms-eval 0.7.3 needs filelock<4 (it patches filelock._api)"),
                        ("pytablewriter", "lmms-eval's results table needs pytablewriter")):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            return why
    if not (Path(sys.executable).parent / "lmms-eval").is_file():
        return f"no lmms-eval command beside {sys.executable}"
    return None


def _lmms_lab_pope(root: Path) -> Path:
    """shapes-POPE (the demo model's world) in lmms-lab/POPE's layout, as `huggingface-cli download` and
    `datasets.load_dataset` leave it in ``root`` (an HF_HOME): the hub snapshot and the datasets Arrow cache."""
    from flowkern.shapes import write_pope as shapes_pope

    shapes = shapes_pope(root / "shapes", seed=11, num=3)
    rows = [{"question_id": r["question_id"], "image": r["image"], "question": r["text"], "answer": r["label"],
             "category": split}
            for split in ("adversarial", "popular", "random")
            for r in map(json.loads, (shapes / f"coco_pope_{split}.json").read_text().splitlines())]
    repo = root / "hub" / f"datasets--{LMMS_POPE.replace('/', '--')}"
    write_lmms_pope(repo / "snapshots" / REVISION, rows, images=shapes / "images")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    write_datasets_cache(root / "datasets", LMMS_POPE, "default", "test",
                         repo / "snapshots" / REVISION / "data" / "test-00000-of-00001.parquet")
    return root


def test_real_lmms_eval_pope_run_equals_flowkern_eval(tmp_path, monkeypatch):
    """`lmms-eval --model flowkern --tasks pope`, offline, through the installed entry point, on the demo model:
    the same answers as `flowkern eval`, and the same accuracy / precision / recall / F1 as its strict (lmms-eval)
    parsing; lmms-eval's pope_yes_ratio is the share of *yes labels*, flowkern's the share of yes answers."""
    cli = _lmms_eval_cli()
    from flowkern.demo import demo_model_path

    hf_home = _lmms_lab_pope(tmp_path / "hf")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = tmp_path / "lmms"
    # pruned (image tokens gone from layer 3 on): the demo model then errs both ways and gives two answers that
    # are neither yes nor no, which lmms-eval leaves out of recall's denominator
    args = ["--model", "flowkern", "--model_args", f"pretrained={demo_model_path()},device=cpu,prune_layer=3,keep=0",
            "--tasks", "pope",
            "--batch_size", "4", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run([str(cli), *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(Path(glob.glob(str(out / "**" / "*_results.json"), recursive=True)[0]).read_text())
    lmms = {k.split(",")[0].removeprefix("pope_"): v for k, v in results["results"]["pope"].items()
            if k.endswith(",none") and "stderr" not in k}
    samples = [json.loads(line) for f in glob.glob(str(out / "**" / "*_samples_pope.jsonl"), recursive=True)
               for line in Path(f).read_text().splitlines()]

    for k in [k for k in os.environ if k.startswith(("HF_", "HUGGINGFACE_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    result = run_eval(EvalConfig(model=str(demo_model_path()), task="pope", data=LMMS_POPE, strict=True,
                                 out=tmp_path / "flowkern", batch_size=4, device="cpu",
                                 prune=PruneSpec(layer=3, keep=0)))
    m = result.metrics
    assert m["n"] == len(samples) == 18 and m["protocol"]["source"]["revision"] == REVISION
    # shapes-POPE's question ids are unique across the splits: lmms-eval's samples match by id alone
    ours = {str(r["question_id"]): r["text"].lower().strip() for r in map(json.loads, result.answers_path.open())}
    theirs = {s["pope_accuracy"]["question_id"]: s["pope_accuracy"]["prediction"] for s in samples}
    assert len(ours) == len(theirs) == len(samples) and theirs == ours
    for key in ("accuracy", "precision", "recall"):
        assert lmms[key] == pytest.approx(m[key], abs=1e-12), key
    assert lmms["f1_score"] == pytest.approx(m["f1"], abs=1e-12)
    labels_yes = sum(s["pope_accuracy"]["ground_truth"] == "yes" for s in samples) / len(samples)
    assert lmms["yes_ratio"] == pytest.approx(labels_yes) and m["yes_ratio"] == pytest.approx(
        sum(t == "yes" for t in ours.values()) / len(ours))
    assert m["counts"]["other"] > 0 and m["yes_ratio"] != lmms["yes_ratio"]  # the documented difference
    print(json.dumps({"lmms_eval": lmms, "flowkern_strict": {k: m[k] for k in
                                                             ("accuracy", "precision", "recall", "f1", "yes_ratio")}}))
