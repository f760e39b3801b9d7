"""The attention family of scorers and the controls (flowkern.scorers.attention / controls) through flowkern.prune,
each against a brute-force float64 oracle of its definition written here: transformers' eager attention
(``output_attentions``) for ``attention`` / ``text-attention``, explicit q / k projections without the rotary
embedding for ``prerope-attention``, ``torch.rand`` / sequence order / the stride rule for the controls. Also the key
mass over chosen query rows in the attention function, the registry and its JSON round trip, a user-defined scorer end
to end, and the errors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import torch

import flowkern
from flowkern.hf import compat
from flowkern.hf.attention import STATE_ATTR, LayerState, flowkern_attention_forward
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.hf.tiny import tiny_vlm
from flowkern.plan import PruneSpec
from flowkern.scorers import ScoreInputs, Scorer, get_scorer, register, scorer_from_json, scorer_names, scorer_to_json
from tests.fixtures import left_pad

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS = 4
L = 2  # the stage's layer: scores come from layer L-1 = 1
K = 5


# ----------------------------------------------------------------------------------------------------------
# the key mass over chosen query rows, in the attention function


class _Module(torch.nn.Module):
    layer_idx = 0
    is_causal = True


def _brute_force(q, k, kpm, rows):
    """float64 [B, Sk]: softmax(q.k * scale) (causal bottom-right, padding hidden), mean over chosen rows, heads."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    kk = k.double().repeat_interleave(Hq // k.shape[1], dim=1)
    s = (q.double() @ kk.transpose(-1, -2)) * D**-0.5
    vis = (torch.arange(Sk)[None, :] <= torch.arange(Sk - Sq, Sk)[:, None])[None, None]
    if kpm is not None:
        vis = vis & kpm[:, None, None, :]
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0)  # [B, H, Sq, Sk]
    p = p.mean(dim=1)
    w = rows.double()
    return (p * w[:, :, None]).sum(dim=1) / w.sum(dim=1).clamp(min=1)[:, None]


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("with_keymap", [False, True], ids=["positions", "keymap"])
def test_chosen_key_mass_matches_brute_force(with_keymap, grad):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, S, D = 2, 4, 2, 9, 8
    q = torch.randn(B, Hq, S, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    real = torch.ones(B, S, dtype=torch.bool)
    real[1, :2] = False  # left padding
    rows = torch.tensor([[0, 1, 0, 0, 1, 1, 0, 1, 1], [0, 0, 0, 1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    state = LayerState(0, observe=True, key_mass=True)
    events = []
    state.sink = events.append
    if with_keymap:  # the layer holds 9 of 12 token positions (a pruned layer); key_rows are over token positions
        keymap = torch.tensor([[0, 2, 3, 5, 6, 7, 9, 10, 11], [1, 2, 4, 5, 6, 8, 9, 10, 11]])
        keymap[1, :2] = -1
        state.keymap, state.key_padding = keymap, real
        token_rows = torch.zeros(B, 12, dtype=torch.bool)
        token_rows.scatter_(1, keymap.clamp(min=0), rows & (keymap >= 0))
        state.key_rows = token_rows
        mask = None
    else:
        state.key_rows = rows
        mask = real
    module = _Module()
    setattr(module, STATE_ATTR, state)
    query = q.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out, _ = flowkern_attention_forward(module, query, k, v, mask)
    (event,) = events
    expect = _brute_force(q, k, real, rows & real)
    torch.testing.assert_close(event.chosen_key_mass.double(), expect, atol=1e-6, rtol=0)
    last = torch.zeros_like(rows)
    last[:, -1] = True
    torch.testing.assert_close(event.key_mass.double(), _brute_force(q, k, real, last), atol=1e-6, rtol=0)
    # nobody chose rows: no chosen mass, the same output
    state2 = LayerState(0, observe=True, key_mass=True, keymap=state.keymap, key_padding=state.key_padding)
    state2.sink = events.append
    setattr(module, STATE_ATTR, state2)
    with torch.no_grad():
        out2, _ = flowkern_attention_forward(module, q, k, v, mask)
    assert events[-1].chosen_key_mass is None
    torch.testing.assert_close(out.detach()[real], out2[real], atol=1e-5, rtol=0)  # padding rows are never read


# ----------------------------------------------------------------------------------------------------------
# a tiny LLaVA, a padded batch of two prompts (32 and 16 image tokens)

_CASE: dict = {}


def case():
    if not _CASE:
        model = tiny_vlm("llava", layers=N_LAYERS)
        r0 = [5, 6, 7] + [IMG] * 16 + [8, 9] + [IMG] * 16 + [10, 11, 12]
        r1 = [5, 6] + [IMG] * 16 + [9, 10, 11, 12]
        ids, mask = left_pad([r0, r1])
        kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 8, 8,
                                                                                   generator=torch.Generator()
                                                                                   .manual_seed(1)))
        model.set_attn_implementation({"text_config": "eager"})
        try:
            with torch.no_grad():
                out = model(**kwargs, output_attentions=True, output_hidden_states=True)
        finally:
            model.set_attn_implementation({"text_config": "sdpa"})
        _CASE.update(model=model, kwargs=kwargs, attentions=out.attentions, hidden=out.hidden_states)
    return _CASE


def image_mask(kwargs):
    return (kwargs["input_ids"] == IMG) & kwargs["attention_mask"].bool()


def run(rank, keep=K, layer=L, when="prefill", **kw):
    c = case()
    with torch.no_grad(), flowkern.prune(c["model"], layer=layer, keep=keep, rank=rank, when=when, **kw) as p:
        c["model"].generate(**c["kwargs"], max_new_tokens=2, do_sample=False)
    return p


def top_k(scores, candidates, k):
    """bool [B, S]: per row the k candidates with the highest float64 scores."""
    kept = torch.zeros_like(candidates)
    for b in range(candidates.shape[0]):
        pos = torch.nonzero(candidates[b]).flatten()
        kept[b, pos[torch.topk(scores[b, pos], min(k, pos.numel())).indices]] = True
    return kept


def kept_image(p):
    return p.keep_mask & p.image_mask


def text_rows_oracle(kwargs):
    """The text rows after the first image token, written out per prompt (r0: 8 9 10 11 12; r1: 9 10 11 12)."""
    ids, real = kwargs["input_ids"], kwargs["attention_mask"].bool()
    rows = torch.zeros_like(real)
    for b in range(ids.shape[0]):
        first = int(torch.nonzero(ids[b] == IMG)[0])
        rows[b, first:] = ids[b, first:] != IMG
    return rows & real


def eager_oracle(rank):
    c = case()
    a = c["attentions"][L - 1].double().mean(dim=1)  # [B, S, S], head mean
    if rank == "attention":
        return a[:, -1]
    rows = text_rows_oracle(c["kwargs"]).double()
    return (a * rows[:, :, None]).sum(dim=1) / rows.sum(dim=1)[:, None]


def prerope_oracle(text=False):
    """Layer L-1's attention with q = q_proj(x), k = k_proj(x), x its normed input, no rotary; head mean of the last
    row (``text``: mean over the text rows after the first image token)."""
    c = case()
    layer = c["model"].model.language_model.layers[L - 1]
    attn = layer.self_attn
    x = layer.input_layernorm(c["hidden"][L - 1])
    B, S, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(B, S, -1, hd).transpose(1, 2).double()
    k = attn.k_proj(x).view(B, S, -1, hd).transpose(1, 2).double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)) * attn.scaling
    real = c["kwargs"]["attention_mask"].bool()
    vis = torch.ones(S, S, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0).mean(dim=1)
    if not text:
        return p[:, -1]
    rows = text_rows_oracle(c["kwargs"]).double()
    return (p * rows[:, :, None]).sum(dim=1) / rows.sum(dim=1)[:, None]


@dataclass(frozen=True)
class _PreRopeText(Scorer):
    """Test scorer: pre-RoPE attention averaged over the text rows (no built-in asks for it)."""

    name = "test-prerope-text"
    needs = frozenset({"prerope_attention"})
    attention_rows = "text"
    before_decoder = False

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.prerope_attention


@pytest.mark.parametrize("rank", ["attention", "text-attention", "prerope-attention", "prerope-text"])
def test_attention_scorers_match_their_definitions(rank):
    c = case()
    img = image_mask(c["kwargs"])
    p = run(_PreRopeText() if rank == "prerope-text" else rank)
    expect = {"prerope-attention": prerope_oracle, "prerope-text": lambda: prerope_oracle(text=True)}.get(
        rank, lambda: eager_oracle(rank))()
    torch.testing.assert_close(p.scores.double()[img], expect[img], atol=1e-5, rtol=0)
    assert torch.equal(kept_image(p), top_k(expect, img, K))
    assert torch.equal(p.keep_mask, c["kwargs"]["attention_mask"].bool() & ~(img & ~kept_image(p)))
    if rank != "attention":  # a different criterion: a different ranking on this prompt
        assert not torch.equal(kept_image(p), top_k(eager_oracle("attention"), img, K))
    if rank == "text-attention":  # compacting the cache after a full prefill chooses the same tokens
        assert torch.equal(run(rank, when="decode").keep_mask, p.keep_mask)


def test_controls_match_their_definitions():
    c = case()
    img = image_mask(c["kwargs"])
    S = img.shape[1]
    draws = torch.rand(S, generator=torch.Generator().manual_seed(3)).double().expand(2, S)
    assert torch.equal(kept_image(run("random", seed=3)), top_k(draws, img, K))
    first = torch.zeros_like(img)
    for b in range(2):
        first[b, torch.nonzero(img[b]).flatten()[:K]] = True
    assert torch.equal(kept_image(run("none")), first)
    # grid: sample 1 has one 4 x 4 image (ordinals 0..15 in raster order). k=4: stride 2 -> rows/cols 0, 2;
    # k=1: stride 4, centred offset (3 mod 4) // 2 = 1 -> the cell (1, 1)
    pos1 = torch.nonzero(img[1]).flatten()
    for keep, ordinals in ((4, [0, 2, 8, 10]), (1, [5])):
        assert kept_image(run("grid", keep=keep))[1].nonzero().flatten().tolist() == pos1[ordinals].tolist()


def test_grid_union_attention():
    """grid+attention: round(0.5 * k) tokens by the grid control, the others the top of FastV's attention."""
    c = case()
    img = image_mask(c["kwargs"])
    grid = kept_image(run("grid", keep=3))  # round(0.5 * 5) = 3
    expect = grid | top_k(eager_oracle("attention"), img & ~grid, K - 3)
    assert torch.equal(kept_image(run("grid+attention")), expect)
    prerope = get_scorer("union", first="grid", then="prerope-attention", share=0.4)  # round(2.0) = 2
    grid2 = kept_image(run("grid", keep=2))
    assert torch.equal(kept_image(run(prerope)), grid2 | top_k(prerope_oracle(), img & ~grid2, K - 2))


# ----------------------------------------------------------------------------------------------------------
# the registry, JSON, a user-defined scorer, errors


def test_registry_and_json_round_trip():
    names = scorer_names()
    for name in ("random", "none", "grid", "attention", "text-attention", "prerope-attention", "grid+attention",
                 "union"):
        assert name in names
    union = get_scorer("union", first={"name": "grid"}, then="text-attention", share=0.25)
    for rank in ("text-attention", get_scorer("grid+attention"), union,
                 get_scorer("grid+attention", share=0.75)):
        spec = PruneSpec(layer=2, keep=8, rank=rank)
        for options in (False, True):
            data = json.loads(json.dumps(spec.to_dict(options=options)))
            back = PruneSpec.from_dict(data, options=options)
            assert back.to_dict(options=options) == data and get_scorer(back.rank) == get_scorer(rank)
    assert scorer_to_json(get_scorer("grid+attention")) == "grid+attention"
    assert scorer_to_json(union) == {"name": "union", "first": "grid", "then": "text-attention", "share": 0.25}
    assert scorer_from_json(scorer_to_json(union)) == union
    assert union.needs == {"grids", "attention"} and union.attention_rows == "text" and not union.before_decoder


@register
@dataclass(frozen=True)
class _HiddenNorm(Scorer):
    """Test scorer: the norm of the hidden state entering layer L (or of the input embedding)."""

    name = "test-hidden-norm"
    needs = frozenset({"hidden", "features"})
    embeddings: bool = False

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        assert inputs.segments is not None and inputs.segments.shape == inputs.image.shape
        assert bool((inputs.segments[inputs.image] == 1).all())
        return (inputs.features if self.embeddings else inputs.hidden).double().norm(dim=-1)


@pytest.mark.parametrize("embeddings", [False, True], ids=["hidden", "features"])
def test_user_scorer_end_to_end(embeddings):
    c = case()
    img = image_mask(c["kwargs"])
    expect = c["hidden"][0 if embeddings else L].double().norm(dim=-1)
    got = run(_HiddenNorm(embeddings=embeddings))
    assert torch.equal(kept_image(got), top_k(expect, img, K))
    assert got.to_dict()["rank"] == (scorer_to_json(_HiddenNorm(embeddings=True)) if embeddings
                                     else "test-hidden-norm")
    by_name = run("attention", scorer="test-hidden-norm")  # registered: by its name, through the alias keyword
    assert torch.equal(kept_image(by_name), top_k(c["hidden"][L].double().norm(dim=-1), img, K))
    before = run(_HiddenNorm(embeddings=embeddings), layer=0)  # before the decoder: hidden = the input embeddings
    assert torch.equal(kept_image(before), top_k(c["hidden"][0].double().norm(dim=-1), img, K))


@dataclass(frozen=True)
class _NaN(Scorer):
    name = "test-nan"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return torch.full(inputs.image.shape, float("nan"))


def test_errors():
    c = case()
    model = c["model"]
    with pytest.raises(ValueError, match="text-attention") as info:
        flowkern.prune(model, layer=1, rank="nope")
    assert "prerope-attention" in str(info.value)  # the message lists the known names
    for rank in ("text-attention", "prerope-attention", "grid+attention"):
        with pytest.raises(ValueError, match=re.escape(f"rank='{rank}'") + ".*layer >= 1"):
            flowkern.prune(model, layer=0, keep=4, rank=rank)
    flowkern.prune(model, layer=0, keep=0, rank="text-attention")  # keep=0 reads nothing
    with pytest.raises(ValueError, match="scorer: another name for rank"):
        flowkern.prune(model, layer=1, rank="none", scorer="grid")
    with pytest.raises(ValueError, match="different query rows"):
        get_scorer("union", first="text-attention", then="prerope-attention")
    with pytest.raises(ValueError, match="share"):
        get_scorer("union", first="grid", then="attention", share=2)
    with pytest.raises(ValueError, match="NaN"):
        run(_NaN())
    assert compat.attn_implementation(model.config.get_text_config()) == "sdpa"  # restored after the error
    assert not any(m._forward_pre_hooks for m in model.modules())  # no hook of the scorer left behind
    p = run("text-attention")  # and the model prunes again
    assert int(kept_image(p).sum()) == 2 * K


def test_info_lists_the_scorers(capsys):
    from flowkern.cli import info

    assert info.run(None) == 0
    out = capsys.readouterr().out
    listed = out[out.index("pruning scorers"):].splitlines()
    for name in scorer_names():
        assert any(line.split()[:1] == [name] for line in listed), name
