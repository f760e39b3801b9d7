"""A synthetic shapes world and its four benchmark analogues (:data:`ANALOGUES`), written in the official file formats.

Every scene is drawn from a seed (``random.Random(f"{seed}:{task}:{index}")``, so the same seed gives the same
files on every machine): 1-4 objects, each a distinct (colour, shape) pair of :data:`COLORS` x :data:`SHAPES`,
with varied sizes, positions and small rotations, on a plain or lightly textured background, optionally with a
1-2 character label (digits and capital letters without the look-alikes ``I`` / ``O``) in a white box. Objects never
overlap each other or the label. :class:`Scene` carries the full ground truth (pixel boxes, colours, label).

The writers lay the sets out exactly as the real benchmarks ship, so the :mod:`flowkern.eval` loaders read them
unchanged:

========== ============================================ ======================================================
task       files                                        question / reference
========== ============================================ ======================================================
pope       ``coco_pope_{random,popular,adversarial}``   "Is there a red circle in the image?" yes / no; one
           ``.json`` + ``images/``                      positive and one negative per image and split
sqa        ``problems.json``, ``pid_splits.json``,      relation ("Which shape is to the left of the blue
           ``images/test/<pid>/image.png``              square?"), count or colour, 2-4 options; a quarter
                                                        with a ``Context:`` the answer needs or that is true
textvqa    ``TextVQA_0.5.1_val.json`` +                 "What is written in the image?", the label x 10
           ``train_images/<image_id>.jpg``
caption    ``annotations/instances_val2014.json``,      "Please describe this image in detail."; 5 reference
           ``annotations/captions_val2014.json``,       captions, one instance per object; the 24 colour-shape
           ``annotations/chair_vocabulary.txt``,        pairs are the CHAIR object classes
           ``val2014/``
========== ============================================ ======================================================

POPE negatives follow POPE's three samplers: *random* (any absent colour-shape pair), *popular* (the absent pair
most frequent in the whole set's ground truth) and *adversarial* (an absent pair sharing the shape or the colour of
an object in the image, the near miss). Question ids are unique across the three POPE files.

Modules: :mod:`~flowkern.shapes.world` (scenes, ground truth, patch grids), :mod:`~flowkern.shapes.draw`
(rendering), :mod:`~flowkern.shapes.questions` (questions, answers, vocabulary), :mod:`~flowkern.shapes.writers`
(the benchmark files). Nothing here imports torch; drawing uses Pillow only.
"""

from __future__ import annotations

from flowkern.shapes.draw import jpeg_roundtrip, render
from flowkern.shapes.questions import (
    PEOPLE,
    RELATIONS,
    SQA_KINDS,
    caption_text,
    near_misses,
    pope_question_text,
    pope_questions,
    reference_captions,
    sqa_problem,
    textvqa_question,
    vocabulary,
)
from flowkern.shapes.world import (
    ALL_CLASSES,
    BACKGROUNDS,
    CANVAS,
    COLORS,
    LABEL_CHARS,
    NUMBER_WORDS,
    SHAPES,
    SYSTEM_PROMPT,
    Label,
    Scene,
    ShapeObject,
    centre_cell,
    label_patches,
    make_scene,
    object_class,
    object_patches,
    patch_targets,
    scenes,
)
from flowkern.shapes.writers import (
    ANALOGUES,
    chair_vocabulary,
    eval_command,
    write_caption,
    write_pope,
    write_sqa,
    write_task,
    write_textvqa,
)

__all__ = [
    "COLORS", "SHAPES", "LABEL_CHARS", "CANVAS", "ANALOGUES", "NUMBER_WORDS", "SYSTEM_PROMPT", "BACKGROUNDS",
    "ALL_CLASSES", "ShapeObject", "Label", "Scene", "object_class", "make_scene", "scenes", "render",
    "jpeg_roundtrip", "patch_targets", "centre_cell", "object_patches", "label_patches",
    "near_misses", "pope_questions", "pope_question_text", "sqa_problem", "SQA_KINDS", "RELATIONS", "PEOPLE",
    "textvqa_question", "caption_text", "reference_captions",
    "write_pope", "write_sqa", "write_textvqa", "write_caption", "write_task", "eval_command",
    "chair_vocabulary", "vocabulary",
]
