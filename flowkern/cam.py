"""``flowkern.cam``: LLaVA-CAM, a Grad-CAM over the image-token features of every decoder layer (paper §3.1).

.. code-block:: python

    inputs = processor(images=image, text=prompt, return_tensors="pt")
    result = flowkern.cam(model, inputs, processor=processor, samples=8, noise_std=0.1)
    result.heatmaps          # float32 [num_layers, gh, gw] in [0, 1] (one image; a list per image otherwise)
    result.raw               # the same, unnormalised: mean over noisy copies of ReLU(sum_k alpha_k A_k)
    result.answer_ids        # long [T]: the answer the target is built from

**Definition** (eq. 1-5). The prompt and the answer ``a_1..a_T`` run as one teacher-forced sequence; the target
is ``z = sum_t logit[p_t, a_t]`` where ``p_t`` is the position whose logits predict ``a_t`` (the last prompt
position for ``a_1``). ``A`` is the output of the chosen *site* of a decoder layer (default: its post-attention
norm, Figure 7) at the image-token positions, ``[K, D]`` for an image of ``K`` tokens. For each image separately,
``alpha = mean over the image's tokens of dz/dA`` (``[D]``) and ``heat = ReLU(A @ alpha)`` (``[K]``), laid out on
the model's image grid (:class:`flowkern.hf.segments.ImageGrid`, the same layouts as :func:`flowkern.trace`).
SmoothGrad: the heat is computed for ``samples`` copies of the image with Gaussian noise of std ``noise_std``
added in [0, 1] pixel space (before the processor's mean/std normalisation) and averaged (``raw``); ``heatmaps``
is ``raw`` divided by its maximum (per layer by default), optionally thresholded.

**How.** One forward and one backward per batch of noisy copies give every layer at once: a forward hook on each
layer's site keeps a reference to ``A`` (a tensor autograd saves anyway), and a tensor hook reduces the incoming
gradient to ``alpha`` and the heat ``[n, K]`` the moment it is computed, so no gradient is kept per layer and no
activation is kept longer than autograd keeps it. The run is a listener on the model's session
(:mod:`flowkern.hf.session`), which for its duration freezes the parameters (the graph starts at the input of the
first chosen layer), runs the language model's attention through a differentiable implementation (``sdpa``
unless it already is ``eager`` or ``sdpa``) and installs the hooks at the sites the family's adapter names; every
flag, hook and the attention implementation are restored afterwards, also on error. ``use_cache=False``.

**Pixel noise.** ``pixel_values`` are un-normalised with the processor's ``image_mean`` / ``image_std`` (pass
``processor=`` or ``pixel_mean=`` / ``pixel_std=``), noise is added, and they are normalised again. Layouts (the
adapter's ``pixel_layout``): ``[..., C, H, W]`` (LLaVA, LLaVA-NeXT, InternVL: channel at dim -3) or Qwen-VL's
flattened patches ``[N, C*T*P*P]`` (each row is ``(channel, temporal, patch, patch)``; one noise draw is shared by
the ``T`` temporal copies of a patch, so it is i.i.d. noise on the resized image), or Gemma 4's patches
``[N, patches, P*P*C]`` (channel last). For LLaVA-NeXT each processed
view (base image, crops) gets its own noise. Values are not clamped to [0, 1] by default (``clamp=True`` to
clamp): clamping would bias the noise near saturated pixels, and the paper's eq. 4 does not clamp. Video frames
(``pixel_values_videos``) get no noise. Noise is reproducible: copy ``i`` uses the ``i``-th draw of
``torch.randn(shape, generator=g)`` (float32, CPU) with ``g = torch.Generator().manual_seed(seed)``, whatever
``batch_size``.

One prompt per call (``input_ids`` ``[1, S]``); it may hold several images.

**The last layer's map is 0** at every site: after the last layer's attention, an image token's features only
reach the logits *at image positions*, never the answer logits, so ``dz/dA = 0`` there exactly.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from flowkern.gradcam import GradCamRecorder, PixelNoise, expand_copies, norm_stats, plan_images
from flowkern.listener import Listener, attached

if TYPE_CHECKING:
    from flowkern.hf.session import Session

__all__ = ["cam", "Cam", "CamView", "SITES"]

SITES: tuple[str, ...] = ("post_attention_layernorm", "attention", "layer")
"""Where ``A`` is read in each decoder layer: the post-attention norm's output (the paper's choice, Figure 7), the
attention block's output (after ``o_proj``, before the residual add), or the decoder layer's output (the module of
each site is the family adapter's: ``flowkern.hf.models.ModelAdapter.site_module``)."""


@dataclass
class CamView:
    """LLaVA-CAM of one view of one image.

    Attributes:
        image: index of the image within the prompt.
        name: the view (``"image"``, ``"base"`` / ``"crops"`` for LLaVA-NeXT, ``"frame{t}"``, ...).
        index: long ``[gh, gw]``: ordinal of each cell's token among the prompt's image tokens (-1: no token).
        raw: float32 ``[num_layers, gh, gw]``: mean over noisy copies of ``ReLU(sum_k alpha_k A_k)``.
        heatmap: float32 ``[num_layers, gh, gw]`` in [0, 1]: ``raw`` max-normalised (and thresholded).
        whole: this view shows the whole image (``"image"``, ``"base"``, InternVL's thumbnail tile).
    """

    image: int
    name: str
    index: torch.Tensor
    raw: torch.Tensor
    heatmap: torch.Tensor
    whole: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """``(gh, gw)``."""
        return int(self.index.shape[0]), int(self.index.shape[1])


@dataclass
class Cam:
    """Result of :func:`cam`.

    Attributes:
        layers: decoder layer of each map row, in order.
        site: where the features were read (one of :data:`SITES`).
        answer_ids: long ``[T]``: the answer tokens of the target.
        samples: number of noisy copies averaged.
        noise_std: std of the pixel noise in [0, 1] space.
        target: float32 ``[samples]``: the target ``z`` of each copy.
        token_raw: float32 ``[num_layers, K]``: ``raw`` per image token (prompt order; 0 for tokens in no view,
            e.g. LLaVA-NeXT's row-newline tokens).
        views: every view of every image.
    """

    layers: list[int]
    site: str
    answer_ids: torch.Tensor
    samples: int
    noise_std: float
    target: torch.Tensor
    token_raw: torch.Tensor
    views: list[CamView] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        """Images (and videos) in the prompt."""
        return len({v.image for v in self.views})

    def view(self, image: int = 0, view: int | str | None = None) -> CamView:
        """One view of one image: by position among the image's views, by name, or None for the view that shows
        the whole image (``CamView.whole``: ``"image"``, LLaVA-NeXT's ``"base"``, InternVL's thumbnail tile; else
        the first)."""
        views = [v for v in self.views if v.image == image]
        if not views:
            raise ValueError(f"no image {image}; the prompt has {self.num_images}")
        if view is None:
            return next((v for v in views if v.whole), views[0])
        if isinstance(view, str):
            match = [v for v in views if v.name == view]
            if not match:
                raise ValueError(f"image {image} has no view {view!r}; views: {[v.name for v in views]}")
            return match[0]
        return views[view]

    @property
    def heatmaps(self) -> torch.Tensor | list[torch.Tensor]:
        """float32 ``[num_layers, gh, gw]`` in [0, 1] of the view showing the whole image (:meth:`view` with
        ``view=None``; LLaVA-NeXT: ``"base"``); for a prompt with several images, a list of those, one per image."""
        maps = [self.view(i).heatmap for i in range(self.num_images)]
        return maps[0] if len(maps) == 1 else maps

    @property
    def raw(self) -> torch.Tensor | list[torch.Tensor]:
        """Like :attr:`heatmaps`, unnormalised (``CamView.raw``)."""
        maps = [self.view(i).raw for i in range(self.num_images)]
        return maps[0] if len(maps) == 1 else maps

    def peaks(self, image: int = 0, view: int | str | None = None) -> list[tuple[int, int, int, float]]:
        """Per layer, ``(layer, row, col, value)`` of the heatmap's maximum (first in raster order on ties; an
        all-zero map gives ``(layer, 0, 0, 0.0)``)."""
        v = self.view(image, view)
        out = []
        for i, layer in enumerate(self.layers):
            flat = int(torch.argmax(v.heatmap[i]))
            row, col = divmod(flat, v.shape[1])
            out.append((layer, row, col, float(v.heatmap[i, row, col])))
        return out

    def to_numpy(self) -> dict[str, Any]:
        """Arrays for ``numpy.savez``: ``layers``, ``answer_ids``, ``target``, ``token_raw`` and per view
        ``heatmap_{image}_{name}``, ``raw_{image}_{name}``, ``index_{image}_{name}``."""
        out: dict[str, Any] = {
            "layers": torch.tensor(self.layers).numpy(),
            "answer_ids": self.answer_ids.numpy(),
            "target": self.target.numpy(),
            "token_raw": self.token_raw.numpy(),
            "site": self.site,
            "samples": self.samples,
            "noise_std": self.noise_std,
        }
        for v in self.views:
            out[f"heatmap_{v.image}_{v.name}"] = v.heatmap.numpy()
            out[f"raw_{v.image}_{v.name}"] = v.raw.numpy()
            out[f"index_{v.image}_{v.name}"] = v.index.numpy()
        return out


# ----------------------------------------------------------------------------------------------------------
# the answer, the layers


def _generate_answer(model: torch.nn.Module, inputs: dict, max_new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].cpu()
    gen = getattr(model, "generation_config", None)
    stop = []
    for attr in ("eos_token_id", "pad_token_id"):
        value = getattr(gen, attr, None)
        stop += [value] if isinstance(value, int) else list(value or [])
    if stop:
        hits = torch.nonzero(torch.isin(new, torch.tensor(stop, dtype=new.dtype))).flatten()
        if hits.numel():
            new = new[: int(hits[0])]
    return new


def _index(value: Any) -> int | None:
    """``value`` as a Python int when it is one integer (int, numpy integer, 0-d integer tensor; not a bool)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_layers(layers: Sequence[int] | str | int | None, num_layers: int, live: int | None = None) -> list[int]:
    """The chosen layers as indices; ``live``: the layers from which on no prompt token's features reach the
    answer (Gemma 4: from the last layer before the KV-shared ones), None = all layers reach it."""
    live = num_layers if live is None else live
    if layers is None:
        return list(range(live))
    given = layers
    if isinstance(layers, str):  # "0,1" as on the command line
        try:
            layers = [int(part) for part in layers.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"layers {given!r}: expected decoder layers as a list of ints such as [0, 1], or a "
                             f"comma-separated string such as '0,1'") from None
    elif _index(layers) is not None:  # one layer: an int, numpy.int64, a 0-d integer tensor
        layers = [layers]
    out = []
    for layer in layers:
        index = _index(layer)
        if index is None:
            raise ValueError(f"layers {given!r}: {layer!r} is not a decoder layer index (an int)")
        if not -num_layers <= index < num_layers:
            raise ValueError(f"layer {layer} out of range for a language model of {num_layers} layers")
        out.append(index % num_layers)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"layers must be a non-empty list of distinct layers, got {list(layers)}")
    dead = sorted(i for i in out if i >= live)
    if dead:
        raise ValueError(
            f"layers {dead}: the KV-shared layers from {live + 1} on reuse the keys / values of earlier layers, so "
            f"the image tokens' features at layers >= {live} never reach the answer (zero gradient); choose layers "
            f"< {live}"
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# the entry point


@torch.inference_mode(False)  # callers may be inside torch.inference_mode(): autograd must work here
def cam(
    model: torch.nn.Module,
    inputs: Mapping[str, Any],
    answer_ids: torch.Tensor | Sequence[int] | None = None,
    *,
    layers: Sequence[int] | str | int | None = None,
    site: str = "post_attention_layernorm",
    samples: int = 8,
    noise_std: float = 0.1,
    seed: int = 0,
    batch_size: int = 4,
    processor: Any = None,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
    clamp: bool = False,
    normalize: Literal["layer", "global"] = "layer",
    threshold: float | None = None,
    max_new_tokens: int = 16,
    progress: bool = False,
) -> Cam:
    """LLaVA-CAM of every chosen decoder layer from one forward + backward per batch of noisy copies.

    Args:
        model: a supported Hugging Face VLM (``flowkern.hf.models.supported_model_types()``).
        inputs: processor outputs for ONE prompt: ``input_ids`` ``[1, S]`` with image placeholder tokens,
            ``pixel_values``, and what the model needs (``attention_mask``, ``image_sizes``, ``image_grid_thw``...).
        answer_ids: the answer tokens ``[T]`` (or ``[1, T]``) the target sums the logits of; None generates the
            answer greedily first (``max_new_tokens``, cut at the first end-of-sequence / padding token).
        layers: decoder layers (negative counts from the end), also as one int or a string ``"0,1"``; None = all, in
            order (Gemma 4: all before the last layer ahead of the KV-shared ones, whose image features never reach
            the answer; choosing those raises).
        site: where ``A`` is read, one of :data:`SITES`.
        samples: noisy copies averaged (SmoothGrad ``N``); with ``noise_std=0`` use 1.
        noise_std: std ``sigma`` of the Gaussian noise added in [0, 1] pixel space; 0 = plain Grad-CAM.
        seed: seed of the noise generator.
        batch_size: copies per forward/backward (memory grows linearly with it).
        processor: the model's processor (or image processor): its ``image_mean`` / ``image_std`` undo the
            normalisation; needed when ``noise_std > 0`` unless ``pixel_mean`` / ``pixel_std`` are given.
        pixel_mean, pixel_std: per-channel normalisation constants, instead of ``processor``.
        clamp: clamp the noisy image to [0, 1] before re-normalising (default off: unbiased noise, as eq. 4).
        normalize: ``"layer"`` divides each layer's map by its own maximum (the paper's figures); ``"global"`` by
            the maximum over all layers of the view, so that layers can be compared.
        threshold: values of the normalised map below it become 0 (the paper's demo used 0.5); None = off.
        max_new_tokens: answer length limit when generating.
        progress: show a tqdm bar over the batches.

    Returns:
        a :class:`Cam`; ``.heatmaps`` float32 ``[num_layers, gh, gw]`` in [0, 1] (a list per image for several
        images), ``.raw`` the unnormalised maps, ``.views`` every view (LLaVA-NeXT: ``"base"`` and ``"crops"``).

    Raises:
        ValueError: unknown site, no image tokens, more than one prompt, bad sample / noise / layer arguments,
            noise without normalisation constants, an empty answer, or an unsupported model family.
    """
    from flowkern.hf import compat
    from flowkern.hf.models import get_adapter

    _check_settings(site, samples, batch_size, max_new_tokens, noise_std, normalize, threshold)
    adapter = get_adapter(model)
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("inputs must be a mapping with input_ids of shape [1, S]")
    if ids.shape[0] != 1:
        raise ValueError(f"flowkern.cam takes one prompt (input_ids [1, S]), got batch {ids.shape[0]}")
    inputs = dict(inputs)
    plan = plan_images(adapter, model.config, ids, inputs)
    stats = norm_stats(processor, pixel_mean, pixel_std)
    pixel_values = inputs.get("pixel_values")
    if noise_std > 0 and stats is None:
        raise ValueError(
            "noise_std > 0 needs the processor's normalisation: pass processor=..., or pixel_mean= and pixel_std=, "
            "or noise_std=0 for plain Grad-CAM"
        )
    if noise_std > 0 and not isinstance(pixel_values, torch.Tensor):
        raise ValueError("noise_std > 0 needs inputs['pixel_values']")
    text_config = adapter.text_config(model.config)
    shared = compat.kv_shared_layers(text_config)
    layers = _check_layers(layers, int(text_config.num_hidden_layers), shared[0] - 1 if shared else None)
    answer = _answer(model, inputs, answer_ids, max_new_tokens)
    noise = None
    if noise_std > 0:
        noise = PixelNoise(pixel_values, stats, adapter.pixel_layout, adapter.temporal_patch_size(model.config),
                            noise_std, clamp, seed)

    device = ids.device
    recorder = GradCamRecorder(layers, plan.positions.to(device), plan.owner.to(device), plan.weights.to(device))
    targets = _smoothgrad(model, _CamRun(layers, site, recorder), inputs, answer, noise, int(samples),
                          int(batch_size), progress)
    token_raw = (recorder.total / int(samples)).cpu()  # [L, K]
    return Cam(
        layers=layers, site=site, answer_ids=answer, samples=int(samples), noise_std=float(noise_std),
        target=torch.cat(targets), token_raw=token_raw, views=_views(plan.grids, token_raw, normalize, threshold),
    )


def _check_settings(site: str, samples: int, batch_size: int, max_new_tokens: int, noise_std: float,
                    normalize: str, threshold: float | None) -> None:
    """:func:`cam`'s settings that need no model; ValueError naming the first bad one."""
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    for name, value in (("samples", samples), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real) or not 0 <= noise_std < math.inf:
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    if normalize not in ("layer", "global"):
        raise ValueError(f"normalize must be 'layer' or 'global', got {normalize!r}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1] or None, got {threshold}")


def _views(grids: list, token_raw: torch.Tensor, normalize: str, threshold: float | None) -> list[CamView]:
    """Per image view, ``token_raw`` float32 ``[L, K]`` laid out on its grid ``[L, gh, gw]`` (0 where no token)
    and normalised."""
    views = []
    for g in grids:
        cells = g.index.flatten()
        raw = torch.where(cells >= 0, token_raw[:, cells.clamp(min=0)], 0.0).view(token_raw.shape[0], *g.shape)
        views.append(CamView(g.image, g.name, g.index.clone(), raw, _normalise(raw, normalize, threshold), g.whole))
    return views


def _answer(model: torch.nn.Module, inputs: dict, answer_ids: Any, max_new_tokens: int) -> torch.Tensor:
    """The answer tokens long ``[T]`` (generated greedily when ``answer_ids`` is None), checked."""
    if answer_ids is None:
        answer = _generate_answer(model, inputs, max_new_tokens)
    else:
        answer = torch.as_tensor(answer_ids).reshape(-1)
        if answer.numel() and (answer.is_floating_point() or answer.is_complex()):
            raise ValueError(f"answer_ids must be integer token ids, got dtype {answer.dtype}")
        answer = answer.long().cpu()
        head = model.get_output_embeddings()
        vocab = int(head.weight.shape[0]) if head is not None else None
        bad = answer[(answer < 0) | (answer >= vocab)] if vocab is not None else answer[answer < 0]
        if bad.numel():
            raise ValueError(f"answer_ids {bad[:5].tolist()} are outside the vocabulary [0, {vocab})")
    if answer.numel() == 0:
        raise ValueError("the answer is empty (the model generated only an end-of-sequence token?)")
    return answer


class _CamRun(Listener):
    """LLaVA-CAM's listener: differentiable attention and frozen parameters for the run, and the recorder's hooks
    (the leaf at the first chosen layer's input, the site of every chosen layer)."""

    owner = "flowkern.cam"
    attention = "differentiable"
    freezes_parameters = True

    def __init__(self, layers: list[int], site: str, recorder: GradCamRecorder) -> None:
        self.layers, self.site, self.recorder = layers, site, recorder

    def install(self, session: Session, handles: list[Any]) -> None:
        from flowkern.hf.sites import hook_layer_sites

        hook_layer_sites(session, self.layers, self.site, self.recorder.start, self.recorder.site, handles,
                         owner=self.owner)


def _smoothgrad(model: torch.nn.Module, run: _CamRun, inputs: dict, answer: torch.Tensor, noise: PixelNoise | None,
                samples: int, batch_size: int, progress: bool) -> list[torch.Tensor]:
    """The SmoothGrad loop: one teacher-forced forward + backward per batch of noisy copies, inside ``run``'s
    session; the recorder accumulates the heat. Returns the target ``z`` of each copy, per batch."""
    from flowkern.hf import compat

    recorder = run.recorder
    keep = compat.accepts_logits_to_keep(model)
    T = answer.numel()
    answer_dev = answer.to(inputs["input_ids"].device)
    targets = []
    bar = None
    try:
        with attached(model, run):
            starts = list(range(0, samples, batch_size))
            if progress:
                from tqdm.auto import tqdm

                starts = bar = tqdm(starts, desc="flowkern cam", unit="batch")
            for start in starts:
                n = min(batch_size, samples - start)
                with torch.enable_grad():
                    pv = torch.cat([noise.next() for _ in range(n)]) if noise is not None else None
                    batch = expand_copies(inputs, n, answer, pv)
                    extra = {"logits_to_keep": T + 1} if keep else {}
                    logits = model(**batch, use_cache=False, **extra).logits
                    rows = logits[:, -(T + 1) : -1].float()  # row t predicts answer token t
                    z = rows.gather(-1, answer_dev.expand(n, T)[..., None]).squeeze(-1).sum(dim=-1)  # [n]
                    torch.autograd.grad(z.sum(), recorder.leaf)
                targets.append(z.detach().cpu())
                recorder.leaf = None
                del logits, rows, z, batch, pv
                missing = set(run.layers) - recorder.seen
                if missing:
                    raise RuntimeError(f"flowkern.cam: no gradient reached layers {sorted(missing)}")
                recorder.seen.clear()
    finally:
        if bar is not None:
            bar.close()  # also when interrupted: the caller's message starts on a line of its own
        recorder.leaf = None
        recorder.feats.clear()
    return targets


def _normalise(raw: torch.Tensor, mode: str, threshold: float | None) -> torch.Tensor:
    """Max-normalise ``[L, gh, gw]`` per layer or globally; an all-zero map stays 0."""
    peak = raw.flatten(1).amax(dim=1)[:, None, None] if mode == "layer" else raw.amax().expand(raw.shape[0], 1, 1)
    out = torch.where(peak > 0, raw / peak.clamp(min=torch.finfo(raw.dtype).tiny), 0.0)
    if threshold is not None:
        out = torch.where(out < threshold, 0.0, out)
    return out
