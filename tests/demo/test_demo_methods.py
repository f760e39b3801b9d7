"""The report's pruning-methods section from hand-built records (no model run): the standard error, the spatial
bias of kept grids, the verdicts computed from given numbers, the table, the figures and the page section. The quick
run in ``test_demo_report.py`` checks the section end to end on the shipped model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from flowkern.demo.report import methods, render, tables
from flowkern.demo.report.records import MethodsResult, MethodsTask, SpatialBias
from flowkern.eval.sweep.compare import bits
from tests.demo.test_demo_report import _Checker, _papers_tasks, _summary

SPECS = {"attention": "attention@2", "grid+attention": "grid+attention@2", "diversity": "diversity@0",
         "random": "random@0", "grid": "grid@0"}


def _grid(kept: np.ndarray) -> dict:
    return {"shape": list(kept.shape), "kept": bits(kept), "present": bits(np.ones_like(kept))}


def _bias(offset: float, se: float = 0.01, last: float = 0.25) -> SpatialBias:
    return SpatialBias(row_offset=offset, row_offset_se=se, last_rows=last, last_rows_se=0.01, uniform=0.25,
                       answers=100)


def _result(**kw) -> MethodsResult:
    """Three tasks of 100 questions, at keep 0.5 and 0.125: diversity clearly best, attention close, random and grid
    far behind; CHAIR's lower-is-better metric rises under pruning."""
    low = {"attention": 0.80, "grid+attention": 0.78, "diversity": 0.85, "random": 0.40, "grid": 0.45}
    tasks = {}
    for world, label, metric, base, higher in (("pope", "shapes-POPE", "f1", 0.95, True),
                                               ("sqa", "shapes-SQA", "accuracy", 0.90, True),
                                               ("caption", "shapes-CHAIR", "chair_s", 0.05, False)):
        values = {r: {0.5: base, 0.125: (v - 0.05 if higher else 1.0 - v)} for r, v in low.items()}
        maps = {r: [[0.5] * 8 for _ in range(8)] for r in low}
        tasks[world] = MethodsTask(label=label, metric=metric, higher_is_better=higher, n=100, baseline=base,
                                   values=values, kept={r: {0.5: 32.0, 0.125: 8.0} for r in low}, maps=maps)
    bias = {"attention": _bias(0.20, last=0.6), "grid": _bias(0.0, se=0.0), "grid+attention": _bias(0.08)}
    return MethodsResult(**{"methods": SPECS, "budgets": (0.5, 0.125), "map_budget": 0.125, "tasks": tasks,
                            "bias": bias, **kw})


def test_standard_error_never_claims_certainty():
    assert methods.standard_error(1.0, 18) > 3.0 and methods.standard_error(0.0, 18) > 3.0
    assert methods.standard_error(0.5, 100) == pytest.approx(100 * math.sqrt(0.25 / 100))
    assert methods.standard_error(0.9, 400) < methods.standard_error(0.9, 100)


def test_spatial_bias_from_kept_grids():
    last_row = np.zeros((8, 8), dtype=bool)
    last_row[7] = True
    first_row = np.zeros((8, 8), dtype=bool)
    first_row[0] = True
    b = methods.spatial_bias([_grid(last_row), _grid(first_row)])
    assert b.answers == 2 and b.row_offset == pytest.approx(0.0)
    assert b.last_rows == pytest.approx(0.5) and b.uniform == pytest.approx(0.25)
    assert b.row_offset_se == pytest.approx(np.std([7.5 / 8 - 0.5, 0.5 / 8 - 0.5], ddof=1) / math.sqrt(2))
    low = methods.spatial_bias([_grid(last_row)] * 3)
    assert low.row_offset == pytest.approx(7.5 / 8 - 0.5) and low.last_rows == 1.0 and low.row_offset_se == 0.0
    assert methods.spatial_bias([_grid(np.zeros((8, 8), dtype=bool))]) is None  # nothing kept: nothing to place


def test_method_layers_follow_the_scorers():
    assert methods.method_layer("attention", 8) == methods.ATTENTION_LAYER == 2
    assert methods.method_layer("prerope-attention", 8) == methods.method_layer("grid+attention", 8) == 2
    assert methods.method_layer("attention", 2) == 1
    for rank in ("random", "grid", "none", "diversity", "duplicates", "cls"):
        assert methods.method_layer(rank, 8) == 0


def test_losses_and_ranking_verdict_from_numbers():
    r = _result()
    lost = methods.losses(r, 0.125)
    # pope: 95 - 80 = 15 points, sqa: 90 - 80 = 10, chair: (1 - 0.85) - 0.05 = 10 points worse
    assert lost["diversity"][0] == pytest.approx((15 + 10 + 10) / 3)
    assert lost["diversity"][1] == pytest.approx(math.sqrt(sum(methods.standard_error(v, 100) ** 2
                                                               for v in (0.80, 0.80, 0.15))) / 3)
    ranking, bias = methods.methods_conclusions(r)
    assert ranking.topic == methods.TOPIC and ranking.verdict == "note"
    assert ranking.text.startswith("At the smallest budget (keep 0.125, 8 image tokens), averaged over 3 tasks, "
                                   "diversity (diversity@0) loses the least")
    assert "then attention" in ranking.text and "random loses the most" in ranking.text
    assert "(+11.7 \u00b1 4.5 points, two standard errors; < 0: above it)" in ranking.text
    assert "Within two standard errors of diversity: attention." in ranking.text  # grid+attention: 7 > 6.7 points
    assert "The best method that prunes before the decoder, diversity, loses 5.0 points less than the best at " \
           "layer 2, attention (a difference within two standard errors)." in ranking.text
    assert "shapes-POPE diversity (80.0 % vs 95.0 % unpruned, n = 100)" in ranking.text
    assert "shapes-CHAIR diversity (15.0 % vs 5.0 % unpruned" in ranking.text  # lower is better there
    pope = r.tasks["pope"]
    tied = replace(pope, values={k: {**v, 0.125: 0.9} for k, v in pope.values.items()})
    text = methods.methods_conclusions(replace(r, tasks={**r.tasks, "pope": tied}))[0].text
    assert "shapes-POPE attention and 4 more (90.0 % vs 95.0 % unpruned, n = 100)" in text
    # a clear winner: many questions shrink the errors
    sure, _ = methods.methods_conclusions(replace(r, tasks={k: replace(t, n=100000) for k, t in r.tasks.items()}))
    assert "Every other method is more than two standard errors behind diversity." in sure.text
    assert "(a difference beyond two standard errors)" in sure.text
    empty = methods.methods_conclusions(replace(r, tasks={k: replace(t, values={}) for k, t in r.tasks.items()}))
    assert empty[0].verdict == "cannot tell"


def test_bias_verdict_from_numbers():
    r = _result()
    _, bias = methods.methods_conclusions(r)
    assert bias.topic == methods.BIAS_TOPIC and bias.verdict == "matches"
    assert "lie lower on the image (towards its last rows) than the grid control's" in bias.text
    assert "attention centre +20.0 \u00b1 2.0 % of the height from the middle, 60 % in the last quarter" in bias.text
    assert "The difference, +20.0 % of the height, exceeds two standard errors" in bias.text
    assert "For comparison: grid+attention centre +8.0" in bias.text
    # within the margin, within the noise, or the other way: not the FEATHER bias
    for att in (_bias(0.04), _bias(0.10, se=0.06)):
        _, b = methods.methods_conclusions(replace(r, bias={**r.bias, "attention": att}))
        assert b.verdict == "does not match" and "no lower on the image" in b.text and "does not exceed" in b.text
    _, b = methods.methods_conclusions(replace(r, bias={**r.bias, "attention": _bias(-0.2)}))
    assert b.verdict == "does not match" and "higher on the image" in b.text
    _, b = methods.methods_conclusions(replace(r, bias={"attention": _bias(0.2)}))
    assert b.verdict == "cannot tell"


def test_methods_table_from_numbers():
    rows = methods.methods_rows(_result())
    header, body = rows[0], rows[1:]
    assert header == ["task", "method", "scorer_at_layer", "budget", "kept_image_tokens", "n", "metric", "value",
                      "se_points", "delta_points"]
    assert len(body) == 3 * (1 + len(SPECS) * 2)
    row = dict(zip(header, next(b for b in body if b[0] == "shapes-SQA" and b[1] == "random" and b[3] == 0.125),
                   strict=True))
    assert row["value"] == pytest.approx(0.35) and row["delta_points"] == pytest.approx(-55.0)
    assert row["scorer_at_layer"] == "random@0" and row["kept_image_tokens"] == 8.0
    assert row["se_points"] == pytest.approx(methods.standard_error(0.35, 100))
    base = dict(zip(header, next(b for b in body if b[1] == "unpruned"), strict=True))
    assert base["budget"] == 1.0 and base["delta_points"] == 0.0


def test_methods_section_renders_with_its_figures_and_verdicts(tmp_path):
    """The figures drawn from the record, the section on the page (figures embedded, tables, verdicts), the
    ``methods`` table among the report's tables, and summary.json's record."""
    r = _result(skipped={"cls": "rank='cls': the tower has no [CLS] token"})
    figures = methods.draw(tmp_path / "figures", r)
    assert [f.id for f in figures] == ["methods_budget", "methods_maps"]
    for f in figures:
        assert f.section == methods.SECTION
        with Image.open(tmp_path / f.file) as im:
            assert im.width >= 600 and im.height >= 200 and np.asarray(im.convert("L")).std() > 5
    fig = methods.budget_curves(r, tmp_path / "curves.png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0.125", "0.5", "1"]
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["unpruned", *(f"{k} @ L{v[-1]}" for k, v in SPECS.items())]
    fig = methods.keep_maps_grid(r, tmp_path / "maps.png")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3 * len(SPECS) + 1  # and the colour bar

    s = _summary(_papers_tasks())
    s = replace(s, methods=r, figures=figures, conclusions=methods.methods_conclusions(r))
    page = render.render(s, tmp_path)
    p = _Checker()
    p.feed(page)
    p.close()
    assert not p.errors and not p.stack and len(p.ids) == len(set(p.ids))
    section = page.split('<section id="methods">')[1].split("</section>")[0]
    assert '<a href="#methods">Pruning methods</a>' in page
    assert 'id="fig-methods_budget"' in section and 'id="fig-methods_maps"' in section
    assert section.count('<img src="data:image/png;base64,') == 2
    assert "questions: shapes-POPE 100, shapes-SQA 100, shapes-CHAIR 100" in section
    assert "Before the decoder (layer 0: the tokens are removed from the language model's input): diversity, " \
           "random, grid." in section and "(ranked by the attention of the layer before): attention, " \
           "grid+attention." in section
    assert "Not run on this model: cls: rank=&#x27;cls&#x27;: the tower has no [CLS] token." in section
    assert f"<td>80.0 \u00b1 {2 * methods.standard_error(0.8, 100):.1f}</td>" in section  # diversity, POPE, 0.125
    assert "Keep 0.5 of the image tokens" in section and "Keep 0.125 of the image tokens" in section
    assert "<td>+20.0 \u00b1 2.0</td>" in section and "60 \u00b1 2 (even: 25)" in section
    assert "<b>note</b>: At the smallest budget" in section and "<b>matches</b>: At keep 0.125" in section
    assert "loses the least" in page.split('<section id="words">')[1].split("</section>")[0]  # also in plain words
    assert "methods" in tables.tables(s)
    j = json.loads(json.dumps(s.to_json(), allow_nan=False))
    assert j["methods"]["tasks"]["pope"]["values"]["diversity"]["0.125"] == pytest.approx(0.80)
    assert j["methods"]["bias"]["attention"]["row_offset"] == pytest.approx(0.2)


def test_no_methods_section_without_a_comparison(tmp_path):
    s = _summary(_papers_tasks())
    page = render.render(s, tmp_path)
    assert '<section id="methods">' not in page and "methods" not in tables.tables(s)
