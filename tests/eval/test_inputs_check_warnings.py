"""ScienceQA answer files as LLaVA writes them (issue 36 class 7) and the promised warnings and messages (class 8):
prompts past max_position_embeddings in eval, a ./demo folder beside --model demo, prune(keep=np.int64(4)),
prune(model=None), cam(layers='0,1')."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import flowkern
from flowkern.cli import main
from flowkern.cli.common import model_argument
from flowkern.demo import demo_model_path, resolve_model
from flowkern.hf.inputs import InputWarning, build_inputs
from flowkern.hf.loading import load_model
from tests.fixtures import save_eval_llava, save_image, write_jsonl, write_pope, write_sqa

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LLaVA (16 image tokens), a copy trained on 40 positions only, POPE questions on two images."""
    root = tmp_path_factory.mktemp("inputs_warnings")
    save_eval_llava(root / "llava")
    shutil.copytree(root / "llava", root / "short")
    config = json.loads((root / "short" / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 40
    (root / "short" / "config.json").write_text(json.dumps(config))
    for i in range(2):
        save_image(root / "val2014" / f"{i}.jpg", i)
    write_pope(root / "pope", "random", [(q, f"{q % 2}.jpg", "dog", "yes") for q in range(3)])
    return root


@pytest.fixture(scope="module")
def llava(files):
    return load_model(files / "llava", device="cpu")


def test_sqa_llava_answer_file_scored_with_the_ignored_counted(tmp_path, capsys):
    problem = {"question": "Which is a dog?", "choices": ["cat", "dog"], "answer": 1, "image": "image.png"}
    data = write_sqa(tmp_path / "sqa", {"1": problem, "2": {**problem, "image": None}, "3": problem},
                     {"test": ["1", "2"], "val": ["3"]})
    answers = write_jsonl(tmp_path / "llava-test.jsonl", [
        {"question_id": pid, "prompt": "Q", "text": "B", "answer_id": pid, "model_id": "llava", "metadata": {}}
        for pid in ("1", "2", "3")])
    assert main(["score", "--task", "sqa", "--data", str(data), "--predictions", str(answers)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "1 predictions scored; 2 predictions ignored (questions outside the scored subset)" in out[0]
    metrics = json.loads(out[-1])
    assert (metrics["n"], metrics["ignored"], metrics["accuracy"]) == (1, 2, 1.0)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": "77", "text": "B"}])
    assert main(["score", "--task", "sqa", "--data", str(data), "--predictions", str(bad)]) == 2
    assert "question_id '77' is not in the sqa data" in capsys.readouterr().err


def test_eval_warns_once_past_max_position_embeddings(files, tmp_path, capsys):
    argv = ["eval", "--model", str(files / "short"), "--task", "pope", "--data", str(files / "pope"), "--images",
            str(files / "val2014"), "--max-new-tokens", "12", "--device", "cpu", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1, warned
    assert warned[0].startswith("flowkern: warning: --max-new-tokens: the run needs ")
    assert "max_position_embeddings=40" in warned[0]
    from flowkern.eval.run import EvalConfig, run_eval

    config = EvalConfig(model=str(files / "short"), task="pope", data=files / "pope", images=files / "val2014",
                        out=tmp_path / "api", max_new_tokens=12, limit=1, device="cpu")
    with pytest.warns(InputWarning, match="max_position_embeddings=40"):  # the library warns through `warnings`
        run_eval(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([*argv[:2], str(files / "llava"), *argv[3:-1], str(tmp_path / "fits")]) == 0  # 256: no warning


def test_a_demo_folder_does_not_shadow_the_shipped_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_argument("demo") == str(demo_model_path())
    assert capsys.readouterr().err == ""
    (tmp_path / "demo").mkdir()
    assert resolve_model("demo") == str(demo_model_path())  # unambiguous: always the shipped model
    assert model_argument("demo") == str(demo_model_path())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --model ./demo" in err[0] and str(tmp_path / "demo") in err[0]
    assert model_argument("./demo") == "./demo"


def test_prune_takes_numpy_numbers_and_names_a_missing_model(files, llava):
    model, processor = llava
    inputs = build_inputs(processor, model, files / "val2014" / "0.jpg", "Is there a dog in the image?")
    with torch.inference_mode(), flowkern.prune(model, np.int64(2), keep=np.int64(4), rank="none") as pruning:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert pruning.num_kept_image_tokens.tolist() == [4] and pruning.layer == 2
    with pytest.raises(ValueError, match="model: expected a loaded Hugging Face VLM .*got NoneType"):
        flowkern.prune(None, 2)
    with pytest.raises(ValueError, match="keep must be an int >= 0"):
        flowkern.prune(model, 2, keep=np.bool_(True))


def test_cam_layers_as_the_command_line_writes_them(files, llava):
    model, processor = llava
    inputs = build_inputs(processor, model, files / "val2014" / "0.jpg", "Is there a dog in the image?")
    kwargs = dict(samples=1, noise_std=0.0, max_new_tokens=1, processor=processor)
    assert flowkern.cam(model, inputs, layers="0,1", **kwargs).layers == [0, 1]
    assert flowkern.cam(model, inputs, layers=np.int64(3), **kwargs).layers == [3]
    with pytest.raises(ValueError, match="layers '0;1': expected decoder layers as a list of ints"):
        flowkern.cam(model, inputs, layers="0;1", **kwargs)
    with pytest.raises(ValueError, match=r"layers \[0, 0.5\]: 0.5 is not a decoder layer index"):
        flowkern.cam(model, inputs, layers=[0, 0.5], **kwargs)


def test_keep_check_used_by_the_demo_model_check(llava):
    from flowkern.demo.report.config import DemoConfig
    from flowkern.demo.report.stages import check_model

    model, processor = llava
    assert check_model(DemoConfig(keep=15), model, processor) == 16
    with pytest.raises(ValueError, match="--keep 16: the model sees 16 image tokens per image"):
        check_model(DemoConfig(keep=16), model, processor)
