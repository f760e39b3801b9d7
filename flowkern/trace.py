"""``flowkern.trace``: per-layer attention shares of the answer tokens (paper eq. 6-8, Figure 2).

.. code-block:: python

    with flowkern.trace(model) as flow:
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    flow.shares                 # float32 [num_layers, 4]: system / image / user / generated
    flow.step_shares            # float32 [steps, num_layers, B, 4]
    flow.image_attention(2)     # float32 [rows, cols]: answer rows -> image tokens on the image grid, layer 2

    with flowkern.trace(model, per_head=True, segment_flow=True) as flow:
        model.generate(**inputs, max_new_tokens=16, do_sample=False)
    flow.head_shares            # float32 [num_layers, heads, 4]: the answer rows' shares per head
    flow.segment_flow           # float32 [num_layers, 4, 4]: query segment -> key segment mean mass

**Definition.** The *answer rows* are the query rows that produce answer tokens: the last prompt position
(whose logits give the first answer token), then every decoded position. Each forward call of the traced model
is one *step* and contributes its last query row. For step ``t``, decoder layer ``l`` and sample ``b``,
``step_shares[t, l, b, c]`` is the softmax attention mass that row puts on keys of segment ``c`` (see
:mod:`flowkern.hf.segments`), averaged over heads; each valid row sums to 1 over the four segments (eq. 7).
``shares[l, c]`` is the mean of ``step_shares[:, l, :, c]`` over the valid (step, sample) pairs: a row is
valid unless its sample already produced an end-of-sequence token (batched ``generate`` keeps running finished
samples on padding). With ``max_new_tokens=N`` and no early stop there are N steps; a plain forward is 1 step.

**Per head** (``per_head=True``): ``step_head_shares[t, l, b, h, c]`` is the same mass for head ``h`` alone (the
head mean of it is ``step_shares``); ``head_shares[l, h, c]`` its mean over the valid answer rows.

**Segment x segment flow** (``segment_flow=True``): ``segment_flow[l, q, c]`` is the head-mean attention mass that
the query rows of segment ``q`` put on the keys of segment ``c`` at layer ``l``, averaged over *every* query row of
segment ``q`` the model ran (prompt rows at prefill, one generated row per decode step; padding rows and rows of
finished samples left out), pooled over the batch; each row ``q`` that has rows sums to 1 over ``c``, and a query
segment with no row is NaN. Causality makes it lower-triangular in prompt order (system rows see only system keys).
The kernel already returns every row's per-segment mass, so this costs a reduction over the rows per layer and
step, O(layers x B x segments^2) memory; neither option is paid for when it is off.

**How.** A :class:`Flow` is a listener on the model's session (:mod:`flowkern.hf.session`): while it is attached
the language model runs the ``"flowkern"`` attention (the vision tower keeps its own). At each forward call it
labels the tokens the call adds (the whole prompt at prefill; one *generated* label per fed-back token after),
hands the labels to the session, which pushes each layer's key segment ids down to its attention, and asks for
every layer's row event. The fused kernel returns each row's per-segment mass and log-sum-exp; the event carries
the answer row's mass and (``image_attention``) the attention each key receives
(:func:`flowkern.key_attention_mass`), which the flow only records: memory is O(layers x steps x B) for the
shares (plus O(layers x steps x B x image tokens) for the image maps), never O(S^2). On exit (also on error) the
session restores the previous attention implementation and removes its hooks.

Inside :func:`flowkern.prune` a pruned layer's keys are labelled through its key map (the original token each
cache slot holds), so its shares are over the tokens that layer still sees; removed image tokens get 0 in the
image maps.

Limits: one prompt per trace (one ``generate`` or forward call, plus its decode steps); a multi-token forward
on a non-empty cache (chunked prefill, assisted decoding) raises ``NotImplementedError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from flowkern.listener import Listener

if TYPE_CHECKING:
    from flowkern.hf.attention import RowEvent
    from flowkern.hf.calls import Call

__all__ = ["trace", "Flow"]


class _Step:
    """What one forward call records: per layer the answer row's masses [B, nseg], per head [B, H, nseg] and
    image-key attention [B, K]."""

    __slots__ = ("mass", "heads", "image")

    def __init__(self, num_layers: int) -> None:
        self.mass: list[torch.Tensor | None] = [None] * num_layers
        self.heads: list[torch.Tensor | None] = [None] * num_layers
        self.image: list[torch.Tensor | None] = [None] * num_layers


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


class Flow(Listener):
    """Context manager that traces a Hugging Face VLM, and the record it fills. Create it with :func:`trace`.

    Attributes:
        segment_names: ``("system", "image", "user", "generated")``: the last axis of every share tensor.
        family: the model family (``flowkern.hf.models`` adapter name).
        num_layers: decoder layers of the language model.
    """

    owner = "flowkern.trace"
    exclusive = True
    attention = "flowkern"
    watches_calls = True
    tower_inputs = True

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        image_attention: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
        image_inputs: Mapping[str, Any] | None = None,
        per_head: bool = False,
        segment_flow: bool = False,
    ) -> None:
        from flowkern.hf import compat
        from flowkern.hf.models import get_adapter
        from flowkern.hf.segments import NUM_SEGMENTS, SEGMENT_NAMES

        self.model = model
        self.adapter = get_adapter(model)
        self.family = self.adapter.family
        self.config = model.config
        self.text_config = self.adapter.text_config(model.config)
        self.num_layers = int(self.text_config.num_hidden_layers)
        self.segment_names: tuple[str, ...] = SEGMENT_NAMES
        self.num_segments = NUM_SEGMENTS
        self.record_image_attention = bool(image_attention)
        self.record_per_head = bool(per_head)
        self.record_segment_flow = bool(segment_flow)
        if self.record_segment_flow and compat.slices_query_rows(self.text_config):
            raise ValueError(
                f"segment_flow: {self.family}'s KV-shared layers compute only the last query row at a generate "
                "prefill, so every prompt row's flow does not exist there; trace without segment_flow"
            )
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        self.eos_token_ids: tuple[int, ...] = tuple(int(e) for e in (eos_token_id or ()))
        self._explicit_inputs = {
            k: _to_cpu(v) for k, v in (image_inputs or {}).items() if k in self.adapter.layout_inputs and v is not None
        }
        # the record
        self._ids: torch.Tensor | None = None  # [B, T] token ids (-1 where unknown)
        self._prompt_len = 0
        self._segments: torch.Tensor | None = None  # [B, T] long labels, -1 = padding
        self._image_index: torch.Tensor | None = None  # [B, K] positions of image tokens
        self._image_valid: torch.Tensor | None = None  # [B, K]
        self._image_index_dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prefill_call: Call | None = None  # until it returns: the vision tower may still add its grid_thw
        self._layout_inputs: dict[str, Any] = {}
        self._finished: torch.Tensor | None = None  # [B] bool
        self._valid: list[torch.Tensor] = []  # per step [B] bool
        self._steps: list[_Step] = []
        self._grids: list | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self._new_rows = 0  # query rows the current forward adds (the rows segment_flow counts)
        self._flow_sum: torch.Tensor | None = None  # [L, B, nseg, nseg] float64
        self._flow_rows: torch.Tensor | None = None  # [L, B, nseg] float64: rows counted per query segment

    # ------------------------------------------------------------------------------------------------------
    # listener callbacks

    def on_call(self, call: Call) -> None:
        ids, n_new = call.ids, call.length
        total = 0 if self._segments is None else self._segments.shape[1]
        if call.prefill:
            if (
                self._segments is not None and ids is not None and n_new > total
                and torch.equal(ids[:, :total].to(self._ids.device), self._ids)
            ):
                self._decode(ids[:, total:], n_new - total)  # generate(use_cache=False): the whole sequence again
            else:
                self._prefill(call)
        else:
            if self._segments is None:
                raise RuntimeError("flowkern.trace: got a KV cache it did not see being filled; trace from the prompt")
            if call.past != total:
                raise RuntimeError(f"flowkern.trace: the cache holds {call.past} tokens but the trace labelled {total}")
            if n_new != 1:
                raise NotImplementedError(
                    f"flowkern.trace: a {n_new}-token forward on a non-empty cache (chunked prefill or assisted "
                    "decoding) is not supported"
                )
            self._decode(ids, n_new)
        call.labels, call.num_segments = self._segments, self.num_segments
        image = self.record_image_attention and self._image_index is not None and self._image_index.shape[1] > 0
        call.observe(self, range(self.num_layers), key_mass=image, per_head=self.record_per_head,
                     rows=self.record_segment_flow)

    def on_return(self, call: Call) -> None:
        if call is self._prefill_call:
            self._layout_inputs = {**self._explicit_inputs, **call.layout_inputs}
            self._prefill_call = None

    def on_row(self, event: RowEvent) -> None:
        step = self._steps[-1]
        step.mass[event.layer] = event.mass.float().clone()
        if event.head_mass is not None and self.record_per_head:
            step.heads[event.layer] = event.head_mass.float().clone()
        if event.rows is not None and self.record_segment_flow:
            self._add_flow(event)
        if event.key_mass is None:
            return
        received = event.key_mass
        dev = self._image_index_dev.get(received.device)
        if dev is None:
            dev = (self._image_index.to(received.device), self._image_valid.to(received.device))
            self._image_index_dev[received.device] = dev
        if event.keymap is not None:  # keys are a subset of the tokens: back to token positions (removed ones get 0)
            keymap = event.keymap.to(received.device)
            held = keymap >= 0
            full = received.new_zeros(received.shape[0], self._segments.shape[1])
            received = full.scatter_add_(1, keymap.clamp(min=0), torch.where(held, received, 0.0))
        step.image[event.layer] = torch.where(dev[1], received.gather(1, dev[0]), 0.0)

    def _add_flow(self, event: RowEvent) -> None:
        """Add the rows this forward adds to the segment x segment sums of ``event.layer``."""
        rows = event.rows  # [B, Sq, nseg]
        B, sq, nseg = rows.shape
        new = min(self._new_rows, sq)
        rows = rows[:, sq - new:].double()
        labels = self._segments.to(rows.device)
        if event.keymap is not None:  # a narrowed layer: its rows are the tokens its keys hold
            pos = event.keymap[:, -new:].to(rows.device) if new else event.keymap[:, :0].to(rows.device)
        else:
            T = labels.shape[1]
            pos = torch.arange(T - new, T, device=rows.device).expand(B, new)
        qseg = torch.where(pos >= 0, labels.gather(1, pos.clamp(min=0)), -1)
        valid = (qseg >= 0) & self._valid[-1].to(rows.device)[:, None]
        onehot = torch.nn.functional.one_hot(qseg.clamp(min=0), nseg).double() * valid[..., None]  # [B, new, nseg]
        if self._flow_sum is None:
            self._flow_sum = torch.zeros(self.num_layers, B, nseg, nseg, dtype=torch.float64)
            self._flow_rows = torch.zeros(self.num_layers, B, nseg, dtype=torch.float64)
        self._flow_sum[event.layer] += torch.einsum("bnq,bnk->bqk", onehot, rows).cpu()
        self._flow_rows[event.layer] += onehot.sum(dim=1).cpu()

    # ------------------------------------------------------------------------------------------------------
    # bookkeeping

    def _prefill(self, call: Call) -> None:
        from flowkern.hf.segments import image_token_index, label_prompt

        ids, mask = call.ids, call.mask
        if ids is None:
            raise ValueError("flowkern.trace needs input_ids at prefill to label system/image/user tokens")
        if self._steps:
            raise RuntimeError(
                "flowkern.trace records one prompt (one generate or forward call); open a new trace for the next"
            )
        if mask is not None:
            mask = mask[:, : ids.shape[1]]
            if not bool(mask[:, -1].bool().all()):
                raise ValueError(
                    "flowkern.trace needs left padding (the last prompt position real in every row, since it is the "
                    "answer row): set tokenizer.padding_side = 'left'"
                )
        self._ids = ids.detach().clone()
        self._prompt_len = int(ids.shape[1])
        self._segments = label_prompt(self._ids, self.adapter.placeholder_token_ids(self.config), mask)
        self._image_index, self._image_valid = image_token_index(self._segments)
        self._prefill_call = call
        self._finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        self._new_rows = self._prompt_len
        self._begin_step()

    def _decode(self, ids: torch.Tensor | None, n_new: int) -> None:
        from flowkern.hf.segments import GENERATED

        B = self._segments.shape[0]
        if ids is None:
            ids = torch.full((B, n_new), -1, dtype=self._ids.dtype, device=self._ids.device)
        ids = ids.detach().to(self._ids.device)
        if self.eos_token_ids:
            eos = torch.tensor(self.eos_token_ids, dtype=ids.dtype, device=ids.device)
            self._finished = self._finished | torch.isin(ids, eos).any(dim=1)
        self._ids = torch.cat([self._ids, ids], dim=1)
        new = torch.full((B, n_new), GENERATED, dtype=self._segments.dtype, device=self._segments.device)
        self._segments = torch.cat([self._segments, new], dim=1)
        self._new_rows = n_new
        self._begin_step()

    def _begin_step(self) -> None:
        self._valid.append(~self._finished)
        self._steps.append(_Step(self.num_layers))
        self._cache.clear()

    # ------------------------------------------------------------------------------------------------------
    # results

    def _stack(self, what: str) -> torch.Tensor:
        if what in self._cache:
            return self._cache[what]
        if not self._steps:
            raise RuntimeError("flowkern.trace recorded nothing: run the model inside the `with` block")
        rows = []
        for t, step in enumerate(self._steps):
            values = getattr(step, what)
            missing = [i for i, v in enumerate(values) if v is None]
            if missing:
                raise RuntimeError(f"flowkern.trace: step {t} recorded no attention for layers {missing}")
            rows.append(torch.stack([v.float().cpu() for v in values]))
        out = torch.stack(rows)
        self._cache[what] = out
        return out

    @property
    def num_steps(self) -> int:
        """Number of answer rows per sample (forward calls traced)."""
        return len(self._steps)

    @property
    def batch_size(self) -> int:
        """B of the traced prompt."""
        if self._segments is None:
            raise RuntimeError("flowkern.trace recorded nothing: run the model inside the `with` block")
        return int(self._segments.shape[0])

    @property
    def segment_ids(self) -> torch.Tensor:
        """long ``[B, T]``: the label of every token seen (prompt + fed-back generated tokens), -1 for padding."""
        if self._segments is None:
            raise RuntimeError("flowkern.trace recorded nothing: run the model inside the `with` block")
        return self._segments.cpu()

    @property
    def step_shares(self) -> torch.Tensor:
        """float32 ``[steps, num_layers, B, 4]``: head-mean attention mass of each answer row per segment."""
        return self._stack("mass")

    @property
    def valid(self) -> torch.Tensor:
        """bool ``[steps, B]``: False for rows after the sample produced an end-of-sequence token."""
        if not self._valid:
            raise RuntimeError("flowkern.trace recorded nothing: run the model inside the `with` block")
        return torch.stack([v.cpu() for v in self._valid])

    @property
    def sample_shares(self) -> torch.Tensor:
        """float32 ``[num_layers, B, 4]``: ``step_shares`` averaged over each sample's valid steps."""
        w = self.valid.float()  # [T, B]
        total = (self.step_shares * w[:, None, :, None]).sum(dim=0)
        return total / w.sum(dim=0).clamp(min=1)[None, :, None]

    @property
    def shares(self) -> torch.Tensor:
        """float32 ``[num_layers, 4]``: ``step_shares`` averaged over valid (step, sample) rows (Figure 2A)."""
        w = self.valid.float()
        total = (self.step_shares * w[:, None, :, None]).sum(dim=(0, 2))
        return total / w.sum().clamp(min=1)

    @property
    def step_head_shares(self) -> torch.Tensor:
        """float32 ``[steps, num_layers, B, heads, 4]``: ``step_shares`` per attention head."""
        if not self.record_per_head:
            raise RuntimeError("per-head shares were not recorded: use flowkern.trace(model, per_head=True)")
        return self._stack("heads")

    @property
    def sample_head_shares(self) -> torch.Tensor:
        """float32 ``[num_layers, B, heads, 4]``: ``step_head_shares`` averaged over each sample's valid steps."""
        w = self.valid.float()  # [T, B]
        total = (self.step_head_shares * w[:, None, :, None, None]).sum(dim=0)
        return total / w.sum(dim=0).clamp(min=1)[None, :, None, None]

    @property
    def head_shares(self) -> torch.Tensor:
        """float32 ``[num_layers, heads, 4]``: ``step_head_shares`` averaged over valid (step, sample) rows; its
        mean over heads is :attr:`shares`."""
        w = self.valid.float()
        total = (self.step_head_shares * w[:, None, :, None, None]).sum(dim=(0, 2))
        return total / w.sum().clamp(min=1)

    def _flow_record(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.record_segment_flow:
            raise RuntimeError("segment flow was not recorded: use flowkern.trace(model, segment_flow=True)")
        if self._flow_sum is None:
            raise RuntimeError("flowkern.trace recorded nothing: run the model inside the `with` block")
        return self._flow_sum, self._flow_rows

    @property
    def sample_segment_flow(self) -> torch.Tensor:
        """float32 ``[num_layers, B, 4, 4]``: per sample, the mean mass its query rows of segment ``q`` (dim 2) put
        on key segment ``c`` (dim 3); NaN where the sample has no row of segment ``q``."""
        total, rows = self._flow_record()
        return (total / rows[..., None]).float()

    @property
    def segment_flow(self) -> torch.Tensor:
        """float32 ``[num_layers, 4, 4]``: mean mass the query rows of segment ``q`` (dim 1) put on key segment ``c``
        (dim 2), over every such row of the batch (each row weighs the same); NaN where no row has segment ``q``."""
        total, rows = self._flow_record()
        return (total.sum(dim=1) / rows.sum(dim=1)[..., None]).float()

    @property
    def image_token_attention(self) -> torch.Tensor:
        """float32 ``[steps, num_layers, B, K]``: attention each image token receives from the answer row (head
        mean); column ``j`` of sample ``b`` is the token at ``image_token_positions[b, j]`` (0 past its count)."""
        if not self.record_image_attention:
            raise RuntimeError("image attention was not recorded: use flowkern.trace(model, image_attention=True)")
        if self._image_index is None or self._image_index.shape[1] == 0:
            return torch.zeros(self.num_steps, self.num_layers, self.batch_size, 0)
        return self._stack("image")

    @property
    def image_token_positions(self) -> torch.Tensor:
        """long ``[B, K]``: sequence position of each sample's image tokens, in order (0 past its count)."""
        if self._image_index is None:
            raise RuntimeError("flowkern.trace recorded nothing: run the model inside the `with` block")
        return self._image_index.cpu()

    @property
    def image_grids(self) -> list:
        """Per sample, the list of :class:`flowkern.hf.segments.ImageGrid` views of its images."""
        if self._grids is None:
            if self._ids is None:
                raise RuntimeError("flowkern.trace recorded nothing: run the model inside the `with` block")
            prompt_len = self._prompt_len
            prompt_ids = self._ids[:, :prompt_len]
            prompt_seg = self._segments[:, :prompt_len]
            inputs = dict(self._layout_inputs)
            self._grids = self.adapter.image_grids(self.config, prompt_ids.cpu(), prompt_seg.cpu(), inputs)
        return self._grids

    def image_attention(
        self,
        layer: int | None = None,
        *,
        sample: int = 0,
        image: int = 0,
        view: int | str = 0,
        step: int | None = None,
    ) -> torch.Tensor:
        """Attention from the answer rows to one image's tokens, laid out on its grid (Figure 2B).

        Args:
            layer: decoder layer (negative counts from the end); None averages over layers.
            sample: batch index.
            image: which image of the sample (prompt order).
            view: which view of that image: index among its grids or name (``"base"``, ``"crops"``, ``"frame1"``).
            step: one answer row; None averages over the sample's valid steps.

        Returns:
            float32 ``[rows, cols]``: head-mean softmax probability each image token receives (NaN where a grid
            cell has no token).
        """
        grids = [g for g in self.image_grids[sample] if g.image == image]
        if not grids:
            raise ValueError(f"sample {sample} has no image {image}")
        if isinstance(view, str):
            match = [g for g in grids if g.name == view]
            if not match:
                raise ValueError(f"image {image} has no view {view!r}; views: {[g.name for g in grids]}")
            grid = match[0]
        else:
            grid = grids[view]
        att = self.image_token_attention[:, :, sample]  # [T, L, K]
        att = att.mean(dim=1) if layer is None else att[:, layer]
        if step is None:
            w = self.valid[:, sample].float()
            per_token = (att * w[:, None]).sum(dim=0) / w.sum().clamp(min=1)
        else:
            per_token = att[step]
        flat = grid.index.flatten()
        values = torch.where(flat >= 0, per_token[flat.clamp(min=0)], torch.tensor(float("nan")))
        return values.view(grid.shape)

    def to_dict(self) -> dict:
        """JSON-able summary for a CLI or a figure: names, sizes, shares, per-step shares and image grid shapes (and
        ``head_shares`` / ``segment_flow`` when recorded; NaN as None)."""
        try:
            grids = [[g.to_dict() for g in sample] for sample in self.image_grids]
        except ValueError as exc:  # a prompt the layout rules do not describe: shares are still valid
            grids = str(exc)
        return {
            "family": self.family,
            "segment_names": list(self.segment_names),
            "num_layers": self.num_layers,
            "num_steps": self.num_steps,
            "batch_size": self.batch_size,
            "shares": self.shares.tolist(),
            "sample_shares": self.sample_shares.tolist(),
            "step_shares": self.step_shares.tolist(),
            "valid": self.valid.tolist(),
            "image_grids": grids,
            **({"head_shares": self.head_shares.tolist()} if self.record_per_head else {}),
            **({"segment_flow": _nan_to_none(self.segment_flow.tolist())} if self.record_segment_flow else {}),
        }


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if x != x else x


def trace(
    model: torch.nn.Module,
    *,
    image_attention: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    image_inputs: Mapping[str, Any] | None = None,
    per_head: bool = False,
    segment_flow: bool = False,
) -> Flow:
    """Trace how a VLM's answer tokens split their attention between system, image, user and generated tokens.

    Args:
        model: a supported Hugging Face VLM (``flowkern.hf.models.supported_model_types()``), e.g.
            ``LlavaForConditionalGeneration`` or ``Qwen2VLForConditionalGeneration``.
        image_attention: also record the attention each image token receives from the answer rows (for
            :meth:`Flow.image_attention`); costs one extra pass over the keys per layer and step.
        eos_token_id: end-of-sequence id(s) that finish a sample (default: ``model.generation_config``);
            rows after it are marked invalid and left out of the means.
        image_inputs: optional processor outputs describing the images (``image_sizes`` for LLaVA-NeXT,
            ``image_grid_thw`` / ``video_grid_thw`` for Qwen), used for the image grids when the forward call does
            not receive them (recent ``generate`` encodes images first and passes only their features). Without
            them, LLaVA-NeXT grids fall back to the base image view; Qwen grids use the vision tower's inputs.
        per_head: also record the answer rows' shares per attention head (:attr:`Flow.head_shares`,
            ``[num_layers, heads, 4]``).
        segment_flow: also record the mean mass from every query segment to every key segment
            (:attr:`Flow.segment_flow`, ``[num_layers, 4, 4]``), over all query rows.

    Returns:
        a :class:`Flow`, to use as ``with flowkern.trace(model) as flow: ...``; it is filled while the model
        runs and keeps its record after the block.

    Raises:
        ValueError: the model family is not supported (the message lists the supported ones); ``segment_flow``
            on a model with KV-shared layers (Gemma 4: they compute only the last query row at a generate prefill).
    """
    return Flow(model, image_attention=image_attention, eos_token_id=eos_token_id, image_inputs=image_inputs,
                per_head=per_head, segment_flow=segment_flow)
