"""``flowkern flow`` end to end on tiny random-weight models saved in the official formats, and its error handling.

Each model directory is written by ``save_pretrained`` (model + processor: image processor, a tokenizer built
offline with ``tokenizers`` and a chat template; the models from :mod:`flowkern.hf.tiny`, through
``tests/fixtures.py``), then loaded back by ``flowkern.hf.loading`` exactly as a downloaded checkpoint would be.
No network.
"""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig

import flowkern
from flowkern.cli import main, parse_layers
from flowkern.hf import compat
from flowkern.hf.inputs import build_inputs
from flowkern.hf.loading import input_image, load_model
from flowkern.hf.tiny import build_model
from tests.fixtures import LAYERS, PROMPT, llm_config, make_tokenizer, save_llava, save_photo

TEXT_ONLY_TEMPLATE = (  # a template that drops image entries: the prompt ends up without an image slot
    "{% for message in messages %}USER : {% for c in message['content'] %}{% if c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT :{% endif %}"
)
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    save_llava(root / "llava")
    save_photo(root / "photo.png")
    return root


@pytest.fixture(scope="module")
def llava(files):
    return load_model(files / "llava")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_flow_end_to_end(files, llava, capsys):
    out = files / "out"
    rc, stdout, _ = _run(capsys, "flow", "--model", str(files / "llava"), "--image", str(files / "photo.png"),
                         "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu",
                         "--layers", "0,2,-1", "--threshold", "0.3", "--out", str(out))
    assert rc == 0
    for name in ("shares.json", "shares.csv", "shares.png", "image_attention.png"):
        assert (out / name).is_file(), name

    # the same analysis run directly through the library
    model, processor = llava
    inputs = build_inputs(processor, model, files / "photo.png", PROMPT)
    with flowkern.trace(model) as flow:
        seq = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    answer = processor.batch_decode(seq[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()

    record = json.loads((out / "shares.json").read_text())
    assert record["answer"] == answer
    assert record["segment_names"] == ["system", "image", "user", "generated"]
    assert record["num_layers"] == LAYERS and record["num_steps"] == NEW_TOKENS
    torch.testing.assert_close(torch.tensor(record["shares"]), flow.shares, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(record["step_shares"]), flow.step_shares, atol=1e-6, rtol=0)
    assert record["args"]["prompt"] == PROMPT and record["args"]["max_new_tokens"] == NEW_TOKENS
    image_share = flow.shares[:, 1]
    below = [i for i, s in enumerate(image_share.tolist()) if s < 0.3]
    assert record["threshold"] == 0.3 and record["cliff_layer"] == (below[0] if below else None)
    att = record["image_attention"]
    assert att["layers"] == [0, 2, 3] and att["view"] == "image" and att["grid"] == [4, 4]
    for layer in (0, 2, 3):
        torch.testing.assert_close(torch.tensor(att["maps"][str(layer)]), flow.image_attention(layer), atol=1e-6,
                                   rtol=0)

    with open(out / "shares.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["layer", "system", "image", "user", "generated"]
    assert len(rows) == 1 + LAYERS
    np.testing.assert_allclose(np.array(rows[1:], dtype=float)[:, 1:], flow.shares.numpy(), atol=1e-5)

    with Image.open(out / "shares.png") as im:
        assert im.width >= 600 and im.height >= 300
    with Image.open(out / "image_attention.png") as im:
        assert im.width >= 3 * 200 and im.height >= 200  # three panels side by side

    assert f"answer: {answer}" in stdout
    assert "layer" in stdout and "generated" in stdout
    table = [line.split() for line in stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in table] == list(range(LAYERS))
    np.testing.assert_allclose(np.array([r[1:5] for r in table], dtype=float), flow.shares.numpy(), atol=1e-4)


def _other_dirs(files):
    root = files / "bad"
    if not root.exists():
        root.mkdir()
        LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32).save_pretrained(
            root / "llama")
        (root / "remote").mkdir()
        (root / "remote" / "config.json").write_text(json.dumps(
            {"model_type": "qwen", "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}}))
        (root / "noweights").mkdir()
        shutil.copy(files / "llava" / "config.json", root / "noweights" / "config.json")
        shutil.copytree(files / "llava", root / "textonly")
        (root / "textonly" / "chat_template.jinja").write_text(TEXT_ONLY_TEMPLATE)
        (root / "notimage.png").write_text("not an image")
    return root


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("missing_image", "--image .*no such file"),
        ("not_an_image", "--image .*not a readable image"),
        ("missing_model", "--model .*no such directory"),
        ("uncached_hub_id", "not in the Hugging Face cache.*never downloads"),
        ("unknown_model", "model type 'llama' is not supported.*supported: .*llava.*qwen2_vl"),
        ("remote_code", "model type 'qwen' is not supported.*trust_remote_code"),
        ("no_weights", "--model .*could not load the weights"),
        ("no_image_slot", "no image slot"),
        ("bad_layer", "--layers: layer 9 is out of range"),
    ],
)
def test_flow_user_errors_exit_2(files, capsys, case, expect):
    bad = _other_dirs(files)
    model, image, extra = str(files / "llava"), str(files / "photo.png"), []
    if case == "missing_image":
        image = str(files / "nope.png")
    elif case == "not_an_image":
        image = str(bad / "notimage.png")
    elif case == "missing_model":
        model = str(files / "no_such_model")
    elif case == "uncached_hub_id":
        model = "flowkern-test-org/not-a-cached-model"
    elif case == "unknown_model":
        model = str(bad / "llama")
    elif case == "remote_code":
        model = str(bad / "remote")
    elif case == "no_weights":
        model = str(bad / "noweights")
    elif case == "no_image_slot":
        model = str(bad / "textonly")
    elif case == "bad_layer":
        extra = ["--layers", "0,9"]
    rc, _, err = _run(capsys, "flow", "--model", model, "--image", image, "--prompt", PROMPT, "--device", "cpu",
                      "--max-new-tokens", "1", "--out", str(files / f"out_{case}"), *extra)
    assert rc == 2
    # one line (a weight-loading progress bar may come before it when the error is found after loading)
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("flowkern flow: error: "), err
    assert err.rstrip().endswith(lines[0]) and "Traceback" not in err
    assert re.search(expect, lines[0]), lines[0]
    assert not (files / f"out_{case}").exists()


def test_prompt_formats(files, llava):
    """Chat template, a verbatim prompt with the placeholder, and the family format without a template agree."""
    model, processor = llava
    image = Image.open(files / "photo.png")
    templated = build_inputs(processor, model, image, PROMPT)
    verbatim = build_inputs(processor, model, image, f"USER : <image> {PROMPT} ASSISTANT :")
    assert torch.equal(templated["input_ids"], verbatim["input_ids"])
    n_image = int((templated["input_ids"] == model.config.image_token_id).sum())
    assert n_image == 16
    two = build_inputs(processor, model, [image, image], PROMPT)
    assert int((two["input_ids"] == model.config.image_token_id).sum()) == 32
    assert two["pixel_values"].shape == (2, 3, 8, 8)
    saved = processor.chat_template
    try:
        processor.chat_template = None
        plain = build_inputs(processor, model, image, PROMPT)  # LLaVA-1.5: "USER: <image>\n{prompt} ASSISTANT:"
    finally:
        processor.chat_template = saved
    text = processor.tokenizer.decode(plain["input_ids"][0])
    assert text.startswith("USER: <image>") and text.rstrip().endswith("ASSISTANT:")
    assert int((plain["input_ids"] == model.config.image_token_id).sum()) == 16
    assert templated["pixel_values"].dtype == next(model.parameters()).dtype


def test_input_image_is_what_the_model_saw(files, llava):
    """LLaVA's centre-cropped input, un-normalised: processing it again gives the same pixel values."""
    model, processor = llava
    photo = Image.open(files / "photo.png").convert("RGB")
    inputs = build_inputs(processor, model, photo, PROMPT)
    seen = input_image(processor, inputs, [photo])
    assert seen.size == (8, 8)
    again = processor.image_processor(seen, return_tensors="pt")["pixel_values"]
    step = 1 / 255 / min(processor.image_processor.image_std)  # one grey level after normalisation
    assert (again - inputs["pixel_values"]).abs().max() <= step * 0.51


def test_load_model_options(files):
    model, _ = load_model(files / "llava", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert compat.attn_implementation(model.config.text_config) == "sdpa"
    with pytest.raises(ValueError, match="--dtype"):
        load_model(files / "llava", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_model(files / "llava", device="cuda")


def test_hub_id_from_the_cache(files, monkeypatch, capsys):
    """A hub id resolves from the Hugging Face cache layout (models--org--name/snapshots/<commit>), offline."""
    import huggingface_hub.constants

    cache = files / "hub-cache"
    repo = cache / "models--flowkern-test--tiny-llava"
    commit = "0123456789abcdef0123456789abcdef01234567"
    if not repo.exists():
        shutil.copytree(files / "llava", repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model, processor = load_model("flowkern-test/tiny-llava")
    assert model.config.model_type == "llava" and processor.chat_template
    rc, stdout, _ = _run(capsys, "flow", "--model", "flowkern-test/tiny-llava", "--image", str(files / "photo.png"),
                         "--prompt", PROMPT, "--max-new-tokens", "1", "--device", "cpu", "--out", str(files / "hub"))
    assert rc == 0 and "answer:" in stdout


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0, -1", 32) == [0, 31]
    assert parse_layers("auto", 32) == [0, 4, 9, 13, 18, 22, 27, 31]
    assert parse_layers(None, 3) == [0, 1, 2]


def test_qwen2_vl_local_dir(tmp_path, capsys):
    """Qwen2-VL: M-RoPE, merged-patch grid from image_grid_thw, chat template with vision start/end tokens."""
    pytest.importorskip("torchvision", reason="Qwen2-VL's processor includes a video processor that needs torchvision")
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = make_tokenizer(("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"))
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                      "<|video_pad|>")}
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    cfg = Qwen2VLConfig(vision_config=vision, text_config=llm_config(tok, model_type=None, rope_parameters=rope),
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    build_model(cfg).save_pretrained(tmp_path / "qwen")
    template = (
        "{% for message in messages %}USER : {% for c in message['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT :{% endif %}"
    )
    sizes = dict(min_pixels=8 * 8, max_pixels=16 * 16, patch_size=2, merge_size=2, temporal_patch_size=2)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tok,
                     video_processor=Qwen2VLVideoProcessor(), chat_template=template).save_pretrained(
        tmp_path / "qwen")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")

    rc, _, _ = _run(capsys, "flow", "--model", str(tmp_path / "qwen"), "--image", str(tmp_path / "a.png"),
                    "--prompt", PROMPT, "--max-new-tokens", "3", "--device", "cpu", "--out", str(tmp_path / "out"))
    assert rc == 0
    record = json.loads((tmp_path / "out" / "shares.json").read_text())
    model, processor = load_model(tmp_path / "qwen")
    inputs = build_inputs(processor, model, tmp_path / "a.png", PROMPT)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    with flowkern.trace(model, image_inputs=inputs) as flow:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(torch.tensor(record["shares"]), flow.shares, atol=1e-6, rtol=0)
    assert record["family"] == "qwen2_vl"
    assert record["image_attention"]["grid"] == [h // 2, w // 2]
    assert (tmp_path / "out" / "image_attention.png").is_file()


def test_flow_draws_the_view_the_layout_marks_whole():
    """The image view `flow` draws is the one the family's layout marks whole (no view names in the CLI), of the
    requested image: InternVL's thumbnail of image 0 even when image 1 has tiles too."""
    from flowkern.cli.flow import _whole_view
    from flowkern.hf.segments import ImageGrid

    def grid(image, name, whole=False):
        return ImageGrid(image, name, torch.arange(4).view(2, 2), whole=whole)

    next_views = [grid(0, "base", True), grid(0, "crops")]
    assert _whole_view(next_views) is next_views[0]
    tiles = [grid(i, f"tile{t}", t == 2) for i in (0, 1) for t in range(3)]
    assert _whole_view(tiles) is tiles[2] and _whole_view(tiles, image=1) is tiles[5]
    queries = [grid(0, "queries")]  # InstructBLIP: no view shows a picture; the adapter says so (spatial_grids)
    assert _whole_view(queries) is queries[0]
    with pytest.raises(ValueError, match="no image 1"):
        _whole_view(queries, image=1)
