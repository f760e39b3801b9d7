"""flowkern.cam on tiny random-weight VLMs vs a plain autograd Grad-CAM written here (paper eq. 1-5).

Every model is built from a config (no download), fp32. The reference (:func:`_manual_cam`) runs the teacher-forced
prompt + answer once per layer with the parameters requiring grad (transformers' defaults), keeps the site's output
with ``retain_grad``, back-propagates ``z = sum_t logit[S - 1 + t, a_t]`` and forms ``ReLU(A @ mean(dz/dA))`` per
image on token positions written by hand from the config (not by flowkern's layouts).
"""

from __future__ import annotations

import pytest
import torch

import flowkern.hf  # noqa: F401  (registers the "flowkern" attention implementation)
from flowkern.cam import cam
from flowkern.gradcam import PixelNoise
from flowkern.hf import compat
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.hf.tiny import clip_config, text_config, tiny_vlm
from tests.fixtures import raster as _raster

ATOL = 1e-5
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
ANSWER = torch.tensor([17, 42, 99])


class Case:
    """A tiny model, its inputs for one prompt, and per image the hand-written views {name: positions [gh, gw]}."""

    def __init__(self, model: torch.nn.Module, inputs: dict, images: list[dict[str, torch.Tensor]]) -> None:
        self.model, self.inputs, self.images = model, inputs, images


def _llava() -> Case:
    """LLaVA-1.5 layout: a 24 x 24 raster (48 / 2) after 3 system tokens."""
    model = tiny_vlm("llava", image_size=48, max_position_embeddings=1024)
    ids = torch.tensor([[5, 6, 7] + [IMG] * 576 + [8, 9, 10]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 48, 48))
    return Case(model, inputs, [{"image": _raster(3, 24, 24)}])


def _llava_next() -> Case:
    """Base 4x4, then (6, 30) -> 1x2 crops of 4x4, unpadded to 2x8, each row followed by a newline token."""
    model = tiny_vlm("llava_next", max_position_embeddings=1024)
    n = 16 + 2 * (8 + 1)
    ids = torch.tensor([[5, 6] + [IMG] * n + [8, 9, 10]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 3, 8, 8),
                  image_sizes=torch.tensor([[6, 30]]))
    return Case(model, inputs, [{"base": _raster(2, 4, 4), "crops": _raster(2 + 16, 2, 8, row_stride=9)}])


def _qwen2_vl() -> Case:
    """Two images: (1, 8, 12) patches -> a non-square 4 x 6 grid (merge 2), then (1, 4, 4) -> 2 x 2."""
    model = tiny_vlm("qwen2_vl", max_position_embeddings=1024)
    ids = torch.tensor([[5, 102] + [IMG] * 24 + [103, 8, 102] + [IMG] * 4 + [103, 9, 10]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(96 + 16, 24),
                  image_grid_thw=torch.tensor([[1, 8, 12], [1, 4, 4]]), mm_token_type_ids=(ids == IMG).int())
    return Case(model, inputs, [{"image": _raster(2, 4, 6)}, {"image": _raster(2 + 24 + 3, 2, 2)}])


BUILDERS = {"llava": _llava, "llava_next": _llava_next, "qwen2_vl": _qwen2_vl}
_built: dict[str, Case] = {}


def case(name: str) -> Case:
    if name not in _built:
        _built[name] = BUILDERS[name]()
    return _built[name]


def _teacher_forced(inputs: dict, answer: torch.Tensor) -> dict:
    out = dict(inputs)
    T = answer.numel()
    out["input_ids"] = torch.cat([inputs["input_ids"], answer[None]], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, T, dtype=torch.long)], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, T, dtype=torch.int)], dim=1)
    return out


def _site(model: torch.nn.Module, layer: int, site: str) -> torch.nn.Module:
    block = model.model.language_model.layers[layer]
    return {"post_attention_layernorm": block.post_attention_layernorm, "attention": block.self_attn,
            "layer": block}[site]


def _manual_cam(c: Case, layer: int, answer: torch.Tensor, site: str = "post_attention_layernorm",
                pixel_values: torch.Tensor | None = None) -> tuple[list[dict[str, torch.Tensor]], float]:
    """Per image {view: ReLU(A @ alpha) on the hand-written grid}, and z; alpha = mean dz/dA over the image's views."""
    model = c.model
    inputs = dict(c.inputs) if pixel_values is None else dict(c.inputs, pixel_values=pixel_values)
    full = _teacher_forced(inputs, answer)
    saved = {}

    def hook(module, args, output):
        a = output[0] if isinstance(output, tuple) else output
        a.retain_grad()
        saved["A"] = a

    handle = _site(model, layer, site).register_forward_hook(hook)
    try:
        logits = model(**full).logits[0]
    finally:
        handle.remove()
    S = c.inputs["input_ids"].shape[1]
    z = sum(logits[S - 1 + t, int(a)] for t, a in enumerate(answer))
    z.backward()
    model.zero_grad(set_to_none=True)
    A, G = saved["A"][0].detach(), saved["A"].grad[0]
    maps = []
    for views in c.images:
        pos = torch.cat([p.flatten() for p in views.values()])
        alpha = G[pos].mean(dim=0)
        maps.append({name: torch.relu(A[p] @ alpha) for name, p in views.items()})
    return maps, float(z.detach())


@pytest.mark.parametrize(
    "name,site",
    [("llava", "post_attention_layernorm"), ("llava", "attention"), ("llava", "layer"),
     ("llava_next", "post_attention_layernorm"), ("qwen2_vl", "post_attention_layernorm")],
)
def test_matches_manual_grad_cam(name, site):
    """samples=1, sigma=0 is plain Grad-CAM: every layer equals the manual computation, from one forward+backward."""
    c = case(name)
    n_layers = c.model.config.get_text_config().num_hidden_layers
    result = cam(c.model, c.inputs, ANSWER, site=site, samples=1, noise_std=0.0)
    assert result.layers == list(range(n_layers)) and result.site == site
    assert torch.equal(result.answer_ids, ANSWER)
    for layer in range(n_layers):
        expect, z = _manual_cam(c, layer, ANSWER, site)
        torch.testing.assert_close(result.target, torch.tensor([z]), atol=1e-4, rtol=1e-5)
        for image, views in enumerate(expect):
            for view, heat in views.items():
                got = result.view(image, view)
                assert got.shape == tuple(heat.shape)
                assert got.raw.dtype == torch.float32 and got.raw.shape == (n_layers, *heat.shape)
                torch.testing.assert_close(got.raw[layer], heat, atol=ATOL, rtol=0)
                if layer < n_layers - 1:
                    assert heat.max() > 100 * ATOL  # the check means something
                    torch.testing.assert_close(got.heatmap[layer], heat / heat.max(), atol=1e-5, rtol=0)
    # the last layer's image features cannot reach the answer logits: dz/dA = 0 there
    assert all(float(v.raw[-1].abs().max()) == 0 for v in result.views)
    heat = result.heatmaps
    maps = heat if isinstance(heat, list) else [heat]
    assert len(maps) == len(c.images)
    for m in maps:
        assert m.dtype == torch.float32 and m.min() >= 0 and m.max() <= 1
        assert torch.allclose(m[:-1].flatten(1).amax(dim=1), torch.ones(n_layers - 1))


def test_grid_shapes():
    """LLaVA-1.5: 24 x 24; LLaVA-NeXT: base image first, crops as a second view; Qwen2-VL: (h/m, w/m) per image."""
    r = cam(case("llava").model, case("llava").inputs, ANSWER, layers=[0], noise_std=0.0, samples=1)
    assert r.heatmaps.shape == (1, 24, 24) and r.raw.shape == (1, 24, 24)
    r = cam(case("llava_next").model, case("llava_next").inputs, ANSWER, layers=[1], noise_std=0.0, samples=1)
    assert [(v.name, v.shape) for v in r.views] == [("base", (4, 4)), ("crops", (2, 8))]
    assert r.heatmaps.shape == (1, 4, 4)
    r = cam(case("qwen2_vl").model, case("qwen2_vl").inputs, ANSWER, layers=[0, -2], noise_std=0.0, samples=1)
    assert r.layers == [0, 1]
    assert isinstance(r.heatmaps, list) and [tuple(h.shape) for h in r.heatmaps] == [(2, 4, 6), (2, 2, 2)]
    assert r.token_raw.shape == (2, 28)


def _noisy_copies(pv: torch.Tensor, n: int, sigma: float, seed: int) -> list[torch.Tensor]:
    """The documented noise contract, written out: i-th draw of randn from Generator(seed), added in [0, 1] space."""
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return [((pv * std + mean) + sigma * torch.randn(pv.shape, generator=g) - mean) / std for _ in range(n)]


def test_smoothgrad_averages_noisy_copies():
    """raw = mean over the noisy copies of each copy's Grad-CAM; copies differ, so the mean is a real average."""
    c = case("llava")
    n, sigma, seed = 3, 0.5, 7
    copies = _noisy_copies(c.inputs["pixel_values"], n, sigma, seed)
    per_copy, zs = [], []
    for pv in copies:
        maps, z = [], None
        for layer in (0, 1):
            m, z = _manual_cam(c, layer, ANSWER, pixel_values=pv)
            maps.append(m[0]["image"])
        per_copy.append(torch.stack(maps))
        zs.append(z)
    per_copy = torch.stack(per_copy)  # [n, 2, 24, 24]
    result = cam(c.model, c.inputs, ANSWER, layers=[0, 1], samples=n, noise_std=sigma, seed=seed, batch_size=2,
                 pixel_mean=MEAN, pixel_std=STD)
    torch.testing.assert_close(result.target, torch.tensor(zs), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(result.raw, per_copy.mean(dim=0), atol=ATOL, rtol=0)
    for i in range(n):  # the noise changes the maps well beyond the tolerance: first/last/sum would fail
        assert (per_copy[i] - per_copy.mean(dim=0)).abs().max() > 100 * ATOL
    clean = cam(c.model, c.inputs, ANSWER, layers=[0, 1], samples=1, noise_std=0.0)
    assert (clean.raw - result.raw).abs().max() > 100 * ATOL
    # the batch size does not change the copies; a processor supplies the same constants
    processor = type("P", (), {"image_processor": type("IP", (), {"image_mean": MEAN, "image_std": STD})()})()
    one = cam(c.model, c.inputs, ANSWER, layers=[0, 1], samples=n, noise_std=sigma, seed=seed, batch_size=1,
              processor=processor)
    torch.testing.assert_close(one.raw, result.raw, atol=ATOL, rtol=0)


def test_identical_copies_average_to_plain_cam():
    c = case("qwen2_vl")
    plain = cam(c.model, c.inputs, ANSWER, samples=1, noise_std=0.0)
    repeated = cam(c.model, c.inputs, ANSWER, samples=3, batch_size=2, noise_std=0.0)
    for a, b in zip(plain.raw, repeated.raw, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_qwen_noise_is_shared_by_temporal_copies():
    """Qwen-VL rows are (channel, temporal, patch, patch): both temporal copies of a pixel get the same noise."""
    c = case("qwen2_vl")
    pv = c.inputs["pixel_values"].view(-1, 3, 2, 4)
    pv = pv[:, :, :1].expand(-1, -1, 2, -1).reshape(-1, 24)  # a still image: temporal copies equal
    noise = PixelNoise(pv, (torch.tensor(MEAN), torch.tensor(STD)), "patches", 2, 0.3, False, 0)
    noisy = noise.next().view(-1, 3, 2, 4)
    torch.testing.assert_close(noisy[:, :, 0], noisy[:, :, 1])
    delta = (noisy.reshape(-1, 24) - pv).view(-1, 3, 2, 4) * torch.tensor(STD).view(1, 3, 1, 1)
    assert 0.2 < float(delta.std()) < 0.4  # sigma in [0, 1] pixel units, channel-wise un-normalised


def test_generates_answer_greedily():
    c = case("llava_next")
    tokens = c.model.generate(**c.inputs, max_new_tokens=3, do_sample=False)
    answer = tokens[0, c.inputs["input_ids"].shape[1] :]
    got = cam(c.model, c.inputs, layers=[0], samples=1, noise_std=0.0, max_new_tokens=3)
    assert torch.equal(got.answer_ids, answer)
    given = cam(c.model, c.inputs, answer, layers=[0], samples=1, noise_std=0.0)
    torch.testing.assert_close(got.raw, given.raw, atol=0, rtol=0)


def test_normalize_and_threshold():
    c = case("llava_next")
    r = cam(c.model, c.inputs, ANSWER, samples=1, noise_std=0.0, normalize="global", threshold=0.5)
    base = r.view(0, "base")
    expect = base.raw / base.raw.max()
    expect = torch.where(expect < 0.5, 0.0, expect)
    torch.testing.assert_close(base.heatmap, expect)
    assert (base.heatmap == 0).any() and base.heatmap.max() == 1


def test_restores_attention_and_requires_grad():
    """During the call: sdpa for a non-differentiable choice, no parameter requires grad. After: as before."""
    c = case("llava_next")
    model = c.model
    text_config = model.config.get_text_config()
    params = list(model.parameters())
    params[0].requires_grad_(False)  # a mixed pattern to restore
    seen = []

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hooks()

    def spy(module, args, output):
        seen.append((compat.attn_implementation(text_config), any(p.requires_grad for p in params)))

    handle = model.model.language_model.layers[0].register_forward_hook(spy)
    try:
        for impl, during in (("flowkern", "sdpa"), ("eager", "eager")):
            model.set_attn_implementation({"text_config": impl})
            seen.clear()
            cam(model, c.inputs, ANSWER, layers=[0], samples=1, noise_std=0.0)
            assert seen == [(during, False)]
            assert compat.attn_implementation(text_config) == impl
            assert compat.attn_implementation(model.config.vision_config) == "sdpa"
            assert not params[0].requires_grad and all(p.requires_grad for p in params[1:])
            assert all(p.grad is None for p in params)
        # also when the call fails half-way
        model.set_attn_implementation({"text_config": "flowkern"})

        def boom(module, args, output):
            raise RuntimeError("boom")

        bad = model.model.language_model.layers[1].register_forward_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                cam(model, c.inputs, ANSWER, samples=1, noise_std=0.0)
        finally:
            bad.remove()
        assert compat.attn_implementation(text_config) == "flowkern"
        assert not params[0].requires_grad and all(p.requires_grad for p in params[1:])
        assert hooks() == before + 1  # only the spy is left
    finally:
        handle.remove()
        model.set_attn_implementation({"text_config": "sdpa"})
        params[0].requires_grad_(True)


def test_errors():
    c = case("llava_next")
    model, inputs = c.model, c.inputs
    with pytest.raises(ValueError, match="site must be one of"):
        cam(model, inputs, ANSWER, site="mlp", noise_std=0.0)
    no_image = dict(inputs, input_ids=torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no image placeholder tokens"):
        cam(model, no_image, ANSWER, noise_std=0.0)
    two = dict(inputs, input_ids=inputs["input_ids"].repeat(2, 1))
    with pytest.raises(ValueError, match="one prompt"):
        cam(model, two, ANSWER, noise_std=0.0)
    with pytest.raises(ValueError, match="processor"):
        cam(model, inputs, ANSWER, noise_std=0.1)
    with pytest.raises(ValueError, match="out of range"):
        cam(model, inputs, ANSWER, layers=[3], noise_std=0.0)
    with pytest.raises(ValueError, match="samples"):
        cam(model, inputs, ANSWER, samples=0, noise_std=0.0)
    with pytest.raises(ValueError, match="answer is empty"):
        cam(model, inputs, [], noise_std=0.0)


# ----------------------------------------------------------------------------------------------------------
# flowkern cam (the command line) on a tiny LLaVA saved with its processor


def _save_tiny_llava(path) -> None:
    """CLIP 8x8 / patch 2 (a 4x4 grid), Llama text model, a word-level tokenizer and a LLaVA processor."""
    from flowkern.hf.tiny import save_tiny_llava

    words = "USER ASSISTANT : what is in the image ? a cat dog red blue yes no".split()
    save_tiny_llava(path, vision=clip_config(8), text=text_config(max_position_embeddings=1024), words=words)


def test_cli_end_to_end(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    import flowkern.cli as cli
    from flowkern.hf.inputs import build_inputs
    from flowkern.hf.loading import load_model

    assert "cam" in cli.SUBCOMMANDS
    _save_tiny_llava(tmp_path / "llava")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    argv = ["cam", "--model", str(tmp_path / "llava"), "--image", str(tmp_path / "a.png"), "--prompt",
            "what is in the image ?", "--device", "cpu", "--max-new-tokens", "3", "--layers", "0,1,2",
            "--samples", "3", "--batch-size", "2", "--noise-std", "0.2", "--out", str(out)]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    names = ["cam_grid.png", "layer_00.png", "layer_01.png", "layer_02.png", "cam.npz"]
    assert all((out / n).is_file() for n in names)

    model, processor = load_model(tmp_path / "llava")
    inputs = build_inputs(processor, model, tmp_path / "a.png", "what is in the image ?")
    expect = cam(model, inputs, layers=[0, 1, 2], samples=3, batch_size=2, noise_std=0.2, processor=processor,
                 max_new_tokens=3)
    saved = np.load(out / "cam.npz")
    np.testing.assert_array_equal(saved["layers"], [0, 1, 2])
    np.testing.assert_array_equal(saved["answer_ids"], expect.answer_ids.numpy())
    np.testing.assert_allclose(saved["heatmap_0_image"], expect.heatmaps.numpy(), atol=1e-6)
    np.testing.assert_allclose(saved["raw_0_image"], expect.raw.numpy(), atol=1e-7)
    answer = processor.tokenizer.decode(expect.answer_ids, skip_special_tokens=True).strip()
    assert f"answer: {answer}" in stdout
    rows = [line.split() for line in stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    for (layer, row, col, _), r in zip(expect.peaks(), rows, strict=True):
        top = float(expect.raw[layer].max())
        assert r[1:3] == ([str(row), str(col)] if top > 0 else ["-", "-"])
        assert float(r[-1]) == pytest.approx(top, rel=1e-3)
    assert rows[-1][1:5] == ["-"] * 4  # the last layer cannot reach the answer logits
    with Image.open(out / "cam_grid.png") as im:
        assert im.width >= 3 * 200  # three panels side by side
    with Image.open(out / "layer_01.png") as im:
        assert im.size == (8, 8)  # drawn on what the model saw (the 8x8 centre crop)

    capsys.readouterr()
    assert cli.main([*argv[:-2], "--noise-std", "-1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowkern cam: error: --noise-std -1") and not (tmp_path / "bad").exists()


def test_works_inside_inference_mode():
    """Callers often wrap analysis in torch.inference_mode(); inputs made there are inference tensors."""
    c = case("qwen2_vl")
    expect = cam(c.model, c.inputs, ANSWER, layers=[0], samples=2, noise_std=0.1, pixel_mean=MEAN, pixel_std=STD)
    with torch.inference_mode():
        inputs = {k: v.clone() for k, v in c.inputs.items()}
        got = cam(c.model, inputs, ANSWER, layers=[0], samples=2, noise_std=0.1, pixel_mean=MEAN, pixel_std=STD)
    for a, b in zip(got.raw, expect.raw, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
