"""``flowkern generate`` (flowkern/cli/generate.py) end to end on a tiny LLaVA saved in the official format, and the
pruning flags other commands share (``add_prune_arguments`` / ``prune_from_args``)."""

from __future__ import annotations

import argparse
import contextlib
import json

import numpy as np
import pytest
import torch

import flowkern
from flowkern.cli import UsageError, common
from flowkern.cli import generate as cli_generate
from flowkern.hf.inputs import build_inputs
from flowkern.hf.loading import load_model
from flowkern.plan import PruneSpec
from tests.fixtures import PROMPT, save_llava, save_photo

NEW = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    save_llava(root / "llava")
    save_photo(root / "photo.png")
    return root


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowkern")
    cli_generate.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(files, *extra: str):
    args = _parser().parse_args(["generate", "--model", str(files / "llava"), "--image", str(files / "photo.png"),
                                 "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--device", "cpu", *extra])
    return args.func(args)


@pytest.mark.parametrize(("flags", "spec"), [
    ([], None),
    (["--prune-layer", "2", "--keep", "25%", "--rank", "attention"], PruneSpec(layer=2, keep=0.25)),
    (["--prune-schedule", "0:0.5,2:25%", "--rank", "diversity", "--prune-merge"],
     PruneSpec(schedule=((0, 0.5), (2, 0.25)), rank="diversity", merge=True)),
    (["--prune-layer", "2", "--keep", "4", "--rank", "prerope-attention"], PruneSpec(layer=2, keep=4,
                                                                                     rank="prerope-attention")),
], ids=["unpruned", "pruned", "schedule-merge", "prerope"])
def test_generate_command(files, capsys, tmp_path, flags, spec):
    out = tmp_path / "rec.json"
    assert _run(files, *flags, "--json", str(out)) == 0
    stdout = capsys.readouterr().out
    model, processor = load_model(files / "llava")
    inputs = build_inputs(processor, model, files / "photo.png", PROMPT)
    with torch.no_grad(), (flowkern.prune(model, spec) if flags else contextlib.nullcontext()) as p:
        seq = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    answer = processor.batch_decode(seq[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    record = json.loads(out.read_text())
    assert record["answer"] == answer and f"answer: {answer}" in stdout
    assert "prefill:" in stdout and "tokens/s" in stdout
    assert record["decode_steps"] == NEW - 1 and record["decode_tokens_per_second"] > 0
    if flags:
        assert record["prune"]["num_kept_image_tokens"] == p.num_kept_image_tokens.tolist() == [4]  # 25% of 16
        assert record["prune"]["kept_image_positions"] == [x.tolist() for x in p.kept_image_positions]
        assert (record["prune"]["rank"], record["prune"]["merge"]) == (spec.rank, spec.merge)
        assert [[s["layer"], s["keep"]] for s in record["prune"]["stages"]] == [list(s) for s in spec.stages]
        assert "keep 4 of 16 image tokens" in stdout and f"rank={spec.rank}" in stdout
    else:
        assert "prune" not in record and "pruned" not in stdout


def test_prune_flags():
    parser = argparse.ArgumentParser()
    common.add_prune_arguments(parser)
    args = parser.parse_args([])
    assert isinstance(common.prune_from_args(None, args), contextlib.nullcontext)
    assert common.parse_keep("0") == 0 and common.parse_keep("64") == 64
    assert common.parse_keep("0.25") == 0.25 and common.parse_keep("25%") == 0.25
    for bad in ("-1", "1.5", "abc", "200%"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.parse_keep(bad)


def test_bad_prune_combination_is_a_usage_error(files):
    with pytest.raises(UsageError, match="layer >= 1"):
        _run(files, "--prune-layer", "0", "--keep", "4", "--rank", "attention")


def test_flow_command_with_pruning(files, tmp_path, capsys):
    """`flowkern flow --prune-layer L --keep 0`: no layer >= L puts any attention on the (removed) image; for the first
    answer row (the last prompt position, before pruning can change any generated token) layers < L are unchanged
    against an unpruned `flow` run."""
    from flowkern.cli import main

    common = ["flow", "--model", str(files / "llava"), "--image", str(files / "photo.png"), "--prompt", PROMPT,
              "--max-new-tokens", str(NEW), "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--out", str(tmp_path / "pruned"), "--prune-layer", "1", "--keep", "0"]) == 0
    capsys.readouterr()
    full = json.loads((tmp_path / "full" / "shares.json").read_text())
    pruned = json.loads((tmp_path / "pruned" / "shares.json").read_text())
    image = full["segment_names"].index("image")
    assert "prune" in pruned and "prune" not in full
    assert pruned["prune"]["layer"] == 1
    shares_full, shares_pruned = np.array(full["shares"]), np.array(pruned["shares"])
    assert (shares_pruned[1:, image] == 0).all()
    assert (shares_full[1:, image] > 0).all()
    first_full, first_pruned = np.array(full["step_shares"])[0], np.array(pruned["step_shares"])[0]  # [L, B, 4]
    np.testing.assert_allclose(first_pruned[0], first_full[0], atol=1e-5)
    assert np.abs(first_pruned[1:] - first_full[1:]).max() > 1e-3
