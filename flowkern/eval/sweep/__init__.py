"""The engine behind ``flowkern sweep``: a task scored unpruned (the baseline) and with image tokens removed from each
decoder layer L on, the information-flow cliff layer, resumable, bisecting, sharded under ``torchrun``.

.. code-block:: python

    from flowkern.eval.sweep import SweepConfig, run_sweep

    result = run_sweep(SweepConfig(model="llava-hf/llava-1.5-7b-hf", task="pope", data="pope/coco",
                                   images="pope/val2014", out="runs/pope", layers="all"))
    result.cliff["cliff_layer"], result.curve      # {L: F1 with the image dropped from layer L on}

**Points.** The baseline (no pruning, the model's own attention) and one point per layer ``L`` of ``layers``:
:func:`flowkern.prune` ``(layer=L, keep, rank, merge)`` (k = 0 by default: every image token dropped; ``rank`` any
registered scorer, :mod:`flowkern.scorers`). ``controls`` (scorer names, e.g. ``random``, ``grid``) add a series at
the same layers and ``keep`` with that rank: the control that tells a real ranking from "any k tokens would do"
(``random``) or from plain spatial downsampling (``grid``). A scorer that cannot rank before the decoder
(:attr:`flowkern.scorers.Scorer.before_decoder` False: it reads layer ``L-1``'s attention) has no point at layer 0
(:func:`~flowkern.eval.sweep.points.ranks_at`). A sweep varies its one pruning layer, so it takes no schedule
(``flowkern compare`` does). Each point is an
``flowkern eval`` output folder, ``<out>/points/<name>/`` (``baseline``, ``L05``, ``L05-attention``,
``L05-random``): ``answers.jsonl``, ``run.json``, ``metrics.json`` written by :mod:`flowkern.eval.run`'s machinery,
so ``flowkern score`` on a point's answer file reproduces the sweep's number, and ``flowkern eval`` with the same
settings resumes it.

**The cliff layer** (``cliff.json``, :func:`cliff_report`): the smallest evaluated ``L`` such that every evaluated
``L' >= L`` scores within ``tolerance`` points (default 1; metrics are ratios, 1 point = 0.01) of the baseline on the
task's main metric (:data:`MAIN_METRIC`: POPE F1, ScienceQA-IMG / TextVQA accuracy, CHAIR_S). Also reported: the
first layer from which dropping does not hurt at all (every ``L' >= L`` at least as good as the baseline), the
whole curve, and whether it is monotone enough for the definition to mean something: a curve is monotone within the
tolerance when no later layer is further from the baseline than an earlier one by more than the tolerance.

**Search.** ``search="full"`` evaluates every layer. ``search="bisect"`` evaluates the first and last layers, then
bisects on "within tolerance": O(log layers) points when the curve is monotone. As soon as the evaluated points
contradict monotonicity it says so and evaluates every remaining layer (the points the definition needs).

**Cheaper than independent points.** Answers go batch by batch over all the points that still need that batch. For
one batch, layers ``0 .. L-1`` compute the same thing at every point ``L`` (greedy decoding, same inputs, the same
``flowkern`` attention), so the point with the largest ``L`` runs first and :class:`flowkern.hf.reuse.PrefixShare`
records, at its prefill, each decoder layer's keys and values and the hidden states the other points resume from;
every other point then *skips* its layers below ``L`` at the prefill (their KV cache is filled with the recorded keys
and values) and computes only layers ``>= L`` on the pruned sequence. Decode steps run every layer as usual. The
images of a batch are encoded once for all its points (:class:`flowkern.hf.reuse.ImageCache`: the vision tower and
projector do not depend on the point), the processor's output is built once per batch, and the language model
stays on the ``flowkern`` attention across the pruned points of a batch instead of being switched there and back by
each ``flowkern.prune``. The answers are the ones an independent ``flowkern eval --prune-layer L`` gives (the test
suite checks they are identical). A scorer that reads layer ``L-1``'s attention (``attention``, ``text-attention``,
``prerope-attention``, ...) with ``keep > 0`` needs that layer computed, so those points resume from ``L-1``
(:meth:`~flowkern.eval.sweep.points.Point.depth`); one that reads the vision tower as it runs (``cls``) encodes its
images itself (:meth:`~flowkern.eval.sweep.points.Point.reads_tower`). What stays per batch: the baseline's full
prefill (the model's own attention, which the points do not use, so it shares nothing), the recording point's, and
``L = 0``'s (the image removed before the first decoder layer: it shares no layer, and all its layers run on the
shorter sequence).

**Resume and safety.** Answers are appended per (point, batch) and fsync-ed (a killed run loses at most the batch in
flight); a finished point's metrics are appended to ``results.jsonl``; a rerun skips what is done. ``sweep.json``
records the settings that change answers (:data:`SWEEP_SETTINGS`); a rerun under other ones is refused.

**torchrun.** Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1``), batches are dealt round-robin to the processes
(batch ``j`` to process ``j % N``: every batch holds the same questions as in a one-process run, so the answers are
the same), each process appends to its own shard folder ``<out>/.shards/rank<i>/``, and process 0 merges the shards
into the points' answer files (in question order) and writes every result. ``out`` must be on a filesystem all
processes see.

**Knockout.** The same engine runs ``flowkern knockout`` (:mod:`~flowkern.eval.sweep.knockout`): its points are
(edge, window) instead of (layer, keep) -- an attention edge cut (:func:`flowkern.knockout`) in a window of layers,
sharing the layers below the window -- with the same files, resume, settings check and torchrun sharding.

**Modules.** :mod:`~flowkern.eval.sweep.points` (options, points, layer specs), :mod:`~flowkern.eval.sweep.cliff`
(the cliff layer and its search: pure functions of the scores), :mod:`~flowkern.eval.sweep.engine` (answering
and scoring the points), :mod:`~flowkern.eval.sweep.files` (the folder's files), :mod:`~flowkern.eval.sweep.dist`
(torchrun processes). The reuse itself edits the model, so it lives in :mod:`flowkern.hf.reuse`.
"""

from flowkern.eval.sweep.cliff import cliff_report, search_cliff
from flowkern.eval.sweep.engine import run_sweep
from flowkern.eval.sweep.files import CLIFF_FILE, FIGURE_FILE, RESULTS_FILE, SUMMARY_FILE, SWEEP_FILE
from flowkern.eval.sweep.points import (
    MAIN_METRIC,
    SWEEP_SETTINGS,
    Point,
    SweepConfig,
    SweepResult,
    SweepUsageError,
    parse_layer_spec,
)

__all__ = [
    "SweepConfig",
    "SweepResult",
    "SweepUsageError",
    "Point",
    "run_sweep",
    "parse_layer_spec",
    "cliff_report",
    "search_cliff",
    "MAIN_METRIC",
    "SWEEP_SETTINGS",
    "RESULTS_FILE",
    "SUMMARY_FILE",
    "CLIFF_FILE",
    "FIGURE_FILE",
    "SWEEP_FILE",
]
