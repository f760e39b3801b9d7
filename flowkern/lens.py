"""``flowkern.lens``: the logit lens -- what each decoder layer's output would predict if it were the last one.

.. code-block:: python

    with flowkern.lens(model, positions="last", top_k=5) as lens:
        model(**inputs)
    lens.top_ids[:, 0, 0]        # long [num_layers, 5]: each layer's five likeliest next tokens at the last position
    lens.top_probs[:, 0, 0]      # float32 [num_layers, 5]: their probabilities

    with flowkern.lens(model, positions="image", top_k=1, image_inputs=inputs) as lens:
        model(**inputs)
    lens.image_map(3)            # long [rows, cols]: the word each image patch "says" after layer 3

**Definition.** For decoder layer ``l``, sample ``b`` and a chosen prompt position ``p``, let ``h`` be the layer's
output hidden state at ``p``. The lens distribution is ``softmax(lm_head(norm(h)))``: the model's own final norm
and LM head (:meth:`flowkern.hf.models.ModelAdapter.output_head`) applied to an intermediate layer. At the last
layer it is exactly the model's next-token distribution. Only what is asked is kept: the ``top_k`` likeliest ids and
their probabilities, and/or the probabilities of given ``token_ids`` -- never a ``[layers, S, vocab]`` tensor: the
positions are taken in chunks of at most :data:`CHUNK_LOGITS` logits.

**Positions.** ``"last"``: the last prompt position (whose prediction is the first answer token; needs left
padding); ``"image"``: every image placeholder token of each sample (:func:`flowkern.hf.segments.image_token_index`;
``valid`` marks the columns a sample has), laid out on the image grid by :meth:`Lens.image_map`; or explicit
positions (ints, negative from the end), the same for every sample.

**How.** A listener (:mod:`flowkern.listener`) with a forward hook on each decoder layer; it reads the prompt's
forward (the prefill) only: decode steps of ``generate`` are not recorded. It does not change the attention
implementation. It refuses to run beside :func:`flowkern.prune` (a pruned layer's output holds only the kept
tokens, so a chosen position may not exist there). On Qwen3-VL the DeepStack features added to the image tokens
after the first layers are added after the layer's output, so the lens of those layers does not include them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from flowkern.listener import Listener

if TYPE_CHECKING:
    from flowkern.hf.calls import Call
    from flowkern.hf.session import Session

__all__ = ["lens", "Lens", "CHUNK_LOGITS"]

CHUNK_LOGITS = 2**22
"""At most this many logits (positions x batch x vocabulary) exist at once while a layer is read (16 MiB in fp32)."""

_NAMED_POSITIONS = ("last", "image")


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def _vocab_size(head: torch.nn.Module) -> int:
    return int(getattr(head, "out_features", 0) or head.weight.shape[0])


def _check(positions: Any, top_k: Any, token_ids: Any) -> tuple[Any, int, torch.Tensor | None]:
    """Checked ``(positions, top_k, token_ids)``; ValueError naming the argument."""
    if isinstance(positions, str):
        if positions not in _NAMED_POSITIONS:
            raise ValueError(f"positions must be 'last', 'image' or a list of ints, got {positions!r}")
    else:
        items = positions.tolist() if isinstance(positions, torch.Tensor) else positions
        if not isinstance(items, Sequence) or not items or not all(isinstance(p, int) for p in items):
            raise ValueError(f"positions must be 'last', 'image' or a non-empty list of ints, got {positions!r}")
        positions = [int(p) for p in items]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    ids = None
    if token_ids is not None:
        ids = torch.as_tensor(token_ids)
        if ids.dtype.is_floating_point or ids.dim() not in (1, 2) or ids.numel() == 0:
            raise ValueError(f"token_ids must be ints [n] (every sample) or [B, n], got {token_ids!r}")
        ids = ids.long()
    if top_k == 0 and ids is None:
        raise ValueError("top_k must be >= 1 when no token_ids are given: the lens would keep nothing")
    return positions, int(top_k), ids


class Lens(Listener):
    """Context manager that applies the logit lens while a VLM reads a prompt, and the record it fills. Create it
    with :func:`lens`.

    Attributes:
        num_layers: decoder layers of the language model.
        top_k: ids kept per position and layer; token_ids: long ``[n]`` or ``[B, n]`` or None.
    """

    owner = "flowkern.lens"
    watches_calls = True
    tower_inputs = True

    def __init__(self, model: torch.nn.Module, *, positions: str | Sequence[int] = "last", top_k: int = 5,
                 token_ids: Any = None, image_inputs: Mapping[str, Any] | None = None) -> None:
        from flowkern.hf.models import get_adapter

        self.positions_spec, self.top_k, self.token_ids = _check(positions, top_k, token_ids)
        self.model = model
        self.adapter = get_adapter(model)
        self.config = model.config
        self.num_layers = int(self.adapter.text_config(model.config).num_hidden_layers)
        self._explicit_inputs = {k: _to_cpu(v) for k, v in (image_inputs or {}).items()
                                 if k in self.adapter.layout_inputs and v is not None}
        self._head = self.adapter.output_head(model)
        vocab = _vocab_size(self._head[1])
        if self.token_ids is not None and not bool(((self.token_ids >= 0) & (self.token_ids < vocab)).all()):
            raise ValueError(f"token_ids must lie in [0, {vocab}) (the LM head's vocabulary), got "
                             f"{self.token_ids.tolist()}")
        self._active: Call | None = None  # the prefill being read
        self._positions: torch.Tensor | None = None  # [B, P]
        self._valid: torch.Tensor | None = None  # [B, P]
        self._ids: torch.Tensor | None = None  # prompt ids [B, S]
        self._segments: torch.Tensor | None = None
        self._layout_inputs: dict[str, Any] = {}
        self._top_ids: list[torch.Tensor | None] = [None] * self.num_layers
        self._top_probs: list[torch.Tensor | None] = [None] * self.num_layers
        self._token_probs: list[torch.Tensor | None] = [None] * self.num_layers
        self._grids: list | None = None

    # ------------------------------------------------------------------------------------------------------
    # listener callbacks

    def install(self, session: Session, handles: list[Any]) -> None:
        from flowkern.hf.sites import hook_layer_outputs

        hook_layer_outputs(session, self._on_layer, handles)

    def on_call(self, call: Call) -> None:
        session = self._session
        if session is not None and any(x.owner == "flowkern.prune" for x in session.listeners):
            raise NotImplementedError(
                "flowkern.lens does not run inside flowkern.prune: a pruned layer's output holds only the kept "
                "tokens, so the chosen positions may not exist there; run the lens on the unpruned model")
        if not call.prefill:
            return  # decode steps are not recorded
        if self._positions is not None:
            raise RuntimeError("flowkern.lens records one prompt (one generate or forward call); open a new lens")
        if call.ids is None:
            raise ValueError("flowkern.lens needs input_ids at prefill to find the chosen positions")
        if self.token_ids is not None and self.token_ids.dim() == 2 and self.token_ids.shape[0] not in (1, call.batch):
            raise ValueError(f"token_ids has {self.token_ids.shape[0]} rows but the prompt batch has {call.batch}")
        self._positions, self._valid = self._resolve(call)
        self._ids = call.ids.detach().cpu().clone()
        self._active = call

    def on_return(self, call: Call) -> None:
        if call is self._active:
            self._layout_inputs = {**self._explicit_inputs, **call.layout_inputs}
            self._active = None

    # ------------------------------------------------------------------------------------------------------
    # reading a layer

    def _resolve(self, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions [B, P], valid [B, P])`` of this prompt (CPU)."""
        from flowkern.hf.segments import image_token_index, label_prompt

        ids = call.ids.cpu()
        B, S = ids.shape
        mask = None if call.mask is None else call.mask[:, :S].bool().cpu()
        spec = self.positions_spec
        if spec == "image":
            self._segments = label_prompt(ids, self.adapter.placeholder_token_ids(self.config), mask)
            return image_token_index(self._segments)
        if spec == "last":
            if mask is not None and not bool(mask[:, -1].all()):
                raise ValueError("flowkern.lens positions='last' needs left padding (the last prompt position real "
                                 "in every row): set tokenizer.padding_side = 'left'")
            return torch.full((B, 1), S - 1), torch.ones(B, 1, dtype=torch.bool)
        bad = [p for p in spec if not -S <= p < S]
        if bad:
            raise ValueError(f"positions {bad} are outside the prompt of {S} tokens")
        pos = torch.tensor([p % S for p in spec]).expand(B, -1).clone()
        valid = torch.ones_like(pos, dtype=torch.bool) if mask is None else mask.gather(1, pos)
        return pos, valid

    def _on_layer(self, idx: int, hidden: torch.Tensor) -> None:
        if self._active is None:
            return
        with torch.no_grad():
            self._read(idx, hidden.detach())

    def _read(self, idx: int, hidden: torch.Tensor) -> None:
        """Lens of layer ``idx`` at the chosen positions, chunk by chunk over the positions."""
        norm, head = self._head
        B, P = self._positions.shape
        if hidden.shape[0] != B:
            raise RuntimeError(f"flowkern.lens: layer {idx} got {hidden.shape[0]} rows, the prompt has {B}")
        pos = self._positions.to(hidden.device)
        token_ids = None if self.token_ids is None else self.token_ids.to(hidden.device).expand(B, -1)
        step = max(1, CHUNK_LOGITS // (B * _vocab_size(head)))
        ids_out, probs_out, tok_out = [], [], []
        for start in range(0, P, step):
            p = pos[:, start:start + step]
            x = hidden.gather(1, p[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [B, p, D]
            logp = torch.log_softmax(head(norm(x)).float(), dim=-1)  # [B, p, V]
            if self.top_k:
                values, ids = logp.topk(min(self.top_k, logp.shape[-1]), dim=-1)
                ids_out.append(ids.cpu())
                probs_out.append(values.exp().cpu())
            if token_ids is not None:
                tok_out.append(logp.gather(-1, token_ids[:, None, :].expand(-1, p.shape[1], -1)).exp().cpu())
        if self.top_k:
            self._top_ids[idx], self._top_probs[idx] = torch.cat(ids_out, 1), torch.cat(probs_out, 1)
        if token_ids is not None:
            self._token_probs[idx] = torch.cat(tok_out, 1)

    # ------------------------------------------------------------------------------------------------------
    # results

    def _stack(self, values: list[torch.Tensor | None], what: str) -> torch.Tensor:
        if self._positions is None:
            raise RuntimeError("flowkern.lens recorded nothing: run the model inside the `with` block")
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise RuntimeError(f"flowkern.lens: no {what} for layers {missing}")
        return torch.stack(values)  # type: ignore[arg-type]

    @property
    def positions(self) -> torch.Tensor:
        """long ``[B, P]``: the prompt position of each lens column (0 where not ``valid``)."""
        if self._positions is None:
            raise RuntimeError("flowkern.lens recorded nothing: run the model inside the `with` block")
        return self._positions

    @property
    def valid(self) -> torch.Tensor:
        """bool ``[B, P]``: columns that are real positions of the sample (image columns past its count, padding)."""
        self.positions  # noqa: B018 - raises when nothing was recorded
        return self._valid

    @property
    def top_ids(self) -> torch.Tensor:
        """long ``[num_layers, B, P, top_k]``: the likeliest token ids, best first."""
        if not self.top_k:
            raise RuntimeError("flowkern.lens kept no top-k ids: use top_k >= 1")
        return self._stack(self._top_ids, "top-k ids")

    @property
    def top_probs(self) -> torch.Tensor:
        """float32 ``[num_layers, B, P, top_k]``: their probabilities."""
        if not self.top_k:
            raise RuntimeError("flowkern.lens kept no top-k ids: use top_k >= 1")
        return self._stack(self._top_probs, "top-k probabilities")

    @property
    def token_probs(self) -> torch.Tensor:
        """float32 ``[num_layers, B, P, n]``: the probability of each of ``token_ids`` (per sample for ``[B, n]``)."""
        if self.token_ids is None:
            raise RuntimeError("flowkern.lens was given no token_ids")
        return self._stack(self._token_probs, "token probabilities")

    @property
    def image_grids(self) -> list:
        """Per sample, the :class:`flowkern.hf.segments.ImageGrid` views of its images (``positions="image"``)."""
        if self.positions_spec != "image":
            raise RuntimeError("image maps need flowkern.lens(model, positions='image')")
        if self._grids is None:
            self.positions  # noqa: B018 - raises when nothing was recorded
            self._grids = self.adapter.image_grids(self.config, self._ids, self._segments, dict(self._layout_inputs))
        return self._grids

    def image_map(self, layer: int, *, sample: int = 0, image: int = 0, view: int = 0,
                  token: int | None = None) -> torch.Tensor:
        """One layer's lens of one image's tokens, laid out on its grid (``positions="image"``).

        Args:
            layer: decoder layer (negative counts from the end).
            sample, image, view: which sample, which of its images (prompt order), which view of it.
            token: None for the top-1 token id of each patch; ``j`` for the probability of ``token_ids[..., j]``.

        Returns:
            long ``[rows, cols]`` top-1 ids (-1 where a cell has no token), or float32 ``[rows, cols]``
            probabilities (NaN there).
        """
        grids = [g for g in self.image_grids[sample] if g.image == image]
        if not grids or not 0 <= view < len(grids):
            raise ValueError(f"sample {sample} has no image {image} view {view}")
        flat = grids[view].index.flatten()
        if token is None:
            values, fill = self.top_ids[layer, sample, :, 0], torch.tensor(-1)
        else:
            values, fill = self.token_probs[layer, sample, :, token], torch.tensor(float("nan"))
        return torch.where(flat >= 0, values[flat.clamp(min=0)], fill).view(grids[view].shape)


def lens(model: torch.nn.Module, *, positions: str | Sequence[int] = "last", top_k: int = 5, token_ids: Any = None,
         image_inputs: Mapping[str, Any] | None = None) -> Lens:
    """The logit lens of a VLM's prompt: each decoder layer's output at chosen positions through the final norm and
    LM head, keeping only the top-k tokens and/or the probabilities of given tokens.

    Args:
        model: a supported Hugging Face VLM (``flowkern.hf.models.supported_model_types()``).
        positions: ``"last"`` (the last prompt position), ``"image"`` (every image token) or a list of prompt
            positions (negative from the end), the same for every sample.
        top_k: keep the ``top_k`` likeliest ids per position and layer (0: none).
        token_ids: also keep the probabilities of these ids: ints ``[n]`` for every sample or ``[B, n]``.
        image_inputs: processor outputs describing the images (as in :func:`flowkern.trace`), for
            :meth:`Lens.image_map` when the forward call does not receive them.

    Returns:
        a :class:`Lens`, used as ``with flowkern.lens(model) as lens: model(**inputs)``; it reads the prompt's
        forward (the prefill of ``generate``) and keeps its record after the block.

    Raises:
        ValueError: a bad argument (named), or an unsupported model family.
    """
    return Lens(model, positions=positions, top_k=top_k, token_ids=token_ids, image_inputs=image_inputs)
