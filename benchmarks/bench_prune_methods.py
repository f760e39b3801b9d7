"""Speed of the pruning methods (issue 34): removal before the decoder vs the ideal, each scorer's overhead, a
three-stage schedule vs one stage with the same average token count per layer.

The model is built from a config with random weights (no download), LLaVA-1.5-shaped: a CLIP tower at 336 px with
14 px patches (24 x 24 = 576 image tokens; 2 layers of width 128, so that the [CLS] scorer has a penultimate layer)
and a Llama decoder of 32 layers (LLaVA-1.5-7B's depth, so the issue's schedule ``2:0.5, 8:0.25, 16:0.125`` applies
unchanged) of width 512 (8 heads, MLP 1376), fp32. The width makes the decoder's matrix products dominate the
prefill: the language model takes ~98 % of an unpruned prefill (~0.7 s at batch 1 on 2 cores), the tower and the
per-layer Python overhead the rest, so that a shorter sequence shows in the time the way it does on a real model.

Workload: 1 image + 64 text tokens per sample (5 before the image, 59 after; S = 640), batch 1 and a small batch
(``--batches``, default 1,4; same image-token count per sample, no padding), greedy, end-of-sequence disabled.
Variants, all of one batch size measured in the same rounds (each round runs every variant once, the order rotated,
after one untimed warm-up run per variant that also records how many rows each decoder layer computes on):

- ``unpruned``: plain ``generate`` (SDPA): the baseline of every speed-up; ``unpruned-flowkern``:
  ``flowkern.prune(model)`` with nothing pruned (flowkern's attention), for scale;
- removal before the decoder: ``PruneSpec(layer=0, keep=r, rank="none")`` for r in 0.5, 0.25, 0.125. Reported:
  speed-up of the whole prefill (vision tower included) and of the language model alone (a forward hook on it), the
  ideal ``prompt length / pruned length`` and speed-up / ideal (goal >= 0.8);
- scorer overhead: every registered scorer (:func:`flowkern.scorers.scorer_names`) at ``--scorer-layers`` (default
  2 and 0; layer 0 only for scorers that rank before the decoder) and ``--scorer-keep`` (default 0.25), against
  ``rank="none"`` at the same layer and keep: ``time(scorer) / time(none) - 1`` (goal <= 5 %);
- ``schedule``: ``PruneSpec(schedule=((2, .5), (8, .25), (16, .125)), rank=--schedule-rank)`` vs ``one-stage``:
  ``PruneSpec(layer=2, keep=k)`` with ``k`` chosen so that both have the same *average rows per layer*: the number
  of sequence rows each of the N decoder layers computes on at the prefill (the prompt length before the first
  stage, text + kept image tokens after it; hidden fillers of a padded batch counted), summed over the layers and
  divided by N, as measured by forward hooks on the decoder layers (text rows are the same in both, so this is also
  the same average number of image tokens per layer). Prefill time and decode tokens/s (``--new-tokens`` tokens:
  the prefill, then that many minus one decode steps).

Times: prefill seconds from :class:`flowkern.timer.ForwardTimer`, the language model's from hooks on it; medians
over ``--repeats`` rounds, ratios the medians of the per-round ratios. A variant this build cannot run (a refusal:
``NotImplementedError`` / ``ValueError``), or whose stage does not shorten the sequence (``layer=0`` by masking), is
recorded as ``{"skipped": "<reason>"}``; one that fails otherwise as ``{"failed": ...}`` (exit code 1).

    nice -n 10 python benchmarks/bench_prune_methods.py          # writes results/cpu-<n>core-prune-methods.json
    python benchmarks/bench_prune_methods.py --quick --out /tmp/x.json   # smoke run on tiny shapes (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import device_label, llava_15_config, llava_caption, make_report, model_summary, write_report

import flowkern
from flowkern.plan import PruneSpec
from flowkern.timer import ForwardTimer

SYSTEM_TOKENS = 5
# (geometry overrides of _common.llava_15_config, text tokens per sample, image size in px): the full run and the
# --quick smoke run (8 x 8 = 64 image tokens, 18 narrow layers: enough depth for the schedule's layers)
FULL = (dict(vision_hidden=128, vision_intermediate=512, vision_layers=2, vision_heads=4, projection_dim=128,
             hidden=512, intermediate=1376, layers=32, heads=8), 64, 336)
QUICK = (dict(vision_hidden=32, vision_intermediate=64, vision_layers=2, vision_heads=2, projection_dim=32,
              hidden=64, intermediate=128, layers=18, heads=2), 16, 112)
SCHEDULE = ((2, 0.5), (8, 0.25), (16, 0.125))
REMOVAL_KEEPS = (0.5, 0.25, 0.125)
GOALS = dict(removal_speedup_vs_ideal_min=0.8, scorer_overhead_max=0.05)
REFUSALS = (NotImplementedError, ValueError)


@dataclass
class Variant:
    """One measured setting: ``spec`` None = plain generate, ``"flowkern"`` = ``flowkern.prune(model)``."""

    name: str
    spec: PruneSpec | str | None
    new_tokens: int
    rows: list[int] | None = None  # rows each decoder layer computed on at the warm-up prefill
    skipped: str | None = None
    failed: str | None = None
    prefill: list[float] = field(default_factory=list)
    lm: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)


def build(quick: bool) -> tuple[torch.nn.Module, int]:
    """The model (random weights, seed 0, SDPA, fp32, eval, decoding every step) and its text tokens per sample."""
    from flowkern.hf.tiny import build_model

    geometry, text_tokens, image_size = QUICK if quick else FULL
    cfg = llava_15_config("7b", **geometry)
    cfg.vision_config.image_size = image_size
    return build_model(cfg, seed=0, attn_implementation="sdpa", decode_all=True), text_tokens


def make_inputs(model: torch.nn.Module, batch: int, text_tokens: int) -> dict:
    """``batch`` samples of 5 text tokens, the image's placeholders, ``text_tokens - 5`` text tokens."""
    cfg = model.config
    g = torch.Generator().manual_seed(batch)
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    text = torch.randint(3, 32000, (batch, text_tokens), generator=g)
    text[:, 0] = cfg.text_config.bos_token_id
    ids = torch.cat([text[:, :SYSTEM_TOKENS], torch.full((batch, n_img), cfg.image_token_index),
                     text[:, SYSTEM_TOKENS:]], dim=1)
    size = cfg.vision_config.image_size
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(batch, 3, size, size, generator=g))


class Hooks:
    """Wall time of each language-model forward (``lm``), and with ``rows`` the rows each decoder layer computed on
    at its first forward (``rows``)."""

    def __init__(self, model: torch.nn.Module, *, rows: bool = False) -> None:
        from flowkern.hf.models import get_adapter

        adapter = get_adapter(model)
        self.lm_module = adapter.language_model(model)
        self.layers = adapter.decoder_layers(model) if rows else []
        self.lm: list[float] = []
        self.rows: list[int | None] = [None] * len(self.layers)
        self._t0 = 0.0
        self._handles: list = []

    def _start(self, *_: Any) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, *_: Any) -> None:
        self.lm.append(time.perf_counter() - self._t0)

    def _row(self, i: int):
        from flowkern.hf import compat

        def hook(module, args, output) -> None:
            if self.rows[i] is None:
                self.rows[i] = int(compat.layer_output_hidden(output)[0].shape[1])
        return hook

    def __enter__(self) -> Hooks:
        # entered inside the pruning context: the clock starts before and stops after flowkern's own hooks on the
        # language model; a layer's rows are read before any other hook on its output could replace it
        self._handles = [self.lm_module.register_forward_pre_hook(self._start, prepend=True),
                         self.lm_module.register_forward_hook(self._stop)]
        self._handles += [layer.register_forward_hook(self._row(i), prepend=True)
                          for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


def context(model: torch.nn.Module, spec: PruneSpec | str | None) -> contextlib.AbstractContextManager:
    if spec is None:
        return contextlib.nullcontext()
    if spec == "flowkern":
        return flowkern.prune(model)
    return flowkern.prune(model, spec)


def run(model: torch.nn.Module, v: Variant, inputs: dict, *, rows: bool = False) -> tuple[float, float, float, Hooks]:
    """One ``generate``: (prefill s, language-model prefill s, decode tokens/s or nan, the hooks)."""
    with torch.inference_mode(), context(model, v.spec), ForwardTimer(model) as timer, \
            Hooks(model, rows=rows) as hooks:
        model.generate(**inputs, max_new_tokens=v.new_tokens, do_sample=False)
    tps = timer.decode_tokens_per_second
    return timer.prefill_seconds, hooks.lm[0], float("nan") if tps is None else tps, hooks


def check_stages(v: Variant, prompt: int) -> str | None:
    """Why ``v``'s measured rows show that one of its stages did not shorten the sequence, or None."""
    if not isinstance(v.spec, PruneSpec) or v.rows is None:
        return None
    for layer, _ in v.spec.stages:
        before = prompt if layer == 0 else v.rows[layer - 1]
        if v.rows[layer] >= before:
            how = "masks instead of removing" if layer == 0 else "does not shorten the sequence"
            return f"the stage at layer {layer} {how} on this build ({v.rows[layer]} of {before} rows stay)"
    return None


def warm_up(model: torch.nn.Module, v: Variant, inputs: dict) -> None:
    """The untimed first run: the rows per layer, or why the variant is skipped / failed."""
    try:
        *_, hooks = run(model, v, inputs, rows=True)
    except REFUSALS as exc:
        v.skipped = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        return
    except Exception as exc:  # a bug of the build under test: record it, go on with the others, exit 1 at the end
        v.failed = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        traceback.print_exc()
        return
    v.rows = [int(r) for r in hooks.rows]
    v.skipped = check_stages(v, int(inputs["input_ids"].shape[1]))


def measure(model: torch.nn.Module, variants: list[Variant], inputs: dict, repeats: int) -> None:
    """``repeats`` rounds over the runnable variants, each once per round, the order rotated."""
    live = [v for v in variants if v.skipped is None and v.failed is None]
    for i in range(repeats):
        for v in live[i % len(live):] + live[: i % len(live)]:
            p, lm, tps = run(model, v, inputs)[:3]
            v.prefill.append(p)
            v.lm.append(lm)
            v.decode.append(tps)


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def timing(v: Variant, base: Variant) -> dict:
    """Medians of ``v`` and its per-round speed-ups over ``base``, or the reason it has none."""
    if v.skipped or v.failed:
        return {"skipped": v.skipped} if v.skipped else {"failed": v.failed}
    out = dict(prefill_s=statistics.median(v.prefill), lm_prefill_s=statistics.median(v.lm),
               prefill_speedup=median_ratio(base.prefill, v.prefill), lm_speedup=median_ratio(base.lm, v.lm),
               rows_per_layer=v.rows, average_rows_per_layer=sum(v.rows) / len(v.rows))
    if v.new_tokens > 1:
        out.update(decode_tok_s=statistics.median(v.decode), decode_speedup=median_ratio(v.decode, base.decode))
    if isinstance(v.spec, PruneSpec):
        out["spec"] = v.spec.to_dict()
    return out


def scorer_list() -> list[str]:
    """Every registered scorer name (the four first built-ins of ``flowkern.plan.RANKS`` where it still exists)."""
    from flowkern import plan
    from flowkern.scorers import scorer_names

    return list(dict.fromkeys(tuple(getattr(plan, "RANKS", ())) + tuple(scorer_names())))


def ranks_before_decoder(name: str) -> bool | str:
    """Whether scorer ``name`` can rank at layer 0, or why it cannot be built."""
    from flowkern.scorers import get_scorer

    try:
        scorer = get_scorer(name)
    except REFUSALS as exc:
        if name in ("attention", "random", "none", "grid"):  # the built-ins of a build without their Scorer classes
            return name != "attention"
        return f"{name} cannot be built from its name alone (its registered presets are measured): {exc}"
    return bool(getattr(scorer, "before_decoder", True))


def one_stage_keep(schedule_rows: list[int], first_layer: int, prompt: int, image: int) -> int:
    """The image tokens a single stage at ``first_layer`` keeps so that its average rows per layer equal the
    schedule's (rounded to the nearest count)."""
    n = len(schedule_rows)
    text = prompt - image
    k = (sum(schedule_rows) - first_layer * prompt) / (n - first_layer) - text
    return max(0, min(image, round(k)))


def spec_name(spec: PruneSpec) -> str:
    if spec.schedule is not None:
        return "schedule " + ",".join(f"{layer}:{keep}" for layer, keep in spec.schedule) + f" {spec.rank}"
    return f"L{spec.layer} keep {spec.keep} {spec.rank}"


def plan_variants(args: argparse.Namespace) -> tuple[dict[str, Variant], dict]:
    """The variants of one batch size (deduplicated by setting) and which section reads which variant."""
    variants: dict[str, Variant] = {}

    def add(name: str, spec: PruneSpec | str | None, new_tokens: int = 1) -> str:
        variants.setdefault(name, Variant(name, spec, new_tokens))
        return name

    def pruned(spec: PruneSpec, new_tokens: int = 1) -> str:
        return add(spec_name(spec), spec, new_tokens)

    sections: dict[str, Any] = dict(unpruned=add("unpruned", None, args.new_tokens),
                                    flowkern=add("unpruned-flowkern", "flowkern", args.new_tokens))
    sections["removal"] = {r: pruned(PruneSpec(layer=0, keep=r, rank="none")) for r in REMOVAL_KEEPS}
    sections["scorers"] = {}
    for layer in args.scorer_layers:
        base = pruned(PruneSpec(layer=layer, keep=args.scorer_keep, rank="none"))
        for name in scorer_list():
            before = ranks_before_decoder(name)
            if isinstance(before, str):
                entry: Any = {"skipped": before}
            elif layer == 0 and not before:
                entry = {"skipped": f"{name} does not rank before the decoder: it needs layer >= 1"}
            else:
                try:
                    entry = pruned(PruneSpec(layer=layer, keep=args.scorer_keep, rank=name))
                except REFUSALS as exc:
                    entry = {"skipped": f"{type(exc).__name__}: {exc}"}
            sections["scorers"][(layer, name)] = (entry, base)
    try:
        sections["schedule"] = pruned(PruneSpec(schedule=SCHEDULE, rank=args.schedule_rank), args.new_tokens)
    except REFUSALS as exc:
        sections["schedule"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    return variants, sections


def add_one_stage(model: torch.nn.Module, variants: dict[str, Variant], sections: dict, inputs: dict,
                  args: argparse.Namespace) -> None:
    """The single stage with the schedule's measured average rows per layer (after the schedule's warm-up)."""
    sched = sections["schedule"]
    v = variants.get(sched) if isinstance(sched, str) else None
    if v is None or v.rows is None or v.skipped or v.failed:
        sections["one_stage"] = {"skipped": "the schedule it is compared with did not run"}
        return
    image = int((inputs["input_ids"][0] == model.config.image_token_index).sum())
    k = one_stage_keep(v.rows, SCHEDULE[0][0], int(inputs["input_ids"].shape[1]), image)
    spec = PruneSpec(layer=SCHEDULE[0][0], keep=k, rank=args.schedule_rank)
    name = spec_name(spec)
    variants.setdefault(name, Variant(name, spec, args.new_tokens))
    sections["one_stage"] = name
    warm_up(model, variants[name], inputs)


def section_rows(variants: dict[str, Variant], sections: dict, prompt: int) -> dict:
    """The batch's results, by section, from the measured variants."""
    base = variants[sections["unpruned"]]
    out: dict[str, Any] = dict(unpruned=timing(base, base), unpruned_flowkern=timing(variants[sections["flowkern"]],
                                                                                      base))
    out["removal"] = []
    for r, name in sections["removal"].items():
        t = timing(variants[name], base)
        row: dict[str, Any] = dict(keep=r, layer=0, rank="none", **t)
        if "skipped" not in t and "failed" not in t:
            pruned = t["rows_per_layer"][0]
            row.update(pruned_length=pruned, ideal=prompt / pruned, speedup_vs_ideal=t["prefill_speedup"] * pruned /
                       prompt, lm_speedup_vs_ideal=t["lm_speedup"] * pruned / prompt)
            row["meets_goal"] = row["speedup_vs_ideal"] >= GOALS["removal_speedup_vs_ideal_min"]
            row["lm_meets_goal"] = row["lm_speedup_vs_ideal"] >= GOALS["removal_speedup_vs_ideal_min"]
        out["removal"].append(row)
    out["scorers"] = []
    for (layer, name), (entry, base_name) in sections["scorers"].items():
        row = dict(scorer=name, layer=layer)
        ref = variants[base_name]
        if isinstance(entry, dict):
            row.update(entry)
        elif ref.skipped or ref.failed:
            row["skipped"] = f"the rank='none' reference at layer {layer}: {ref.skipped or ref.failed}"
        else:
            v = variants[entry]
            t = timing(v, base)
            row.update(t)
            if name == "none":
                row["reference"] = True
            elif "skipped" not in t and "failed" not in t:
                row["overhead"] = median_ratio(v.prefill, ref.prefill) - 1
                row["lm_overhead"] = median_ratio(v.lm, ref.lm) - 1
                row["meets_goal"] = row["overhead"] <= GOALS["scorer_overhead_max"]
        out["scorers"].append(row)
    for key in ("schedule", "one_stage"):
        entry = sections[key]
        out[key] = dict(entry) if isinstance(entry, dict) else timing(variants[entry], base)
    s, o = sections["schedule"], sections["one_stage"]
    if isinstance(s, str) and isinstance(o, str) and "prefill_s" in out["schedule"] and "prefill_s" in out["one_stage"]:
        vs, vo = variants[s], variants[o]
        out["schedule_vs_one_stage"] = dict(prefill_speedup=median_ratio(vo.prefill, vs.prefill),
                                            decode_speedup=median_ratio(vs.decode, vo.decode))
    return out


def measure_batch(model: torch.nn.Module, batch: int, text_tokens: int, args: argparse.Namespace) -> tuple[dict, int]:
    """Every variant at one batch size: (its results row, how many variants failed)."""
    inputs = make_inputs(model, batch, text_tokens)
    prompt = int(inputs["input_ids"].shape[1])
    variants, sections = plan_variants(args)
    for v in variants.values():
        warm_up(model, v, inputs)
    add_one_stage(model, variants, sections, inputs, args)
    measure(model, list(variants.values()), inputs, args.repeats)
    row = dict(batch=batch, prompt_tokens=prompt,
               image_tokens=int((inputs["input_ids"][0] == model.config.image_token_index).sum()),
               new_tokens=args.new_tokens, **section_rows(variants, sections, prompt))
    for v in variants.values():
        state = v.skipped and "skipped" or v.failed and "FAILED" or ""
        detail = f"{state}: {v.skipped or v.failed}" if state else (
            f"prefill {1e3 * statistics.median(v.prefill):8.1f} ms  lm {1e3 * statistics.median(v.lm):8.1f} ms")
        print(f"batch {batch} {v.name:42s} {detail}", flush=True)
    return row, sum(v.failed is not None for v in variants.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes (64 image tokens), 1 repeat")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4; --quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; --quick 1)")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="tokens generated in the schedule comparison (default 8; --quick 2)")
    ap.add_argument("--scorer-layers", default="2,0", help="layers of the scorer overheads (default 2,0)")
    ap.add_argument("--scorer-keep", type=float, default=0.25, help="keep fraction of the scorer overheads")
    ap.add_argument("--schedule-rank", default="attention", help="the scorer of the schedule comparison")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>-prune-methods.json")
    args = ap.parse_args()
    args.batches = [int(b) for b in (args.batches or ("2" if args.quick else "1,4")).split(",")]
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.new_tokens = args.new_tokens or (2 if args.quick else 8)
    args.scorer_layers = [int(x) for x in args.scorer_layers.split(",")]
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    load_before = os.getloadavg()[0]  # a shared machine: say how busy it was
    model, text_tokens = build(args.quick)
    rows, failed = [], 0
    for batch in args.batches:
        row, n_failed = measure_batch(model, batch, text_tokens, args)
        rows.append(row)
        failed += n_failed
        gc.collect()
    setup = dict(dtype="float32", quick=args.quick, repeats=args.repeats, scorers=scorer_list(),
                 scorer_keep=args.scorer_keep, scorer_layers=args.scorer_layers,
                 schedule=[list(s) for s in SCHEDULE], schedule_rank=args.schedule_rank, goals=GOALS,
                 definitions=DEFINITIONS, load_average_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                 model=model_summary(model, "prune-methods-quick" if args.quick else "prune-methods"))
    report = make_report(device_label("cpu"), "cpu", with_transformers=True, setup=setup, results=rows)
    write_report(report, args.out, "prune-methods", markdown_table)
    if failed:
        sys.exit(f"{failed} variant(s) failed: see 'failed' in the results")


DEFINITIONS = dict(
    prefill_s="median wall time of the prefill forward (vision tower + language model), flowkern.timer.ForwardTimer",
    lm_prefill_s="median wall time of the language model's forward at the prefill (hooks on it)",
    prefill_speedup="median over rounds of unpruned prefill_s / this prefill_s (lm_speedup: the same of lm_prefill_s)",
    rows_per_layer="rows (sequence positions, hidden fillers of padded batches included) each decoder layer computed "
                   "on at the prefill, from forward hooks on the decoder layers",
    average_rows_per_layer="sum of rows_per_layer over the N decoder layers / N (the 'average token count per "
                           "layer' the schedule and its one-stage equivalent share)",
    ideal="prompt_tokens / pruned_length (pruned_length: the rows decoder layer 0 computes on)",
    speedup_vs_ideal="prefill_speedup / ideal (lm_speedup_vs_ideal: lm_speedup / ideal; goal >= 0.8: meets_goal, "
                     "lm_meets_goal)",
    overhead="median over rounds of prefill_s(scorer) / prefill_s(rank='none', same layer and keep) - 1 "
             "(lm_overhead: the same of lm_prefill_s; goal <= 0.05)",
    decode_tok_s="batch * decode steps / decode seconds (new_tokens - 1 steps after the prefill)",
    skipped="this build refused the setting (NotImplementedError / ValueError), or its stage did not shorten "
            "the sequence: no measurement",
)


def fmt(x: dict, key: str, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if key not in x else format(scale * x[key], spec)


def why_not(x: dict) -> str | None:
    """``skipped: <reason>`` / ``FAILED: <error>`` for a table cell, or None for a measured entry."""
    if "skipped" in x:
        return f"skipped: {x['skipped']} |"
    return f"FAILED: {x['failed']} |" if "failed" in x else None


def markdown_table(report: dict) -> str:
    """Three tables: removal before the decoder, scorer overheads, the schedule vs one stage."""
    m = report["model"]
    lines = [llava_caption(report) + f"{m['image_tokens_per_image']} image tokens per image, "
             f"{report['results'][0]['prompt_tokens']}-token prompt; medians of {report['repeats']} rounds", "",
             "| batch | keep | rows | ideal | prefill ms | speed-up | speed-up / ideal | LM ms | LM speed-up | "
             "LM speed-up / ideal |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        u = r["unpruned"]
        lines.append(f"| {r['batch']} | unpruned | {r['prompt_tokens']} | | {fmt(u, 'prefill_s', '.1f', 1e3)} | | | "
                     f"{fmt(u, 'lm_prefill_s', '.1f', 1e3)} | | |")
        for x in r["removal"]:
            cells = why_not(x) or (
                f"{x['pruned_length']} | {x['ideal']:.2f} | {1e3 * x['prefill_s']:.1f} | {x['prefill_speedup']:.2f}x | "
                f"{x['speedup_vs_ideal']:.2f} | {1e3 * x['lm_prefill_s']:.1f} | {x['lm_speedup']:.2f}x | "
                f"**{x['lm_speedup_vs_ideal']:.2f}** |")
            lines.append(f"| {r['batch']} | {x['keep']} | {cells}")
    lines += ["", f"Scorer overhead: prefill with the scorer / with `rank=\"none\"` - 1, keep {report['scorer_keep']}",
              "", "| batch | layer | scorer | prefill ms | overhead | LM overhead |", "|---:|---:|---|---:|---:|---:|"]
    for r in report["results"]:
        for x in r["scorers"]:
            cells = why_not(x) or (f"{1e3 * x['prefill_s']:.1f} | " + (
                "(reference) | |" if x.get("reference") else
                f"**{x['overhead']:+.1%}** | {x['lm_overhead']:+.1%} |"))
            lines.append(f"| {r['batch']} | {x['layer']} | `{x['scorer']}` | {cells}")
    stages = ", ".join(f"{a}:{k}" for a, k in report["schedule"])
    lines += ["", f"Schedule {stages} vs one stage at layer {report['schedule'][0][0]} with the same average rows "
              f"per layer (rank `{report['schedule_rank']}`), {report['results'][0]['new_tokens']} new tokens", "",
              "| batch | setting | average rows per layer | prefill ms | prefill speed-up | decode tok/s | "
              "decode speed-up |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        for what, x in (("unpruned", r["unpruned"]), ("schedule", r["schedule"]), ("one stage", r["one_stage"])):
            if what == "one stage" and "spec" in x:
                what = f"one stage, keep {x['spec']['keep']}"
            cells = why_not(x) or (
                f"{x['average_rows_per_layer']:.1f} | {1e3 * x['prefill_s']:.1f} | {x['prefill_speedup']:.2f}x | "
                f"{fmt(x, 'decode_tok_s', '.1f')} | {fmt(x, 'decode_speedup')}x |")
            lines.append(f"| {r['batch']} | {what} | {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
