"""``flowkern demo``: the paper's analysis end to end on the shipped shapes model, offline on a CPU, in one report.

.. code-block:: python

    from flowkern.demo.report import DemoConfig, run_demo

    result = run_demo(DemoConfig(out="runs/demo", quick=True))
    result.out / "report.html", result.records.headline.cliff

What one run does, on fresh shapes sets (:mod:`flowkern.shapes`, seed ``seed``) of the four task analogues
(shapes-POPE, -SQA, -TextVQA and captions scored by CHAIR), with the model loaded once:

1. **Attention** (paper Figure 2A/2B): a sample of questions per task answered greedily under
   :func:`flowkern.trace`; the answer's attention share of system / image / user / generated tokens per decoder
   layer, averaged over the questions (each question weighs the same), and the answer -> image attention maps of a
   few of them on their images.
2. **LLaVA-CAM** (Figures 3/4): :func:`flowkern.cam` of a few questions per task, every layer.
3. **Truncation** (Figure 5, Table 1): per task a :func:`flowkern.eval.sweep.run_sweep` over every layer with
   k = 0 (every image token dropped from layer L on), and one at ``keep`` image tokens ranked by attention with the
   random-rank control; the cliff layer (:func:`flowkern.eval.sweep.cliff_report`) and a Table-1 style table
   (baseline vs at the cliff layer).
4. **Pruning methods** (:mod:`~flowkern.demo.report.methods`): every built-in scorer at a few budgets on a small
   set per task, through ``flowkern compare``'s engine: the metric against the budget, the kept-token maps, and
   which method keeps the most and whether attention's kept tokens lean towards the image's last rows.
5. **Speed**: prefill time and decode tokens/s of the model pruned at each task's cliff layer vs unpruned (the
   model's own attention), batch 1 and 16, timed by :class:`flowkern.timer.ForwardTimer` round-robin, medians.
6. **In plain words**: :func:`flowkern.demo.report.words.conclusions` turns the numbers into sentences -- where
   they match the paper's claims and where they do not.

Everything is written through :class:`flowkern._io.AtomicDir`: ``out`` gets ``report.html`` (figures embedded as
data URIs, each also linked to its PNG), ``figures/*.png``, ``tables/*.csv|json``, ``summary.json`` and the sweep
folders ``sweeps/<task>[-keep<K>|-knockout|-methods]/`` (answer files per point) all at once, or not at all. The
shapes sets are drawn in a scratch folder and removed (``summary.json`` gives the ``flowkern shapes`` commands that
redraw them).

The tolerance of the cliff layer is, per task, the larger of 1 point and one question's worth of the metric
(``100 / n`` points for ``n`` questions), unless ``tolerance`` is given: with few questions a single changed
answer moves a metric by more than 1 point.

The modules, each a floor above the previous: :mod:`~flowkern.demo.report.config` (the options),
:mod:`~flowkern.demo.report.records` (the typed records of a run), :mod:`~flowkern.demo.report.words` (the sentences)
and :mod:`~flowkern.demo.report.tables` (the tables) from the records, :mod:`~flowkern.demo.report.stages` (the
measurements, producing the records), :mod:`~flowkern.demo.report.figures` and :mod:`~flowkern.demo.report.render`
(the PNGs and the HTML page), :mod:`~flowkern.demo.report.run` (:func:`run_demo`).
"""

from __future__ import annotations

from flowkern.demo.report.config import (
           FULL,
           QUICK,
           REPORT_FILE,
           SUMMARY_FILE,
           TASKS,
           DemoConfig,
           DemoSizes,
           DemoTask,
           check_config,
)
from flowkern.demo.report.records import DemoSummary
from flowkern.demo.report.run import DemoResult, run_demo
from flowkern.demo.report.stages import check_model, load, model_id_of

__all__ = ["DemoTask", "DemoSizes", "DemoConfig", "DemoResult", "DemoSummary", "TASKS", "FULL", "QUICK",
           "REPORT_FILE", "SUMMARY_FILE", "run_demo", "load", "check_config", "check_model", "model_id_of"]
