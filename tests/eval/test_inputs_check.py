"""The input checker (flowkern.hf.inputs.check_images, issue 36 class 3) and the settings checked before a model
loads (class 6, sweep --keep; class 8, layer specs): every image decoded fully before the model loads, a damaged
file or a decompression-bomb header one error naming it; on the command line one line, exit 2, no model loaded
(the model's weights are corrupt here: loading them would fail with another message) and nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from flowkern.cli import main
from flowkern.eval.run import EvalConfig, EvalUsageError, prepare
from flowkern.eval.sweep.points import SweepConfig, SweepUsageError, check_inputs
from flowkern.hf.inputs import ImageError, ImageWarning, check_images, load_images
from flowkern.plan import PruneSpec, check_keep
from tests.fixtures import (
    ROOT,
    save_bomb_header,
    save_eval_llava,
    save_image,
    save_truncated,
    save_wide_image,
    write_pope,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LLaVA (16 image tokens, 4 layers), a copy whose weights are garbage, and POPE questions on four
    images of which the third is cut short."""
    root = tmp_path_factory.mktemp("inputs_check")
    save_eval_llava(root / "llava")
    shutil.copytree(root / "llava", root / "broken")
    (root / "broken" / "model.safetensors").write_bytes(b"not weights")
    for i in (0, 1, 3):
        save_image(root / "val2014" / f"{i}.jpg", i)
    save_truncated(root / "val2014" / "2.jpg", fmt="JPEG")
    write_pope(root / "pope", "random", [(q, f"{q % 4}.jpg", "dog", "yes") for q in range(8)])
    return root


def _cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "flowkern.cli", *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@dataclass
class _Done:
    """An in-process ``main()`` run, shaped like ``subprocess.CompletedProcess`` for :func:`_one_line_exit_2`."""

    returncode: int
    stderr: str


def _one_line_exit_2(done: subprocess.CompletedProcess | _Done, *needles: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# the checker itself


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_file_is_refused_naming_it(tmp_path, fmt):
    good = save_image(tmp_path / "good.png", 1)
    bad = save_truncated(tmp_path / f"bad.{fmt.lower()}", fmt=fmt)
    with Image.open(bad) as im:  # the header alone reads: what the old check looked at
        assert im.size == (32, 32)
    with pytest.raises(ImageError, match=f"--images {bad}: not a readable image .*truncated"):
        check_images([good, bad, good])
    with pytest.raises(ImageError, match=f"--image {bad}"):
        load_images([good, bad])


def test_a_truncated_file_is_refused_whatever_pil_was_told(tmp_path, monkeypatch):
    """A library may turn PIL's process-wide LOAD_TRUNCATED_IMAGES on (lmms-eval does, on import): the check still
    refuses a truncated file, and leaves the switch as it found it."""
    from PIL import ImageFile

    from flowkern.hf import inputs

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(inputs, "_CHECKED", {})
    bad = save_truncated(tmp_path / "bad.png")
    with pytest.raises(ImageError, match="not a readable image"):
        check_images([bad])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


@pytest.mark.parametrize("side", [20000, 10000])  # over 2x PIL's limit (PIL raises) and over 1x (PIL only warns)
def test_a_decompression_bomb_header_is_refused_naming_it(tmp_path, side):
    bomb = save_bomb_header(tmp_path / "bomb.png", side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning escapes either: it is one error
        with pytest.raises(ImageError, match=f"{bomb}: refused as a possible decompression bomb"):
            check_images([bomb])
        with pytest.raises(ImageError, match="decompression bomb"):
            load_images(str(bomb))


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageError, match="nowhere.png: no such file"):
        check_images([tmp_path / "nowhere.png"])
    with pytest.raises(ImageError, match="is a directory"):
        check_images([tmp_path])


def test_each_image_is_decoded_once_per_process(tmp_path, monkeypatch):
    from flowkern.hf import inputs

    paths = [save_image(tmp_path / f"{i}.png", i) for i in range(3)]
    calls = []
    real = inputs.decode_image
    monkeypatch.setattr(inputs, "decode_image", lambda p, w: calls.append(p) or real(p, w))
    check_images(paths + paths)
    check_images(paths)
    assert sorted(calls) == sorted(paths)
    save_truncated(paths[0])  # the file changed: checked again, and refused
    with pytest.raises(ImageError, match=str(paths[0])):
        check_images(paths)


def test_progress_bar_for_big_sets(tmp_path, capsys):
    paths = [save_image(tmp_path / f"{i}.png", i) for i in range(200)]
    check_images(paths, progress=True)
    assert "checking images" in capsys.readouterr().err
    check_images(paths[:10], progress=True)
    assert "checking images" not in capsys.readouterr().err


@pytest.mark.parametrize(("mode", "ext", "says"), [("I;16", "png", "turns white"), ("F", "tiff", "turns black"),
                                                  ("RGBA", "png", "drops the alpha")])
def test_wrong_rgb_conversion_is_one_warning_naming_file_and_mode(tmp_path, mode, ext, says):
    first = save_wide_image(tmp_path / f"a.{ext}", mode)
    second = save_wide_image(tmp_path / f"b.{ext}", mode)
    with pytest.warns(ImageWarning, match=f"{first}: mode {mode}.*{says}.*1 more image.*e.g. {second}") as record:
        check_images([first, second, save_image(tmp_path / "ok.png", 0)])
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_images([first, second])  # named once per process
        assert load_images(save_image(tmp_path / "plain.png", 3))[0].mode == "RGB"


# ----------------------------------------------------------------------------------------------------------
# eval: before the model, also on a resume


def test_eval_refuses_a_truncated_image_before_any_work(files, tmp_path):
    out = tmp_path / "out"
    done = _cli("eval", "--model", str(files / "broken"), "--task", "pope", "--data", str(files / "pope"),
                "--images", str(files / "val2014"), "--device", "cpu", "--out", str(out))
    _one_line_exit_2(done, "flowkern eval: error: --images", "2.jpg", "truncated")
    assert not out.exists()


def test_a_resume_is_refused_at_the_damaged_image_not_after_it(files, tmp_path):
    out = tmp_path / "resume"
    config = EvalConfig(model=str(files / "llava"), task="pope", data=files / "pope", images=files / "val2014",
                        out=out, limit=2, max_new_tokens=2, device="cpu")
    from flowkern.eval.run import run_eval

    run_eval(config)  # questions 0 and 1: good images
    before = (out / "answers.jsonl").read_bytes()
    with pytest.raises(EvalUsageError, match="2.jpg: not a readable image"):
        prepare(EvalConfig(**{**config.__dict__, "limit": None}))
    assert (out / "answers.jsonl").read_bytes() == before
    assert len(prepare(config).todo) == 0  # the answered part needs no image check


def test_generate_refuses_a_bomb_header_before_the_model(files, tmp_path, capsys):
    bomb = save_bomb_header(tmp_path / "bomb.png")
    code = main(["generate", "--model", str(files / "broken"), "--image", str(bomb), "--prompt", "Is there a dog?",
                 "--device", "cpu"])
    _one_line_exit_2(_Done(code, capsys.readouterr().err), "flowkern generate: error: --image", str(bomb),
                     "decompression bomb")


# ----------------------------------------------------------------------------------------------------------
# settings that make a run meaningless, refused before it starts


def test_check_keep_shared_by_demo_and_sweep():
    check_keep(0, 576)
    check_keep(575, 576)
    check_keep(0.99, 576)
    for keep in (576, 1000, 1.0, 0.9995):
        with pytest.raises(ValueError, match=f"--keep {keep}: the model sees 576 image tokens"):
            check_keep(keep, 576)


def test_sweep_keep_at_least_the_image_tokens_is_refused(files, tmp_path, capsys):
    out = tmp_path / "sweep"

    def argv(keep: str) -> list[str]:
        return ["sweep", "--model", str(files / "broken"), "--task", "pope", "--data", str(files / "pope"), "--images",
                str(files / "val2014"), "--limit", "2", "--keep", keep, "--rank", "random", "--layers", "1",
                "--device", "cpu", "--out", str(out)]

    _one_line_exit_2(_cli(*argv("16")), "--keep 16: the model sees 16 image tokens per image")
    assert not out.exists()
    for keep in ("40", "1.0"):
        _one_line_exit_2(_Done(main(argv(keep)), capsys.readouterr().err), f"--keep {keep}: the model sees 16")
        assert not out.exists()


def test_sweep_checks_every_selected_image_and_a_fitting_keep(files):
    from dataclasses import replace

    from flowkern.eval import get_task

    base = dict(model=str(files / "llava"), task="pope", data=files / "pope", images=files / "val2014",
                out=files / "unused", device="cpu")
    plan = prepare(EvalConfig(**base, limit=2))  # questions 0 and 1
    check_inputs(SweepConfig(**base, limit=2, prune=PruneSpec(keep=15, rank="random")), plan)
    # a baseline point that is done still leaves the other points' questions: every selected image is checked
    done = replace(plan, samples=get_task("pope", files / "pope", files / "val2014").samples, todo=[])
    with pytest.raises(SweepUsageError, match="2.jpg: not a readable image"):
        check_inputs(SweepConfig(**base), done)


def test_layer_specs_refused_before_the_model_loads(files, tmp_path, capsys):
    image = save_image(tmp_path / "x.png", 0)

    def argv(command: str) -> list[str]:
        return [command, "--model", str(files / "broken"), "--image", str(image), "--prompt", "Is there a dog?",
                "--layers", "0,7", "--device", "cpu", "--out", str(tmp_path / command)]

    message = "error: --layers: layer 7 is out of range; the model has 4 decoder layers"
    _one_line_exit_2(_cli(*argv("flow")), f"flowkern flow: {message}")
    _one_line_exit_2(_Done(main(argv("cam")), capsys.readouterr().err), f"flowkern cam: {message}")
    assert not (tmp_path / "flow").exists() and not (tmp_path / "cam").exists()
