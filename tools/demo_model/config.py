"""The demo model's architecture, training aids and recipe: :class:`TrainConfig` (the shipped recipe as defaults)
and the fixed tables the training reads (model sizes, task mix, guided layers and heads, read-out layers)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowkern import shapes as world

__all__ = ["VISION", "TEXT", "TASK_MIX", "SQA_BOOST", "CHAT_TEMPLATE", "ATTENTION_LAYERS", "ATTENTION_HEADS",
           "TEXT_ATTENTION_LAYERS", "GUIDES", "NAMES_GUIDES", "COMPARE_GUIDES", "POPE_TRAIN_SPLITS", "POSITION_DIMS",
           "POSITION_WEIGHT", "PLACE_WEIGHT", "PLACE_LAYER", "NAMES_PLACE_LAYER", "COMPARE_LAYER", "PRECISIONS",
           "TrainConfig", "check_task_mix", "check_init"]

VISION: dict[str, Any] = dict(image_size=192, patch_size=24, hidden_size=128, intermediate_size=512,
                              num_hidden_layers=4, num_attention_heads=4)
"""The CLIP vision tower: the shapes canvas at full resolution (192 x 192), 8 x 8 = 64 image tokens (the CLS token
is dropped, as in LLaVA-1.5)."""

TEXT: dict[str, Any] = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
                            num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
"""The Llama language model."""

TASK_MIX: dict[str, float] = {"pope": 0.19, "sqa": 0.56, "textvqa": 0.18, "caption": 0.07}
"""Share of each task analogue in the training stream (SQA's multi-hop problems need the most; POPE and the captions
are learnt fastest)."""

SQA_BOOST: tuple[str, float] = ("names", 0.3)
"""The default ``sqa_boost``: that share of the training SQA problems asks the "whose shape" kind (the hardest: three
hops, see :data:`NAMES_GUIDES`)."""

CHAT_TEMPLATE = (
    '{% set system = "' + world.SYSTEM_PROMPT + '" %}'
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'][0]['text'] %}{% endif %}"
    "{{ system }} "
    "{% for message in messages %}{% if message['role'] == 'user' %}USER : "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT : {{ message['content'][0]['text'] }} </s> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT :{% endif %}"
)
"""LLaVA-1.5's conversation layout (vicuna v1: system prompt, ``USER:``, image, question, ``ASSISTANT:``) spelled
with the word-level tokenizer's words; a ``system`` message replaces the default system prompt."""

ATTENTION_LAYERS: tuple[int, ...] = (1, 2, 3)
"""Decoder layers whose first :data:`ATTENTION_HEADS` heads are guided, during training only, to look at the image
patches an answer token is about (:func:`tools.demo_model.data.attention_targets`)."""

ATTENTION_HEADS = 2

TEXT_ATTENTION_LAYERS: tuple[int, ...] = (4, 5)
"""Decoder layers whose first :data:`ATTENTION_HEADS` heads are guided, during training only, from the position
that predicts an SQA answer letter to the tokens of the right option's line (``B. blue star``): the second hop
of a multiple-choice answer (which option names what the image shows), after the image hop of
:data:`ATTENTION_LAYERS`."""

GUIDES: dict[str, tuple[tuple[int, ...], tuple[int, int]]] = {
    "focus": (ATTENTION_LAYERS, (0, ATTENTION_HEADS)),
    "text": (TEXT_ATTENTION_LAYERS, (0, ATTENTION_HEADS)),
}
"""Every attention guide (training only): name -> (decoder layers, head range ``[first, last)``). ``focus``: an
answer token to the image patches it is about, and each ``<colour> <shape>`` mention of a prompt to that object (or
off the image when no object matches both); ``text``: the SQA letter to the right option's line."""

NAMES_GUIDES: dict[str, tuple[tuple[int, ...], tuple[int, int]]] = {
    "owner": ((1, 2), (2, 4)),
    "pick": ((3,), (2, 4)),
    "link": ((3,), (2, 4)),
}
"""The "whose shape" guides (:func:`tools.demo_model.data.names_targets`), on heads 2-3; with ``names_guides`` only.
``owner``: each ``<Name> drew the <colour> <shape>.`` sentence's shape word to its name; ``pick``: the position that
predicts the letter to the right name's shape word; ``link``: each option's name to its sentence's shape word."""

COMPARE_GUIDES: dict[str, tuple[tuple[int, ...], tuple[int, int]]] = {"read": ((6, 7), (0, 2))}
"""With ``names_compare``: ``read``, from the position that predicts the letter of a "whose shape" problem to the
second option's name, whose read-out (:data:`COMPARE_LAYER`) says whether it is the answer."""

POPE_TRAIN_SPLITS: tuple[str, ...] = ("random", "adversarial", "popular", "binding", "binding")
"""The POPE splits training draws from, uniformly: the three of the benchmark and ``binding``, whose negative
shares its colour with an object of the image (``red circle`` beside a red square)."""

POSITION_DIMS = 16
"""Channels of the image tokens' 2-D position code (:func:`tools.demo_model.losses.grid_positions`) with
``position_aids``: a small subspace (norm 2.8), so the code does not crowd out the patch content."""

POSITION_WEIGHT = 0.2
"""Weight of the patch-position term of the patch loss (:func:`tools.demo_model.losses.position_loss`)."""

PLACE_WEIGHT = 1.0
"""Weight of the *place* read-out: at each mention of an object of the image, a linear read-out of the shape
word's hidden state entering decoder layer :data:`PLACE_LAYER` must name the object's column and row (so the
text knows where what it names lies, for the relations and "whose shape" questions)."""

PLACE_LAYER = 3

NAMES_PLACE_LAYER = 5
"""With ``names_place``: the decoder layer whose input, at each option of a "whose shape" problem (``B. Anna``), must
name (through the same place read-out) the column and row of the object that person drew (the context's ``Anna
drew the red circle.``): the option carries where its object lies, as a shape option of a relation does."""

COMPARE_LAYER = 6
"""With ``names_compare``: the decoder layer whose input, at the second option of a "whose shape" problem, must say
(a linear two-way read-out) whether that person's object lies further to the side asked than the first option's:
the second option, which sees the question and the first option, makes the comparison, as a relation's option
checks itself against the object named in the question."""

PRECISIONS = ("bf16", "fp32")


def check_task_mix(task_mix: dict[str, float] | None) -> dict[str, float]:
    """The training stream's task shares: ``task_mix`` checked (None: :data:`TASK_MIX`).

    Raises:
        ValueError: a task not in :data:`TASK_MIX`, a negative share, or all shares zero.
    """
    mix = dict(TASK_MIX if task_mix is None else task_mix)
    if set(mix) - set(TASK_MIX) or not all(v >= 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"task_mix: shares of {sorted(TASK_MIX)}, none negative, not all zero; got {mix}")
    return mix


def check_init(init: str | Path | None) -> None:
    """Raises ``FileNotFoundError`` (``"init: ..."``) when ``init`` is a folder without a trained demo model."""
    if init is not None and not (Path(init) / "model.safetensors").is_file():
        raise FileNotFoundError(f"init: no model.safetensors in {init}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run of the demo model; the defaults are the shipped model's recipe (every aid on).

    Stage 1 (``vision_steps`` of ``vision_batch_size`` images, peak LR ``vision_lr``): the vision tower and
    projector alone, on the dense patch loss. Stage 2 (``steps`` of ``batch_size`` examples, peak LR ``lr``):
    everything, on the answer loss + ``aux_weight`` x the patch loss + ``attention_weight`` x the attention guides.
    Both stages warm up for ``warmup`` steps, then decay on a cosine to 5 % of the peak.

    ``seed``: the initial weights and the training stream. ``threads``: torch CPU threads of the full stage (the
    vision stage leaves each worker a core; the result depends on it). ``workers``: processes drawing the examples
    (0: the training process; the stream is the same). ``init``: a trained demo model's folder to start from instead
    of random weights (the stream starts again at example 0 unless ``seed`` differs). ``task_mix``: the task shares
    of the stream. ``precision``: ``bf16`` (bfloat16 autocast of the matmuls; weights, optimizer and losses in
    float32) or ``fp32``. ``sqa_boost``: ``(kind, share)``, that share of the SQA problems asks that kind (None:
    every kind as often as the files ask it). ``position_aids``: the 2-D position code of the image tokens (from
    random weights only) and the position and place read-outs. ``names_guides``: the "whose shape" guides
    :data:`NAMES_GUIDES`. ``names_place`` (needs ``position_aids``): the place read-out also at each "whose shape"
    option, in layer :data:`NAMES_PLACE_LAYER`. ``names_compare`` (needs ``position_aids``): the second option's
    verdict read-out (:data:`COMPARE_LAYER`) and the letter's ``read`` guide (:data:`COMPARE_GUIDES`).
    ``log_every``: steps between loss lines.

    Raises:
        ValueError: a field out of range, naming it.
    """

    seed: int = 0
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1.5e-3
    warmup: int = 60
    aux_weight: float = 0.5
    attention_weight: float = 0.5
    vision_steps: int = 1800
    vision_batch_size: int = 64
    vision_lr: float = 2e-3
    threads: int = 2
    workers: int = 1
    init: Path | None = None
    task_mix: dict[str, float] = field(default_factory=lambda: dict(TASK_MIX))
    precision: str = "bf16"
    sqa_boost: tuple[str, float] | None = SQA_BOOST
    position_aids: bool = True
    names_guides: bool = True
    names_place: bool = True
    names_compare: bool = True
    log_every: int = 25

    def __post_init__(self) -> None:
        if (self.names_place or self.names_compare) and not self.position_aids:
            raise ValueError("names_place and names_compare need position_aids (they extend their place read-out)")
        if self.threads < 1 or self.workers < 0:
            raise ValueError(f"threads must be >= 1 and workers >= 0, got threads={self.threads}, "
                             f"workers={self.workers}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name, least in (("steps", 0), ("vision_steps", 0), ("warmup", 0), ("batch_size", 1),
                            ("vision_batch_size", 1), ("log_every", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        object.__setattr__(self, "task_mix", check_task_mix(self.task_mix))
        if self.sqa_boost is not None:
            kind, share = self.sqa_boost
            if kind not in world.SQA_KINDS or not 0 <= share <= 1:
                raise ValueError(f"sqa_boost: (kind, share) with kind one of {', '.join(world.SQA_KINDS)} and share "
                                 f"in [0, 1], got {self.sqa_boost!r}")
            object.__setattr__(self, "sqa_boost", (kind, float(share)))
        if self.init is not None:
            object.__setattr__(self, "init", Path(self.init))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)
