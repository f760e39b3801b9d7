"""The plain-words section of ``flowkern demo``'s report, computed from the run's numbers.

Nothing here is written in advance: every sentence is chosen by a comparison of measured values (a weak checkpoint
gets "the image does not matter here"), and each conclusion carries its verdict:

- ``"matches"`` / ``"partly"`` / ``"does not match"``: a claim of the paper that this run can test;
- ``"cannot tell"``: a claim this run cannot test (e.g. the model does not use the image for that task);
- ``"note"``: a fact about the run (model quality, resolution, speed).

The paper's claims tested (*From Redundancy to Relevance*, §4-5):

1. **Image information converges in shallow layers**: past the cliff layer the image tokens are no longer needed
   (truncation), and the answer's attention to the image falls after the shallow layers (attention).
2. **Complex reasoning cliffs earlier**: the reasoning task (ScienceQA; here shapes-SQA) has an earlier cliff than
   the perception tasks (POPE, TextVQA) -- the paper finds layer 12 vs 18 / 24 on LLaVA-1.5-7B.
3. **Truncating at the cliff layer does not hurt** (Table 1: equal or slightly better scores).

Input: the run's :class:`flowkern.demo.report.records.DemoSummary` (its tasks, model, settings and speed rows).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from flowkern.demo.report import flow
from flowkern.demo.report.records import Conclusion, DemoSummary, Headline, SpeedRow, TaskResult

__all__ = ["conclusions", "flow_claims", "guided_text", "headline", "image_use", "standard_error_points", "VERDICTS",
           "IMAGE_USE", "SHALLOW_FRACTION", "FALL_FRACTION"]

VERDICTS = ("matches", "partly", "does not match", "cannot tell", "note")

IMAGE_USE = ("clear", "weak", "none", "hurts")
"""How much a task's answers depend on the image (:func:`image_use`)."""

SHALLOW_FRACTION = 0.5
"""A cliff layer ``L`` counts as shallow when ``L < SHALLOW_FRACTION * num_layers`` (the first half)."""

FALL_FRACTION = 0.25
"""The image share *falls* with depth when the deeper half's mean is below the shallower half's by more than this
fraction of it."""

_PERCEPTION = ("pope", "textvqa")
_REASONING = "sqa"


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f} %"


def _points(x: float) -> str:
    return f"{x:.3g} point" + ("" if f"{x:.3g}" == "1" else "s")


def _layer(x: int | None) -> str:
    return "none" if x is None else f"L = {x}"


def _names(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def standard_error_points(value: float, n: int) -> float:
    """The binomial standard error of a ratio metric measured on ``n`` questions, in points:
    ``100 * sqrt(p (1 - p) / n)`` (an approximation for F1, soft accuracy and CHAIR)."""
    p = min(1.0, max(0.0, float(value)))
    return 100.0 * math.sqrt(p * (1.0 - p) / max(1, int(n)))


def image_use(effect_points: float | None, tolerance: float, se_points: float) -> str:
    """Whether removing the image from layer 0 on changes a task's score, and how clearly.

    Args:
        effect_points: baseline minus the no-image score, in points, signed so that > 0 means the image helps.
        tolerance: the cliff tolerance in points.
        se_points: the baseline's standard error in points (:func:`standard_error_points`).

    Returns:
        ``"none"`` (within the tolerance), ``"weak"`` (beyond the tolerance but within two standard errors: not
        shown by this sample), ``"clear"`` (the image helps by more than both) or ``"hurts"`` (the score is clearly
        better without the image).
    """
    if effect_points is None or abs(effect_points) <= tolerance + 1e-9:
        return "none"
    if abs(effect_points) <= 2.0 * se_points:
        return "weak"
    return "clear" if effect_points > 0 else "hurts"


def _verb(items: Sequence[Any], singular: str, plural: str) -> str:
    return singular if len(items) == 1 else plural


def _said(verdict: str, topic: str, text: str) -> Conclusion:
    assert verdict in VERDICTS, verdict
    return Conclusion(topic=topic, verdict=verdict, text=text)


def headline(summary: DemoSummary) -> Headline:
    """The numbers for a README: per task label the cliff layer, :func:`image_use`, baseline and metric, and the
    speed row at the largest timed batch."""
    tasks = summary.tasks.values()
    speed: dict[str, SpeedRow] = {}
    for r in summary.speed:
        if r.task not in speed or r.batch >= speed[r.task].batch:
            speed[r.task] = r
    return Headline(cliff={s.label: s.cliff_layer for s in tasks}, image_use={s.label: s.image_use for s in tasks},
                    baseline={s.label: s.baseline for s in tasks}, metric={s.label: s.metric for s in tasks},
                    speed=speed)


def _quality(s: TaskResult) -> str:
    """One task's baseline in words: the score, chance, a degenerate answer pattern."""
    m = s.baseline_metrics
    parts = [f"{s.label}: {s.metric} {_pct(s.baseline)}"]
    if s.loader == "pope":
        yes = m.get("yes_ratio")
        parts[0] += f" (accuracy {_pct(m.get('accuracy'))}, answers yes {_pct(yes)} of the time)"
        if yes is not None and yes <= 0.02:
            parts.append("it answers \u201cNo\u201d to (almost) every question, so accuracy sits at the 50 % of the "
                         "balanced labels and F1 at 0")
        elif yes is not None and yes >= 0.98:
            parts.append("it answers \u201cYes\u201d to (almost) every question")
    elif s.chance is not None:
        se = math.sqrt(s.chance * (1 - s.chance) / max(1, s.n))
        near = abs(s.baseline - s.chance) <= 2 * se
        parts[0] += f" (guessing: {_pct(s.chance)})"
        if near:
            parts.append("that is within two standard errors of guessing")
    if s.loader == "chair":
        parts[0] += f", CHAIR_I {_pct(m.get('chair_i'))}, recall of the objects {_pct(m.get('recall'))}"
    return "; ".join(parts)


def _image_effect(s: TaskResult) -> str:
    eff = s.image_effect_points
    if eff is None:
        return f"{s.label}: layer 0 was not evaluated"
    without = f"without the image (dropped from layer 0 on) {_pct(s.no_image)}"
    use = s.image_use
    if use == "none":
        return (f"{s.label}: {without}, within the tolerance of {_points(s.tolerance)} of the baseline: "
                "the image does not matter for this task on this model, so its truncation curve is flat and its "
                "cliff layer says nothing about information flow")
    if use == "weak":
        return (f"{s.label}: {without}, {eff:+.1f} points from the baseline: beyond the tolerance but within two "
                f"standard errors of this sample (2 x {s.se_points:.1f} points), so this run does not show that "
                "the answers use the image; its curve is read as noise below")
    if use == "clear":
        return f"{s.label}: {without}, {eff:.1f} points worse: the answers use the image"
    return (f"{s.label}: {without}, {-eff:.1f} points *better* than with it: the image hurts this task on this "
            "model")


def _halves(values: Sequence[float]) -> tuple[float, float]:
    """Means of the first ``n // 2`` layers and of the rest (the same twice for a single layer)."""
    k = max(1, len(values) // 2)
    first = statistics.fmean(values[:k])
    return first, statistics.fmean(values[k:]) if len(values) > k else first


def conclusions(summary: DemoSummary) -> list[Conclusion]:
    """What this run shows, in sentences, each with a verdict (see the module docstring).

    Args:
        summary: the run's records; read are the tasks, ``model.num_layers`` and ``model.image_tokens``,
            ``settings.keep`` and ``settings.tolerance_rule``, the speed rows and the speed note.

    Returns:
        the :class:`flowkern.demo.report.records.Conclusion` sentences in report order.
    """
    tasks = {s.loader: s for s in summary.tasks.values()}
    num_layers = int(summary.model.num_layers)
    using = [s for s in tasks.values() if s.image_use == "clear"]
    out = _model_notes(tasks, summary.settings.tolerance_rule)
    out.append(_claim_shallow(using, num_layers))
    out.append(_claim_attention(tasks, using, num_layers))
    out.append(_claim_reasoning(tasks, using, num_layers))
    out.append(_claim_table1(using))
    out.append(_top_k(using, summary.settings.keep))
    out += flow_claims(summary)
    if summary.speed:
        out.append(_speed(summary))
    return out


def _model_notes(tasks: dict[str, TaskResult], tolerance_rule: str) -> list[Conclusion]:
    """The model's quality, whether the image matters, and the resolution of the sample sizes."""
    out = [_said("note", "the model", "How good the model is here. " + ". ".join(
        _quality(s) for s in tasks.values()) + "."),
        _said("note", "does the image matter", "Dropping the image from the first layer on. " + ". ".join(
            _image_effect(s) for s in tasks.values()) + ".")]
    ns = sorted({s.n for s in tasks.values()})
    sizes = ", ".join(f"{s.label} {s.n}" for s in tasks.values())
    tols = _names(sorted({f"{s.tolerance:.3g}" for s in tasks.values()}, key=float))
    se = ", ".join(f"{s.label} {s.se_points:.1f}" for s in tasks.values())
    out.append(_said("note", "resolution", (
        f"Sample sizes: {sizes} questions. One changed answer moves an accuracy by {100 / ns[-1]:.2g} to "
        f"{100 / ns[0]:.2g} points; the cliff tolerance is {tols} point(s) ({tolerance_rule}). Whether a task uses "
        "the image at all also needs the no-image score to differ by more than two binomial standard errors of the "
        f"baseline ({se}).")))
    return out


def _claim_shallow(using: list[TaskResult], num_layers: int) -> Conclusion:
    """Claim 1: image information converges in shallow layers (truncation)."""
    shallow = SHALLOW_FRACTION * num_layers
    topic = "claim: image information converges in shallow layers (truncation)"
    if not using:
        return _said("cannot tell", topic, (
            "This run cannot test it: for no task does removing the image clearly make the answers worse (by more "
            "than the tolerance and two standard errors), so there is no information flow from the image to "
            "measure. A cliff at layer 0 here means \u201cthe image is never needed\u201d, not \u201cit is "
            "absorbed early\u201d."))
    early = [s for s in using if s.cliff_layer is not None and s.cliff_layer < shallow]
    late = [s for s in using if s.cliff_layer is not None and s.cliff_layer >= shallow]
    never = [s for s in using if s.cliff_layer is None]
    parts = []
    if early:
        parts.append(f"{_names([s.label for s in early])} {_verb(early, 'stops', 'stop')} needing the image "
                     f"early: from "
                     f"{_names([_layer(s.cliff_layer) for s in early])} on (of {num_layers} layers) dropping "
                     "it changes the score by at most the tolerance")
    if late:
        parts.append(f"{_names([s.label for s in late])} {_verb(late, 'needs', 'need')} it until "
                     f"{_names([_layer(s.cliff_layer) for s in late])}, in the deeper half")
    if never:
        parts.append(f"{_names([s.label for s in never])} never {_verb(never, 'converges', 'converge')}: "
                     "even dropping the image only at the last layer moves the score by more than the tolerance")
    verdict = "matches" if len(early) == len(using) else ("partly" if early else "does not match")
    shaky = [s.label for s in using if not s.monotone]
    tail = (f" The {_verb(shaky, 'curve', 'curves')} of {_names(shaky)} {_verb(shaky, 'is', 'are')} not "
            "monotone within the tolerance, so the cliff is approximate." if shaky else "")
    return _said(verdict, topic, "; ".join(parts) + "." + tail)


def _claim_attention(tasks: dict[str, TaskResult], using: list[TaskResult], num_layers: int) -> Conclusion:
    """Claim 1 bis: the answer's attention to the image falls after the shallow layers."""
    topic = "claim: the answer's attention to the image fades after the shallow layers (attention)"
    falls, flat = [], []
    for s in tasks.values():
        first, second = _halves(s.image_share)
        (falls if second < (1 - FALL_FRACTION) * first else flat).append((s, first, second))
    desc = "; ".join(f"{s.label} {_pct(a)} in layers 0-{num_layers // 2 - 1} vs {_pct(b)} in layers "
                     f"{num_layers // 2}-{num_layers - 1}" for s, a, b in falls + flat)
    peak = {s.label: max(range(len(s.image_share)), key=lambda i, s=s: s.image_share[i]) for s in tasks.values()}
    verdict = "matches" if not flat else ("partly" if falls else "does not match")
    text = f"Mean image share of the answer's attention: {desc}. It peaks at layer " + _names(
        [f"{v} ({k})" for k, v in peak.items()]) + "."
    if flat:
        text += (f" For {_names([s.label for s, _, _ in flat])} it does not fall with depth (by less than "
                 f"{FALL_FRACTION:.0%} of the shallow half's share).")
    if not using:
        text += " (Attention to the image is not use of it: this model attends to the image without its answers "\
                "depending on it.)"
    return _said(verdict, topic, text)


def _claim_reasoning(tasks: dict[str, TaskResult], using: list[TaskResult], num_layers: int) -> Conclusion:
    """Claim 2: complex reasoning (SQA) cliffs earlier than perception (POPE, TextVQA)."""
    topic = "claim: complex reasoning (SQA) cliffs earlier than perception (POPE, TextVQA)"
    sqa = tasks.get(_REASONING)
    others = [tasks[k] for k in _PERCEPTION if k in tasks and tasks[k] in using]
    if sqa is None or sqa not in using:
        return _said("cannot tell", topic, (
            f"Not testable here: this run does not show that {sqa.label if sqa else 'SQA'} uses the image on "
            "this model, so its cliff layer is not a point where image information stops flowing."))
    if not others:
        return _said("cannot tell", topic, (
            "Not testable here: this run does not show that either perception task uses the image on this model, "
            "so there is nothing to compare the reasoning task's cliff with."))

    def key(s: TaskResult) -> float:
        return num_layers if s.cliff_layer is None else s.cliff_layer

    earlier = [s for s in others if key(sqa) < key(s)]
    same = [s for s in others if key(sqa) == key(s)]
    cmp = "; ".join(f"{s.label} {_layer(s.cliff_layer)}" for s in others)
    text = f"{sqa.label} cliffs at {_layer(sqa.cliff_layer)}; {cmp}."
    if len(earlier) == len(others):
        return _said("matches", topic, text + " The reasoning task stops needing the image first, as in the paper.")
    if earlier:
        return _said("partly", topic, text + " Earlier than some perception tasks, not all.")
    if same and len(same) == len(others):
        return _said("does not match", topic, text + " Same cliff: no difference between the task types here.")
    return _said("does not match", topic, text + " The reasoning task needs the image as long or longer.")


def _claim_table1(using: list[TaskResult]) -> Conclusion:
    """Claim 3: truncating at the cliff layer keeps the score (Table 1)."""
    topic = "claim: truncating at the cliff layer keeps the score (Table 1)"
    cliffs = [s for s in using if s.cliff_layer is not None and s.at_cliff is not None]
    if not cliffs:
        return _said("cannot tell", topic, "No task that uses the image has a cliff layer in this run.")
    deltas = []
    better = 0
    for s in cliffs:
        sign = 1 if s.higher_is_better else -1
        d = sign * (s.at_cliff - s.baseline) * 100
        better += d >= 0
        deltas.append(f"{s.label} {d:+.1f} points at {_layer(s.cliff_layer)}")
    verdict = "matches" if better == len(cliffs) else "partly"
    return _said(verdict, topic, (
        f"Within the tolerance by the cliff's definition; how it compares with the baseline: {'; '.join(deltas)} "
        f"(+ = better). The paper's Table 1 sees equal or slightly better scores at the cliff; here "
        f"{better} of {len(cliffs)} tasks score at least the baseline."))


def _top_k(using: list[TaskResult], keep: int) -> Conclusion:
    """Keeping ``keep`` image tokens: chosen by attention vs at random."""
    topic = f"keeping {keep} image tokens: chosen by attention vs at random"
    rows = []
    for s in using:
        sign = 1 if s.higher_is_better else -1
        common = [k for k in s.attention_k if k in s.random_k]
        if not common:
            continue
        gap = statistics.fmean(sign * (s.attention_k[k] - s.random_k[k]) * 100 for k in common)
        rows.append((s, gap))
    if not rows:
        return _said("note", topic, "Not informative here: no task clearly uses the image, so no choice of "
                                    "image tokens can matter.")
    wins = [s.label for s, g in rows if g > s.tolerance]
    text = "Mean over the layers of (attention-ranked - random), + = attention keeps more: " + "; ".join(
        f"{s.label} {g:+.1f} points" for s, g in rows) + "."
    text += (f" The attention ranking beats random for {_names(wins)}." if wins else
             " The attention ranking is no better than random by more than the tolerance: any "
             f"{keep} tokens do about as well.")
    return _said("note", topic, text)


def _speed(summary: DemoSummary) -> Conclusion:
    """The speed-up at the largest timed batch, pruned at the cliff layer."""
    speed = summary.speed
    top = max(r.batch for r in speed)
    big = [r for r in speed if r.batch == top]
    pre = [r.prefill_speedup for r in big if r.prefill_speedup]
    dec = [r.decode_speedup for r in big if r.decode_speedup]
    text = (f"At batch {top}, pruning every image token from the cliff layer on made the prefill "
            + "; ".join(f"{r.prefill_speedup:.2f}x ({r.task}, {_layer(r.layer)})" for r in big)
            + " as fast and decoding " + "; ".join(f"{r.decode_speedup:.2f}x" for r in big) + ".")
    if pre and max(pre) < 1.05:
        text += " No real gain at this size: the image is only part of a short prompt."
    if summary.speed_note:
        note = summary.speed_note
        text += f" ({note[:1].upper()}{note[1:]}.)"
    text += (f" With {summary.model.image_tokens} image tokens in a ~"
             f"{big[0].prompt_tokens}-token prompt the saving is bounded by the image's share of the "
             "sequence; on LLaVA-1.5, whose image is most of its prompt, it is much larger.")
    if dec and min(dec) < 1.0:
        text += " Decoding slower than unpruned means the saving is below the measurement noise of this run."
    return _said("note", "speed at the cliff layer", text)


# ----------------------------------------------------------------------------------------------------------
# the causal-flow section: the logit lens, the guided heads, the segment flow


def flow_claims(summary: DemoSummary) -> list[Conclusion]:
    """The flow section's sentences: where the answer becomes decodable (logit lens), whether the attention finding
    holds without the heads the model's training guided, and where the image's attention goes (segment flow).
    Empty when the run measured no flow."""
    tasks = [s for s in summary.tasks.values() if s.flow is not None]
    if not tasks:
        return []
    return [_decodable(tasks), _unguided(summary, tasks), _image_flow(tasks, int(summary.model.num_layers))]


def _decodable(tasks: list[TaskResult]) -> Conclusion:
    parts, before, after = [], [], []
    for s in tasks:
        f, d = s.flow, s.flow.decodable_layer
        where = "never" if d is None else f"from layer {d} ({_pct(f.answer_prob[d], 0)} there"
        parts.append(f"{s.label} {where}" + ("" if d is None else f", {_pct(f.answer_prob[-1], 0)} at the last "
                                                                    f"layer; cliff {_layer(s.cliff_layer)})"))
        if d is not None and s.cliff_layer is not None:
            (after if d >= s.cliff_layer else before).append(s.label)
    text = (f"The logit lens at the last prompt position gives the model's own first answer token as its top word "
            f"for at least {flow.DECODABLE:.0%} of the questions: " + "; ".join(parts) + ".")
    if after:
        text += (f" For {_names(after)} the answer becomes decodable at or after the cliff layer: by the time the "
                 "answer is formed the image tokens are no longer needed.")
    if before:
        text += (f" For {_names(before)} it is decodable before the cliff layer: the answer is formed while "
                 "removing the image still changes the score.")
    return _said("note", "when the answer becomes decodable (logit lens)", text)


def guided_text(pairs: Sequence[Sequence[int]]) -> str:
    """``[[layer, head], ...]`` in words, layers with the same heads grouped: ``"heads 0-1 of layers 4-7"``."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in pairs:
        by_layer.setdefault(int(layer), []).append(int(head))
    runs: list[tuple[list[int], tuple[int, ...]]] = []
    for layer in sorted(by_layer):
        heads = tuple(sorted(by_layer[layer]))
        if runs and runs[-1][1] == heads and runs[-1][0][-1] == layer - 1:
            runs[-1][0].append(layer)
        else:
            runs.append(([layer], heads))

    def span(xs: Sequence[int], one: str, many: str) -> str:
        contiguous = list(xs) == list(range(xs[0], xs[-1] + 1))
        if len(xs) == 1:
            return f"{one} {xs[0]}"
        return f"{many} {xs[0]}-{xs[-1]}" if contiguous else f"{many} {', '.join(map(str, xs))}"

    return _names([f"{span(h, 'head', 'heads')} of {span(ls, 'layer', 'layers')}" for ls, h in runs])


def _unguided(summary: DemoSummary, tasks: list[TaskResult]) -> Conclusion:
    """The paper's attention claim (the image share falls after the shallow layers) on the unguided heads alone."""
    topic = "claim: the answer's attention to the image fades after the shallow layers, on the unguided heads"
    model = summary.model
    if not model.guided_heads:
        return _said("cannot tell", topic, "The model folder names no attention-guided heads (no training.json "
                     "guides): every head is unguided, so the attention claim above already stands on its own.")
    guided = flow.head_mask(model)
    half = model.num_layers // 2
    rows, falls, flat, unknown, differs = [], [], [], [], []
    for s in tasks:
        a, b = _halves(flow.share_over_heads(s.flow.head_image, guided, unguided=False))
        free = flow.share_over_heads(s.flow.head_image, guided, unguided=True)
        shallow, deep = [v for v in free[:half] if v is not None], [v for v in free[half:] if v is not None]
        if not shallow or not deep:
            unknown.append(s.label)
            continue
        fa, fb = statistics.fmean(shallow), statistics.fmean(deep)
        rows.append(f"{s.label}: all heads {_pct(a, 0)} in layers 0-{half - 1} vs {_pct(b, 0)} after, unguided "
                    f"heads {_pct(fa, 0)} vs {_pct(fb, 0)}")
        falls_free = fb < (1 - FALL_FRACTION) * fa
        (falls if falls_free else flat).append(s.label)
        if falls_free != (b < (1 - FALL_FRACTION) * a):
            differs.append(s.label)
    text = (f"The model's training guided {len(model.guided_heads)} of {model.num_layers * model.num_heads} "
            f"attention heads ({guided_text(model.guided_heads)}; from its {flow.TRAINING_FILE}). Image share of "
            "the answer's attention, shallow half vs deep half: " + ("; ".join(rows) or "no task has unguided "
                                                                     "heads in both halves") + ".")
    covered = [str(i) for i in range(model.num_layers) if not guided[i].all()]
    text += f" Layers with an unguided head: {', '.join(covered) or 'none'}."
    if unknown:
        text += f" {_names(unknown)}: no unguided head in one of the halves."
    if falls:
        text += f" On the unguided heads it falls with depth for {_names(falls)}."
    if flat:
        text += f" It does not fall for {_names(flat)} (by less than {FALL_FRACTION:.0%} of the shallow half's)."
    if differs:
        text += (f" For {_names(differs)} the unguided heads disagree with all heads: there the all-heads finding "
                 "rests on the guided heads.")
    verdict = "cannot tell" if not rows else ("matches" if not flat else ("partly" if falls else "does not match"))
    return _said(verdict, topic, text)


def _image_flow(tasks: list[TaskResult], num_layers: int) -> Conclusion:
    half = max(1, num_layers // 2)
    parts = []
    for s in tasks:
        table = s.flow.segment_flow
        names = list(s.segment_names)
        img, user = names.index("image"), names.index("user")
        q = [row[user][img] for row in table if row[user][img] is not None]
        qa, qb = (statistics.fmean(q[:half]), statistics.fmean(q[half:])) if len(q) == num_layers else (None, None)
        aa, ab = _halves(s.image_share)
        parts.append(f"{s.label}: question tokens {_pct(qa, 0)} / {_pct(qb, 0)}, answer rows {_pct(aa, 0)} / "
                     f"{_pct(ab, 0)}")
    return _said("note", "where the image's attention goes (segment flow)", (
        f"Share of attention on the image tokens in layers 0-{half - 1} / {half}-{num_layers - 1}: " + "; ".join(parts)
        + ". This is where the rows look, not what they use: the knockout curves test whether cutting those edges "
        "changes the answer."))
