"""What one pruning stage's scorer reads, gathered on the listener's side (:class:`StageScoring`).

A stage at decoder layer ``L`` with a :class:`flowkern.scorers.Scorer` asks, at each prefill, for exactly what the
scorer's :attr:`~flowkern.scorers.Scorer.needs` name and nothing else:

- ``attention``: the row event of layer ``L-1`` (:meth:`flowkern.hf.calls.Call.observe`) with the attention each key
  receives from the last prompt row (``attention_rows = "last"``) or on average from the text rows after the first
  image token (``"text"``: the event's ``chosen_key_mass``, :func:`flowkern.hf.attention.chosen_key_mass`);
- ``prerope_attention``: the input of layer ``L-1``'s attention module (a forward pre-hook), projected to queries and
  keys before the rotary embedding (:func:`flowkern.hf.compat.project_qk`); their causal softmax (padding never a
  key) is normalised by its own LSE (:func:`flowkern.ops.segment_attention`) and the key mass taken with
  :func:`flowkern.ops.key_attention_mass`, over the same query rows as ``attention``;
- ``hidden``: the hidden states entering layer ``L`` (given to :meth:`StageScoring.choose`, or caught by a forward
  pre-hook on layer ``L``: :meth:`StageScoring._hidden_hook` is the one place that does it);
- ``features``: the input embeddings of the prompt (the language model entry's ``inputs_embeds``; else what enters
  decoder layer 0);
- ``grids``: the image grids of the adapter's layout (:mod:`flowkern.hf.models`), as row indices;
- ``cls_attention``: the vision tower's [CLS] -> patch attention (:class:`flowkern.hf.tower.TowerCLS`, hooked for as
  long as the listener is attached: :meth:`StageScoring.install`), at each image row.

``segments`` (:func:`flowkern.hf.segments.label_prompt`) come with every call. When the stage runs,
:meth:`StageScoring.choose` packs them into :class:`flowkern.scorers.ScoreInputs` and returns per sample the ``k``
image tokens with the highest scores (:func:`flowkern.scorers.select`); the pruning adds what is always kept
(:func:`flowkern.plan.prompt_keep`: text, each row's last position; padding never).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from flowkern.scorers import ScoreInputs, Scorer, get_scorer, select

if TYPE_CHECKING:
    from flowkern.hf.attention import RowEvent
    from flowkern.hf.calls import Call

__all__ = ["StageScoring", "text_rows"]

_PROVIDED = frozenset({"attention", "prerope_attention", "hidden", "features", "grids", "cls_attention"})


def text_rows(image: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """bool ``[B, S]``: the real text rows after each row's first image token (the ``"text"`` query rows).

    Args:
        image: bool ``[B, S]`` image tokens; real: bool ``[B, S]`` (False = padding).
    """
    return real & ~image & (image.long().cumsum(dim=1) > 0)


class StageScoring:
    """The scorer of one pruning stage at decoder layer ``layer``, on the listener's side of a session.

    Per prefill: :meth:`request` (from the listener's ``on_call``), :meth:`on_row` (from its ``on_row``),
    :meth:`choose` (when the stage's plan runs), :meth:`release` (from its ``on_return``).

    Args:
        model: the model the listener is attached to.
        scorer: a registered scorer name or a :class:`flowkern.scorers.Scorer`.
        layer: the stage's decoder layer ``L`` (resolved, ``>= 0``).
        keep: image tokens kept per sample (as :func:`flowkern.plan.num_to_keep`); 0 reads nothing.
        seed: the pruning seed (:attr:`flowkern.scorers.ScoreInputs.seed`).

    Attributes:
        scorer: the :class:`flowkern.scorers.Scorer`. needs: what this stage gathers (empty when ``keep == 0``).
        layer, budget, seed: the arguments ``layer``, ``keep``, ``seed``.
        scores: float32 ``[B, S_cur]``: the scorer's scores at the last :meth:`choose` (None when nothing was scored).

    Raises:
        ValueError: an unknown scorer; a scorer reading layer ``L-1``'s attention at ``layer=0``.
        NotImplementedError: a need this build cannot gather (naming the scorer and the need).
    """

    def __init__(self, model: torch.nn.Module, scorer: str | Scorer, *, layer: int, keep: int | float,
                 seed: int = 0) -> None:
        from flowkern.hf.models import get_adapter

        self.scorer = get_scorer(scorer)
        self.layer, self.budget, self.seed = int(layer), keep, int(seed)
        self.needs = frozenset(self.scorer.needs) if keep != 0 else frozenset()
        name = self.scorer.name or type(self.scorer).__name__
        if self.layer == 0 and keep != 0 and not self.scorer.before_decoder:
            raise ValueError(f"rank={name!r} ranks image tokens by the attention they receive at layer L-1, so it "
                             "needs layer >= 1; at layer=0 use keep=0 or a scorer that ranks before the decoder")
        missing = sorted(self.needs - _PROVIDED)
        if missing:
            raise NotImplementedError(f"rank={name!r} needs {missing}, which flowkern.prune cannot gather yet")
        self.model = model
        self.adapter = get_adapter(model)
        self.config = model.config
        self.tower = None
        if "cls_attention" in self.needs:  # refused here, before any work, for a tower without [CLS]
            from flowkern.hf.tower import TowerCLS

            self.tower = TowerCLS(model)
        self.scores: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._reset()

    def install(self, handles: list[Any]) -> None:
        """Hooks for as long as the listener is attached (the vision tower's [CLS] capture, which must see the
        tower run before the language model); their handles go to ``handles``."""
        if self.tower is not None:
            handles.append(self.tower.install())

    def _reset(self) -> None:
        self._call: Call | None = None
        self._ids = self._image = self._real = self._rows = None
        self._attention: torch.Tensor | None = None
        self._attn_input: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        self._features: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------------
    # during the forward

    def request(self, call: Call, listener: Any) -> None:
        """At a prefill's ``on_call``: remember the prompt and ask for what the scorer needs (the row event of
        layer ``L-1`` delivered to ``listener.on_row``, which must pass it to :meth:`on_row`; hooks for this
        forward only, removed by :meth:`release`)."""
        from flowkern.hf.session import Session

        self.release()
        ids = call.ids
        if ids is None:
            raise ValueError("flowkern.prune needs input_ids at the prefill to find the image tokens")
        real = torch.ones_like(ids, dtype=torch.bool) if call.mask is None else \
            call.mask[:, : call.length].bool().to(ids.device)
        placeholders = torch.tensor(self.adapter.placeholder_token_ids(self.config), device=ids.device)
        self._call, self._ids, self._real = call, ids, real
        self._image = torch.isin(ids, placeholders) & real
        if not self.needs:
            return
        session = Session.of(self.model)
        L = self.layer
        if self.scorer.attention_rows == "text":
            self._rows = text_rows(self._image, real)
        if "attention" in self.needs:
            call.observe(listener, [L - 1], key_mass=self._rows is None, key_rows=self._rows)
        if "prerope_attention" in self.needs:
            self._hook(session.attention_modules[L - 1], "_attn_input")
        if "hidden" in self.needs:
            self._hidden_hook(session)
        if "features" in self.needs:
            entry = session.language_model_entry
            if entry is not None:
                self._handles.append(
                    entry.register_forward_pre_hook(self._entry_pre, with_kwargs=True, prepend=True))
            self._hook(session.layers[0], "_features")

    def _hidden_hook(self, session: Any) -> None:
        """Catch the hidden states entering layer ``L`` (for a planner that is not given them)."""
        self._hook(session.layers[self.layer], "_hidden")

    def _hook(self, module: torch.nn.Module, slot: str) -> None:
        """Store ``module``'s input hidden states in ``self.<slot>`` (the first time it runs in this forward)."""

        def pre(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if getattr(self, slot) is None:
                setattr(self, slot, args[0] if args else kwargs["hidden_states"])

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def _entry_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        if self._features is None and isinstance(embeds, torch.Tensor):
            self._features = embeds

    def on_row(self, event: RowEvent) -> None:
        """The row event of layer ``L-1`` asked for by :meth:`request` (other layers are ignored)."""
        if event.layer == self.layer - 1 and self._attention is None:
            self._attention = event.key_mass if self._rows is None else event.chosen_key_mass

    def release(self) -> None:
        """Remove this forward's hooks and forget what they caught (the :attr:`scores` record stays)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._reset()

    # ------------------------------------------------------------------------------------------------------
    # the choice

    def choose(self, hidden: torch.Tensor | None, positions: torch.Tensor, image: torch.Tensor, real: torch.Tensor,
               k: torch.Tensor) -> torch.Tensor:
        """bool ``[B, S_cur]``: the ``k[b]`` image rows of each sample the scorer ranks highest (what is always kept
        besides them -- text, each row's last row -- is :func:`flowkern.plan.prompt_keep`'s).

        Args:
            hidden: ``[B, S_cur, D]`` the hidden states entering layer ``L``, or None (caught by a hook).
            positions: long ``[B, S_cur]`` original prompt position of each row.
            image: bool ``[B, S_cur]`` the image tokens still in the sequence; real: bool ``[B, S_cur]``.
            k: long ``[B]`` image tokens to keep per sample (at most the candidates).

        Raises:
            RuntimeError: something the scorer needs was not seen in this forward.
            ValueError: scores of the wrong shape or NaN at an image token (:func:`flowkern.scorers.select`).
        """
        if self._image is None:
            raise RuntimeError("StageScoring.choose: no prefill was requested (call request() at on_call)")
        if self.budget == 0:
            self.scores = None
            return torch.zeros_like(image)
        inputs = self.inputs(hidden, positions, image, real, k)
        scores = self.scorer.score(inputs)
        self.scores = scores.float()
        return select(scores, image, k)

    def inputs(self, hidden: torch.Tensor | None, positions: torch.Tensor, image: torch.Tensor, real: torch.Tensor,
               k: torch.Tensor) -> ScoreInputs:
        """The :class:`flowkern.scorers.ScoreInputs` of this stage (arguments as in :meth:`choose`; ``k`` long
        ``[B]``)."""
        from flowkern.hf.segments import label_prompt

        B, S = image.shape
        assert self._ids is not None and self._real is not None
        prompt_segments = label_prompt(self._ids, self.adapter.placeholder_token_ids(self.config), self._real)
        fields: dict[str, Any] = dict(segments=prompt_segments.to(positions.device).gather(1, positions))
        if "attention" in self.needs:
            fields["attention"] = self._need(self._attention, "the attention of layer", B, S)
        if "prerope_attention" in self.needs:
            fields["prerope_attention"] = self._prerope(real, positions)
        if "hidden" in self.needs:
            fields["hidden"] = self._need(hidden if hidden is not None else self._hidden, "the input of layer", B, S,
                                          self.layer)
        if "features" in self.needs:
            features = self._need(self._features, "the input embeddings at layer", B, None, 0)
            fields["features"] = features.gather(1, positions.to(features.device)[:, :, None].expand(
                -1, -1, features.shape[-1]))
        if "grids" in self.needs:
            fields["grids"] = self._grids(positions)
        if "cls_attention" in self.needs:
            assert self.tower is not None and self._image is not None
            fields["cls_attention"] = self.tower.scores_for(self._image, positions).to(image.device)
        return ScoreInputs(layer=self.layer, image=image, real=real, k=k, positions=positions, seed=self.seed,
                           **fields)

    def _need(self, value: torch.Tensor | None, what: str, B: int, S: int | None,
              layer: int | None = None) -> torch.Tensor:
        layer = self.layer - 1 if layer is None else layer
        if value is None or value.shape[0] != B or (S is not None and value.shape[1] != S):
            got = None if value is None else tuple(value.shape)
            raise RuntimeError(
                f"flowkern.prune(rank={self.scorer.name!r}): {what} {layer} was not seen as expected (got {got} for "
                f"[B={B}, S={S}]; did it run through flowkern, or was the attention implementation changed inside "
                "the block?)"
            )
        return value

    def _prerope(self, real: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, S]``: the key mass of layer ``L-1`` with queries and keys before the rotary embedding."""
        from flowkern import ops
        from flowkern.hf import compat
        from flowkern.hf.attention import chosen_key_mass
        from flowkern.hf.session import Session

        B, S = real.shape
        x = self._need(self._attn_input, "the attention input of layer", B, S)
        module = Session.of(self.model).attention_modules[self.layer - 1]
        with torch.no_grad():
            q, k, scale = compat.project_qk(module, x)
            q, k = q.float(), k.float()
            kpm = None if bool(real.all()) else real.to(q.device)
            rows = None
            if self._rows is not None:
                rows = self._rows.to(q.device).gather(1, positions.to(q.device)) & real.to(q.device)
                chosen = torch.nonzero(rows.any(dim=0))
                q = q[:, :, int(chosen[0]) if chosen.numel() else S - 1:]  # the rows from the first chosen one on
            else:
                q = q[:, :, -1:]
            ids = torch.zeros(B, S, dtype=torch.int32, device=q.device)
            _, lse, _ = ops.segment_attention(q, k, k, ids, 1, causal=True, key_padding_mask=kpm, scale=scale)
            if rows is None:
                return ops.key_attention_mass(q, k, lse, causal=True, key_padding_mask=kpm, scale=scale)
            return chosen_key_mass(q, k, lse, rows, None, causal=True, key_padding_mask=kpm, scale=scale)

    def _grids(self, positions: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per sample, its image grids as long ``[rows, cols]`` row indices into the current rows (-1 = no token,
        or a token an earlier stage removed)."""
        from flowkern.hf.segments import IMAGE, USER

        assert self._ids is not None and self._image is not None and self._call is not None
        ids, image = self._ids, self._image
        segments = torch.where(image, IMAGE, USER)
        try:
            grids = self.adapter.image_grids(self.config, ids.cpu(), segments.cpu(), self._call.layout_inputs)
        except ValueError as exc:
            raise ValueError(f"flowkern.prune(rank={self.scorer.name!r}) needs the image grid layout: {exc}") from None
        B, S = positions.shape
        row_of = torch.full((B, ids.shape[1]), -1, dtype=torch.long)
        row_of.scatter_(1, positions.cpu(), torch.arange(S).expand(B, S))
        out = []
        for b, (views, row) in enumerate(zip(grids, image.cpu(), strict=True)):
            pos = torch.nonzero(row).flatten()  # prompt position of each image-token ordinal
            at = [torch.where(g.index >= 0, pos[g.index.clamp(min=0)], -1) if pos.numel() else g.index for g in views]
            out.append([torch.where(p >= 0, row_of[b, p.clamp(min=0)], -1) for p in at])
        return out
