"""flowkern.hf.session: one session per model, listeners nested in any order, everything restored, one row event
per layer, the fast path when nobody listens, one clock for every timer."""

from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern import ops
from flowkern.cam import cam
from flowkern.hf import compat
from flowkern.hf.session import _SESSIONS, Session
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.hf.tiny import tiny_vlm
from flowkern.timer import ForwardTimer
from tests.fixtures import left_pad

pytestmark = pytest.mark.usefixtures("one_thread")

L = 2
NEW = 3


@pytest.fixture(scope="module")
def llava():
    model = tiny_vlm("llava", layers=4)
    ids, mask = left_pad([[5, 6, 7] + [IMG] * 16 + [8, 9, 10], [5, 6] + [IMG] * 16 + [9, 10]])  # row 1 padded
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 8, 8))
    _generate(model, kwargs, new=1)  # transformers installs its own output-recording hooks on the first call
    return model, kwargs


def _state(model):
    """What must be back after every session: attention implementations, hooks, no flowkern attributes."""
    return (compat.attn_implementation(model.config.text_config),
            compat.attn_implementation(model.config.vision_config),
            [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()],
            sorted(k for m in model.modules() for k in vars(m) if k.startswith("_flowkern")),
            [p.requires_grad for p in model.parameters()])


def _generate(model, kwargs, new=NEW):
    with torch.no_grad():
        return model.generate(**kwargs, max_new_tokens=new, do_sample=False)


def test_nested_in_either_order_records_the_same(llava):
    model, kwargs = llava
    before = _state(model)
    with flowkern.prune(model, layer=L, keep=4) as p1, flowkern.trace(model) as f1:
        a = _generate(model, kwargs)
        assert len(Session.of(model).listeners) == 2
    with flowkern.trace(model) as f2, flowkern.prune(model, layer=L, keep=4) as p2:
        b = _generate(model, kwargs)
    assert torch.equal(a, b) and torch.equal(p1.keep_mask, p2.keep_mask)
    torch.testing.assert_close(f1.step_shares, f2.step_shares, atol=1e-6, rtol=0)
    torch.testing.assert_close(f1.image_token_attention, f2.image_token_attention, atol=1e-6, rtol=0)
    # prune exits first, trace last (not LIFO): still restored
    t = flowkern.trace(model).__enter__()
    q = flowkern.prune(model, layer=L, keep=0).__enter__()
    _generate(model, kwargs, new=1)
    q.__exit__(None, None, None)
    assert compat.attn_implementation(model.config.text_config) == "flowkern"
    t.__exit__(None, None, None)
    assert _state(model) == before and model not in _SESSIONS


def test_forward_timer_switches_nothing(llava):
    model, kwargs = llava
    before = _state(model)
    with ForwardTimer(model) as timer:
        assert compat.attn_implementation(model.config.text_config) == "sdpa"
        _generate(model, kwargs, new=4)
    assert len(timer.decode_seconds) == 3 and timer.prefill_seconds > 0 and timer.batch_size == 2
    assert timer.decode_tokens_per_second == 2 * 3 / sum(timer.decode_seconds)
    assert _state(model) == before


def test_row_events_only_where_asked(llava, monkeypatch):
    """Nobody listens: no flowkern kernel runs at a decode step (the fast path); the pruning ranks from one row event
    at layer L-1; a trace gets one per layer per step."""
    model, kwargs = llava
    calls = []
    real = ops.segment_attention

    def counting(q, *args, **kw):
        calls.append(q.shape[2])
        return real(q, *args, **kw)

    monkeypatch.setattr(ops, "segment_attention", counting)
    one = {k: v[1:] for k, v in kwargs.items()}  # one sample, no padding: SDPA needs no mask anywhere
    one["input_ids"], one["attention_mask"] = one["input_ids"][:, 2:], one["attention_mask"][:, 2:]
    with flowkern.prune(model):
        _generate(model, one)
    assert calls == []
    with flowkern.prune(model, layer=L, keep=4, rank="attention"):
        _generate(model, one)
    assert calls == [one["input_ids"].shape[1]]  # layer L-1 at the prefill, nothing else
    calls.clear()
    with flowkern.trace(model) as flow:
        _generate(model, one)
    assert calls == [one["input_ids"].shape[1]] * 4 + [1] * 4 * (NEW - 1) and flow.num_steps == NEW


def test_errors_leave_nothing_behind(llava):
    model, kwargs = llava
    before = _state(model)
    with flowkern.trace(model):
        with pytest.raises(RuntimeError, match="already inside a flowkern.trace"):
            flowkern.trace(model).__enter__()
        _generate(model, kwargs, new=1)
        with pytest.raises(RuntimeError, match="one prompt"):  # a listener refuses the call: the forward never runs
            _generate(model, kwargs, new=1)
    assert _state(model) == before

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.model.language_model.layers[3].register_forward_hook(boom)
    try:
        with flowkern.prune(model, layer=L, keep=4):
            with pytest.raises(RuntimeError, match="boom"):  # raised after layer L's narrowing hook ran
                _generate(model, kwargs)
            hooks = [len(layer._forward_pre_hooks) for layer in model.model.language_model.layers]
            assert hooks == [0, 0, 0, 0]  # this forward's narrowing hooks are gone
            assert all(not st.observe and st.keymap is None for st in Session.of(model)._states.values())
    finally:
        handle.remove()
    assert _state(model) == before


def test_cam_inside_a_trace_gets_a_differentiable_attention(llava):
    model, kwargs = llava
    before = _state(model)
    one = {k: v[:1] for k, v in kwargs.items()}
    with flowkern.trace(model):
        assert compat.attn_implementation(model.config.text_config) == "flowkern"
        seen = []
        handle = model.model.language_model.layers[0].register_forward_hook(
            lambda m, a, o: seen.append(compat.attn_implementation(model.config.text_config)))
        try:
            cam(model, one, torch.tensor([7, 8]), layers=[0], samples=1, noise_std=0.0)
        finally:
            handle.remove()
        assert seen == ["sdpa"] and compat.attn_implementation(model.config.text_config) == "flowkern"
        assert all(p.requires_grad for p in model.parameters())
    assert _state(model) == before


def test_refused_attention_restores_everything(llava, monkeypatch):
    model, kwargs = llava
    before = _state(model)

    def refuse(self, impl):
        raise ValueError("no")

    monkeypatch.setattr(type(model), "set_attn_implementation", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        flowkern.prune(model, layer=L).__enter__()
    monkeypatch.undo()
    assert _state(model) == before and model not in _SESSIONS
    with flowkern.prune(model, layer=L) as p:  # and it works afterwards
        _generate(model, kwargs, new=1)
    assert p.num_kept_image_tokens.tolist() == [0, 0]
