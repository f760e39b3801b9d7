"""The HTML of ``flowkern demo``'s report: one self-contained page from the run's records.

Figures are embedded as PNG data URIs (so ``report.html`` alone shows everything, offline) and each links to its PNG
file beside the report; tables link to their CSV and JSON. No external resource is referenced: no fonts, no CDN, no
script but a few inline lines that, once the page has loaded, record on ``<html>`` how many images decoded
(``data-images="ok/total"``, ``data-images-ok="yes|no"``) and log a console error for any that did not -- what the
headless-browser test reads. Every text from the run is escaped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowkern.demo.report import knockout, methods
from flowkern.demo.report.records import DemoSummary, FigureRecord, SpeedRow, TaskResult
from flowkern.demo.report.tables import table1_rows

__all__ = ["render", "CHECK_SCRIPT"]

CHECK_SCRIPT = """window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.documentElement.setAttribute("data-images", (imgs.length - bad.length) + "/" + imgs.length);
  document.documentElement.setAttribute("data-images-ok", bad.length ? "no" : "yes");
  bad.forEach(function (i) { console.error("flowkern report: image did not load: " + i.alt); });
});"""
"""The report's only script: an image-load check for browsers and tests (no network, no effect on the page)."""

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 0;
       background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 0 20px 60px; }
header { background: #20303f; color: #fff; padding: 22px 20px 16px; }
header h1 { margin: 0 auto; max-width: 1180px; font-size: 24px; }
header p { margin: 6px auto 0; max-width: 1180px; color: #cfd8e0; font-size: 13px; }
nav { max-width: 1180px; margin: 12px auto 0; padding: 0 20px; font-size: 13px; }
nav a { margin-right: 14px; color: #20527f; }
h2 { border-bottom: 2px solid #d8dde2; padding-bottom: 4px; margin-top: 36px; }
h3 { margin-top: 26px; }
figure { margin: 18px 0; background: #fff; border: 1px solid #e2e5e8; border-radius: 6px; padding: 10px; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { font-size: 13px; color: #444; margin-top: 6px; }
table { border-collapse: collapse; margin: 10px 0 4px; background: #fff; font-size: 13px; }
th, td { border: 1px solid #d8dde2; padding: 4px 9px; text-align: right; vertical-align: top; }
th { background: #eef1f4; }
td.l, th.l { text-align: left; }
.box { background: #fff; border: 1px solid #d8dde2; border-left: 5px solid #20527f; padding: 10px 16px;
       border-radius: 4px; }
.words li { margin: 8px 0; }
.verdict { display: inline-block; min-width: 92px; text-align: center; font-size: 12px; font-weight: 600;
           border-radius: 10px; padding: 1px 8px; margin-right: 6px; }
.v-matches { background: #d5f0d8; color: #17621f; }
.v-partly { background: #fdf0c8; color: #7a5a00; }
.v-does-not-match { background: #f8d6d3; color: #8a1c12; }
.v-cannot-tell { background: #e3e6ea; color: #3d4650; }
.v-note { background: #dbe8f5; color: #1e4a75; }
.small { font-size: 12px; color: #555; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 0 14px; }
.grid2 figure { margin: 8px 0; }
pre { background: #fff; border: 1px solid #e2e5e8; padding: 8px 10px; overflow-x: auto; }
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _pct(x: Any, digits: int = 1) -> str:
    return "\u2013" if x is None else f"{100 * float(x):.{digits}f}"


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return "\u2013" if x is None else fmt.format(x)


def _layer(x: Any) -> str:
    return "none" if x is None else str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1, caption: str | None = None) -> str:
    """An HTML table; the first ``left`` columns are left-aligned; cells are escaped text."""
    head = "".join(f'<th class="l">{_e(h)}</th>' if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    body = []
    for r in rows:
        body.append("<tr>" + "".join(f'<td class="l">{_e(v)}</td>' if i < left else f"<td>{_e(v)}</td>"
                                     for i, v in enumerate(r)) + "</tr>")
    cap = f"<caption class=\"small\">{_e(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _links(names: Sequence[str]) -> str:
    return " \u00b7 ".join(f'<a href="{_e(n)}">{_e(Path(n).name)}</a>' for n in names)


def _figure(fig: FigureRecord, root: Path) -> str:
    from PIL import Image

    path = root / fig.file
    data = path.read_bytes()
    with Image.open(path) as im:
        width, height = im.size
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure id="fig-{_e(fig.id)}"><a href="{_e(fig.file)}" title="open the PNG">'
            f'<img src="{uri}" alt="{_e(fig.title)}" width="{width}" height="{height}"></a>'
            f"<figcaption><b>{_e(fig.title)}.</b> {_e(fig.caption)} "
            f'<a href="{_e(fig.file)}">{_e(Path(fig.file).name)}</a></figcaption></figure>')


def _figures(summary: DemoSummary, root: Path, section: str) -> str:
    """The section's figures in order; consecutive ``half`` figures share a two-column grid."""
    out: list[str] = []
    pending: list[str] = []
    for f in summary.figures:
        if f.section != section:
            continue
        if f.half:
            pending.append(_figure(f, root))
            continue
        if pending:
            out.append('<div class="grid2">' + "".join(pending) + "</div>")
            pending = []
        out.append(_figure(f, root))
    if pending:
        out.append('<div class="grid2">' + "".join(pending) + "</div>")
    return "\n".join(out)


def _verdict(v: str) -> str:
    return f'<span class="verdict v-{_e(v.replace(" ", "-"))}">{_e(v)}</span>'


def render(summary: DemoSummary, root: Path) -> str:
    """The report page.

    Args:
        summary: the run's records, with the figures drawn and the tables written (their files are linked).
        root: the report folder: figure PNGs are read from there (embedded) and linked relative to it.

    Returns:
        the HTML document as a string.
    """
    parts = ["<!DOCTYPE html>", '<html lang="en">', *_head(summary), "<main>"]
    for section in (_headline, _words, _tasks, _attention, _truncation, _methods, _knockout, _flow, _speed,
                    _files,
                    _reproduce):
        parts += section(summary, root)
    parts += ["</main>", f"<script>{CHECK_SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"


def _head(s: DemoSummary) -> list[str]:
    """The document head, the page header with the run's facts and the navigation."""
    settings, model, env = s.settings, s.model, s.environment
    mode = "quick" if settings.quick else "full"
    total = s.timings.get("total")
    sections = [("headline", "Headline"), ("words", "In plain words"), ("tasks", "Tasks"),
                ("attention", "Attention share"), ("maps", "Attention maps"), ("cam", "LLaVA-CAM"),
                ("truncation", "Truncation and cliff"), (methods.SECTION, "Pruning methods"),
                (knockout.SECTION, "Knockout"), ("flow", "Causal flow"),
                ("speed", "Speed"), ("files", "Files"), ("reproduce", "Reproduce")]
    return [
        '<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>flowkern demo: information flow in {_e(model.name)}</title>",
        f"<style>{_CSS}</style></head>",
        "<body>",
        "<header><h1>flowkern demo: information flow through a vision-language model, end to end</h1>",
        f"<p>Model <b>{_e(model.name)}</b> ({_e(model.model_type)}, {model.num_layers} decoder layers, "
        f"{_e(model.image_tokens)} image tokens, {model.parameters / 1e6:.2f} M parameters) \u00b7 "
        f"{mode} run, shapes seed {settings.seed} \u00b7 {_e(env.created)} \u00b7 "
        f"{'' if total is None else f'{total:.0f} s on '}{settings.threads} torch thread(s), "
        f"{_e(settings.device)}, {env.cpu_count} CPU cores \u00b7 flowkern {_e(env.flowkern)}, "
        f"torch {_e(env.torch)}</p></header>",
        "<nav>" + "".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in sections) + "</nav>",
    ]


def _headline(s: DemoSummary, root: Path) -> list[str]:
    """Per task: baseline, no-image score, image use, cliff layer; the speed-ups at the largest batch."""
    tasks = s.tasks.values()
    out = ['<section id="headline"><h2>Headline</h2><div class="box">']
    rows = [[t.label, t.metric, _pct(t.baseline), _pct(t.no_image), t.image_use, _layer(t.cliff_layer), t.n]
            for t in tasks]
    out.append(_table(
        ["task", "metric", "baseline %", "no image (L = 0) %", "image used", "cliff layer L", "n"], rows, left=2,
        caption="The cliff layer L (0-based) is the first layer from which every later truncation stays within the "
                "tolerance of the baseline; the paper's layer is L + 1. Image used: clear / weak (within two "
                "standard errors) / none (within the tolerance)."))
    if s.speed:
        top = max(r.batch for r in s.speed)
        out.append("<p>Pruned at the cliff layer, batch " + str(top) + ": " + "; ".join(
            f"{_e(r.task)} ({_at(r)}) prefill <b>{r.prefill_speedup:.2f}x</b>, decode "
            f"<b>{_num(r.decode_speedup)}x</b>" for r in s.speed if r.batch == top) + ".</p>")
    out.append("</div></section>")
    return out


def _words(s: DemoSummary, root: Path) -> list[str]:
    """The conclusions with their verdicts."""
    return [
        '<section id="words"><h2>In plain words</h2>',
        '<p class="small">Every sentence below is chosen by comparing this run\'s numbers; nothing is written in '
        "advance. Verdicts: whether the numbers match a claim of the paper, partly, do not, or cannot test it.</p>",
        '<ul class="words">' + "".join(f"<li>{_verdict(c.verdict)}<b>{_e(c.topic)}.</b> {_e(c.text)}</li>"
                                       for c in s.conclusions) + "</ul></section>"]


def _tasks(s: DemoSummary, root: Path) -> list[str]:
    """The four sets and their examples."""
    out = ['<section id="tasks"><h2>The tasks</h2>',
           "<p>Four fresh shapes sets drawn from the seed, written in the official formats of the real benchmarks "
           "and scored by flowkern's implementations of their rules (the paper's Table 1 metrics).</p>",
           _table(["task", "what it asks", "questions", "metric", "baseline %", "guessing %", "max new tokens"],
                  [[t.label, t.kind, t.n, t.metric, _pct(t.baseline), _pct(t.chance),
                    s.settings.max_new_tokens.get(world, "")] for world, t in s.tasks.items()], left=2)]
    for world, examples in s.examples.items():
        if examples:
            out.append(f"<h3>{_e(s.tasks[world].label)}: examples</h3>")
            out.append(_table(["question", "model's answer", "reference"],
                              [[e.question, e.answer or "(empty)", e.reference] for e in examples], left=3))
    out.append("</section>")
    return out


def _attention(s: DemoSummary, root: Path) -> list[str]:
    """Figure 2A (shares), Figure 2B (maps) and Figures 3/4 (LLaVA-CAM)."""
    tasks = list(s.tasks.values())
    col = tasks[0].segment_names.index("image")
    return [
        '<section id="attention"><h2>Where the answer looks, layer by layer (Figure 2A)</h2>',
        "<p>Measured with <code>flowkern.trace</code>: the fused attention kernel returns, for each answer row, the "
        "head-mean softmax mass on each token segment, without materialising the attention matrix.</p>",
        _figures(s, root, "attention"),
        _table(["task", *[f"layer {i}" for i in range(s.model.num_layers)]],
               [[t.label, *(_pct(row[col]) for row in t.shares)] for t in tasks],
               caption="Image share of the answer's attention, % per layer (all segments: tables/shares.csv)."),
        "</section>",
        '<section id="maps"><h2>Answer \u2192 image attention maps (Figure 2B)</h2>',
        _figures(s, root, "maps") or "<p>No examples drawn.</p>",
        "</section>",
        '<section id="cam"><h2>LLaVA-CAM per layer (Figures 3 and 4)</h2>',
        "<p>Computed with <code>flowkern.cam</code>: one forward and one backward per batch of noisy copies give "
        "every layer's map.</p>",
        _figures(s, root, "cam") or "<p>No LLaVA-CAM computed (no example, or empty answers).</p>",
        "</section>"]


def _truncation(s: DemoSummary, root: Path) -> list[str]:
    """Figure 5, the cliff layers, Table 1 and every sweep point."""
    keep = s.settings.keep
    tasks = list(s.tasks.values())
    t1 = table1_rows(tasks)
    return [
        '<section id="truncation"><h2>Truncation sweeps and the cliff layer (Figure 5, Table 1)</h2>',
        f"<p>For each task, <code>flowkern sweep</code>'s engine scores the unpruned model, then the model with "
        f"every image token removed (hidden states and KV cache, <code>flowkern.prune</code>, k = 0) from each "
        f"decoder layer L on, and with {keep} image tokens kept from L on, ranked by the attention they receive or "
        "at random (the control).</p>",
        _figures(s, root, "truncation"),
        "<h3>Cliff layers</h3>",
        _table(["task", "metric", "baseline %", "tolerance (points)", "cliff L", "paper layer", "no-harm L",
                "monotone", f"cliff, keep {keep} attention", f"cliff, keep {keep} random", "note"],
               [_cliff_row(t) for t in tasks], left=2),
        "<h3>Table 1 form: baseline vs truncated at the cliff layer</h3>",
        _table(t1[0], [["\u2013" if v is None else v for v in r] for r in t1[1:]], left=2,
               caption="In percent, as the paper's Table 1 (the model's own numbers; the paper's LLaVA-1.5 row is "
                       "84.70 / 85.51 POPE accuracy, 65.00 / 66.48 SQA, 59.34 / 60.02 TextVQA)."),
        "<h3>Every point</h3>",
        _table(["task", "L", "k = 0 %", f"keep {keep}, attention %", f"keep {keep}, random %"],
               [[t.label, layer, _pct(v), _pct(t.attention_k.get(layer)), _pct(t.random_k.get(layer))]
                for t in tasks for layer, v in t.curve.items()], left=1),
        "</section>"]


def _methods(s: DemoSummary, root: Path) -> list[str]:
    """The pruning-methods comparison (:mod:`flowkern.demo.report.methods`)."""
    return methods.section_html(s.methods, _figures(s, root, methods.SECTION), s.conclusions, _e, _table)


def _knockout(s: DemoSummary, root: Path) -> list[str]:
    """The attention-knockout curves (:mod:`flowkern.demo.report.knockout`)."""
    return knockout.section_html(_figures(s, root, knockout.SECTION), s.conclusions, _e)


def _flow(s: DemoSummary, root: Path) -> list[str]:
    """The flow section after the knockout curves (:func:`_knockout`): the logit lens of the answer, per-head image
    shares beside the guided heads, the segment x segment flow and the image lens maps."""
    from flowkern.demo.report.flow import head_mask, share_over_heads
    from flowkern.demo.report.words import guided_text

    out = ['<section id="flow"><h2>Causal flow: the logit lens and the attention heads</h2>']
    tasks = [t for t in s.tasks.values() if t.flow is not None]
    if not tasks:
        return [*out, "<p>The logit lens and per-head shares were not measured.</p>", "</section>"]
    layers = range(s.model.num_layers)
    out += [
        "<h3>When the answer becomes decodable (logit lens)</h3>",
        "<p>Measured with <code>flowkern.lens</code>: each decoder layer's output at the last prompt position, "
        "through the model's own final norm and LM head, keeping only the top token and the probability of the "
        "model's own first answer token.</p>",
        _figures(s, root, "lens"),
        _table(["task", "decodable from", *[f"layer {i}" for i in layers]],
               [[t.label, _layer(t.flow.decodable_layer), *(_pct(v) for v in t.flow.answer_prob)] for t in tasks],
               left=2, caption="Lens probability of the answer token per layer, % (mean over the traced questions)."),
        "<h3>Per-head image shares and the guided heads</h3>"]
    guided = head_mask(s.model)
    out.append("<p>" + (f"The model's training guided {_e(guided_text(s.model.guided_heads))} (its training.json): "
                        "those heads were pushed to attend where the guide said, so an attention finding that "
                        "holds only on them is a property of the training. The table puts every head beside the "
                        "unguided heads alone.</p>" if s.model.guided_heads else
                        "The model folder names no guided heads: every head is unguided.</p>"))
    out.append(_figures(s, root, "heads"))
    rows = []
    for t in tasks:
        for name, unguided in (("all heads", False), ("unguided heads", True)):
            rows.append([t.label, name, *(_pct(v) for v in share_over_heads(t.flow.head_image, guided,
                                                                             unguided=unguided))])
    out.append(_table(["task", "heads", *[f"layer {i}" for i in layers]], rows, left=2,
                      caption="Image share of the answer's attention per layer, % (\u2013: every head of the layer "
                              "was guided)."))
    out += ["<h3>Segment × segment flow</h3>",
            "<p>Where every token's attention goes, not only the answer's: the mean mass the query rows of each "
            "segment put on each key segment, per layer (<code>flowkern.trace(segment_flow=True)</code>).</p>",
            _figures(s, root, "segflow"),
            "<h3>What each image patch says (logit lens on the image grid)</h3>",
            _figures(s, root, "lensmaps") or "<p>No example drawn.</p>", "</section>"]
    return out


def _cliff_row(t: TaskResult) -> list[Any]:
    return [t.label, t.metric, _pct(t.baseline), f"{t.tolerance:.3g}", _layer(t.cliff_layer),
            _layer(None if t.cliff_layer is None else t.cliff_layer + 1), _layer(t.no_harm_layer),
            "yes" if t.monotone else "no", _layer(t.keepk_cliff), _layer(t.random_cliff), t.note]


def _speed(s: DemoSummary, root: Path) -> list[str]:
    """How the speed was measured, its figure and table."""
    out = ['<section id="speed"><h2>Speed</h2>']
    speed, env = s.speed, s.environment
    if not speed:
        return [*out, "<p>Not measured.</p>", "</section>"]
    out.append(f"<p>Greedy <code>generate</code> of {speed[0].new_tokens} tokens (end-of-sequence suppressed), "
               "timed per forward by <code>flowkern.timer.ForwardTimer</code>; unpruned = the model's own attention, "
               f"pruned = <code>flowkern.prune(layer=L, keep=0)</code>. Median of {speed[0].repeats} runs each, "
               "alternating, after a warm-up, in the same process as everything else"
               + (f" (load average at the end: {_e(env.load_average)})" if env.load_average else "") + ".</p>")
    if s.speed_note:
        out.append(f"<p><b>{_e(s.speed_note)}.</b></p>")
    out.append(_figures(s, root, "speed"))
    header = ["task", "cliff L", "timed at L", "batch", "prompt tokens", "prefill ms unpruned", "prefill ms pruned",
              "prefill speed-up", "decode tok/s unpruned", "decode tok/s pruned", "decode speed-up"]
    out.append(_table(header, [[r.task, _layer(r.cliff_layer), r.layer, r.batch, r.prompt_tokens,
                                _num(r.unpruned_prefill_ms, "{:.1f}"), _num(r.pruned_prefill_ms, "{:.1f}"),
                                _num(r.prefill_speedup) + "x", _num(r.unpruned_decode_tok_s, "{:.0f}"),
                                _num(r.pruned_decode_tok_s, "{:.0f}"), _num(r.decode_speedup) + "x"]
                               for r in speed], left=1))
    out.append("</section>")
    return out


def _files(s: DemoSummary, root: Path) -> list[str]:
    """Links to the figures, tables, ``summary.json`` and the sweep files present."""
    keep = s.settings.keep
    sweep_files = []
    for world in s.tasks:
        for folder in (f"sweeps/{world}", f"sweeps/{world}-keep{keep}"):
            sweep_files += [f"{folder}/cliff.json", f"{folder}/summary.csv", f"{folder}/results.jsonl"]
    present = [f for f in sweep_files if (root / f).is_file()]
    return [
        '<section id="files"><h2>Files</h2><ul>',
        "<li>Figures: " + _links([f.file for f in s.figures]) + "</li>",
        "<li>Tables: " + _links(s.tables) + "</li>",
        '<li>Everything above in one file: <a href="summary.json">summary.json</a></li>',
        "<li>Sweeps (each point's answers in <code>sweeps/&lt;task&gt;/points/&lt;point&gt;/answers.jsonl</code>): "
        + _links(present) + "</li>",
        "</ul></section>"]


def _reproduce(s: DemoSummary, root: Path) -> list[str]:
    """The command of this run, the shapes commands and the time per stage."""
    settings, keep = s.settings, s.settings.keep
    cmd = "flowkern demo" + (" --quick" if settings.quick else "") + f" --seed {settings.seed}" + \
        (f" --keep {keep}" if keep != 16 else "") + " --out DIR"
    out = ['<section id="reproduce"><h2>Reproduce</h2>', f"<pre>{_e(cmd)}</pre>",
           "<p>The shapes sets (drawn in a scratch folder and removed after the run) are redrawn exactly by:</p>",
           "<pre>" + "\n".join(_e(t.shapes_command) for t in s.tasks.values()) + "</pre>"]
    if s.timings:
        out.append("<p class=\"small\">Time per stage (s): " + ", ".join(f"{_e(k)} {v:.1f}"
                                                                        for k, v in s.timings.items()) + ".</p>")
    out.append("</section>")
    return out


def _at(row: SpeedRow) -> str:
    """Where a speed row was pruned: ``L = 3``, or ``no cliff, timed at L = 4`` when they differ."""
    if row.cliff_layer == row.layer:
        return f"L = {row.layer}"
    return f"{'no cliff' if row.cliff_layer is None else f'cliff {row.cliff_layer}'}, timed at L = {row.layer}"
