"""The summary table that ``benchmarks/gpu_check.sh`` prints last: one row per step with its status, its time and
a headline number read from the step's result file.

    python benchmarks/gpu_summary.py OUT_DIR [--device cuda|cpu]

Reads ``OUT_DIR/status.tsv`` (step, status, seconds, command) and the JSON / JUnit files the steps wrote; a step
without a known result file shows the last line of its log instead.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path


def _json(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def _tests(out: Path) -> str:
    root = ET.parse(out / "tests.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return f"{n - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped"


def _attention(out: Path) -> str:
    parts = []
    for r in _json(out, "attention")["results"]:
        if "flowkern_over_sdpa" in r:
            parts.append(f"{r['op'].split('_')[0]} {r['case']}: {r['flowkern_over_sdpa']:.2f}x SDPA")
        elif "flowkern_over_eager" in r:
            parts.append(f"{r['op'].split('_')[0]} {r['case']}: {r['flowkern_over_eager']:.3f}x eager")
    return "; ".join(parts)


def _visibility(out: Path) -> str:
    parts = []
    for r in _json(out, "visibility")["results"]:
        ratios = [f"{name} {r[key]:.2f}x" for key, name in (
            ("plain_over_baseline", "off/landed"), ("all_true_over_plain", "all-true/off"),
            ("plain_over_window", "window speed-up"), ("sdpa_window_over_window", "vs SDPA mask"),
            ("eager_knockout_over_knockout", "knockout vs eager")) if key in r]
        parts.append(f"S={r['s']}: " + ", ".join(ratios))
    return "; ".join(parts)


def _compact(out: Path) -> str:
    d = _json(out, "compact")
    fk = d["results"]["flowkern"]
    return (f"{fk['median_ms']:.2f} ms, {fk['GBps']:.0f} GB/s ({fk['pct_of_copy']:.0f}% of a copy), "
            f"{1 / d['flowkern_over_index_select']:.2f}x faster than index_select")


def _generate(out: Path) -> str:
    parts = []
    for r in _json(out, "generate")["results"]:
        p = r.get("prune-k0", {})
        if "prefill_speedup" in p:
            parts.append(f"B={r['batch']} prune k=0: prefill {p['prefill_speedup']:.2f}x, "
                         f"decode {p['decode_speedup']:.2f}x")
    return "; ".join(parts)


def _trace(out: Path) -> str:
    return "; ".join(f"{r['case']}: {r['time_flowkern_over_sdpa']:.2f}x SDPA, {r['time_flowkern_over_eager']:.2f}x "
                     "eager" for r in _json(out, "trace")["results"])


def _cam(out: Path) -> str:
    return "; ".join(f"{r['mode']} samples={r['samples']} batch={r['batch_size']}: {r['median_s']:.2f} s"
                     for r in _json(out, "cam")["results"])


HEADLINES: dict[str, Callable[[Path], str]] = {
    "tests": _tests, "attention": _attention, "visibility": _visibility, "compact": _compact, "generate": _generate,
    "trace": _trace, "cam": _cam,
}


def _last_log_line(out: Path, name: str) -> str:
    log = out / f"{name}.log"
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return lines[-1] if lines else "-"


def summarise(out: Path) -> str:
    """The Markdown summary of a gpu_check folder."""
    rows = ["| step | status | s | headline |", "|---|---|---:|---|"]
    for line in (out / "status.tsv").read_text().splitlines():
        name, status, seconds, _ = (line.split("\t") + ["", "", ""])[:4]
        headline = "-"
        if status == "passed" and name in HEADLINES:
            try:
                headline = HEADLINES[name](out)
            except (OSError, KeyError, ValueError, TypeError, AttributeError, ET.ParseError) as exc:
                headline = f"(no result: {type(exc).__name__}: {exc})"
        elif status != "skipped" or name not in HEADLINES:
            headline = _last_log_line(out, name)
        rows.append(f"| {name} | {status} | {seconds} | {headline[:300]} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    print(f"\n## gpu_check summary ({args.device})\n")
    print(summarise(args.out))


if __name__ == "__main__":
    main()
