"""What works on each model family: the one support table that ``flowkern info`` prints and docs/models.md shows
(tests/hf/test_families.py checks that the page holds exactly this table).

The statuses: "tested" (oracle tests on tiny random-weight models in the suite), "same code, untested", "refused:
<why>" (an error that says so, before any work) or a short qualification. The family facts themselves live in
:mod:`flowkern.hf.models`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Support", "SUPPORT", "support_table"]


@dataclass(frozen=True)
class Support:
    """One row of the support table: a family (or a model flowkern refuses) and what works on it.

    ``trace`` / ``prune`` / ``cam`` / ``knockout`` / ``eval``: "tested" (tiny-model oracle tests; ``eval``: ``flowkern
    eval`` on a saved tiny model with the family's own processor, batches answering as one by one), "same code,
    untested", "refused: <why>" or a short qualification.
    """

    name: str
    model_type: str
    example: str
    trace: str
    prune: str
    cam: str
    knockout: str = "same code, untested"
    eval: str = "same code, untested"


_SW = "refused: sliding-window layers (the kernel's window counts key slots, not positions)"
_TILES = "tested (maps per tile + the global image; marker tokens are text)"
_OWN = "tested (its own processor)"
_TV = "tested where torchvision imports (its processor requires it)"
_HYBRID = dict(
    trace="tested: full-attention layers; linear-attention layers NaN (not measured)",
    prune="tested at the prefill (linear layers run on the narrowed sequence); when='decode' refused (a recurrent "
          "state cannot give a token back)",
    cam="tested (runs, on the grid; site='attention' refused on linear-attention layers)",
    knockout="tested: full-attention layers; linear-attention layers refused (no edges to cut)", eval=_TV)
SUPPORT: tuple[Support, ...] = (
    Support("LLaVA-1.5", "llava", "llava-hf/llava-1.5-7b-hf", "tested (+ CLI)", "tested (+ CLI)", "tested (+ CLI)",
            "tested (+ CLI)", "tested (+ CLI, lmms-eval)"),
    Support("LLaVA-NeXT / 1.6", "llava_next", "llava-hf/llava-v1.6-vicuna-7b-hf", "tested; maps on the base view*",
            "tested", "tested (base + crops)", "tested"),
    Support("Qwen2-VL", "qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct", "tested (incl. video)", "tested",
            "tested (non-square grids)", "tested"),
    Support("Qwen2.5-VL", "qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct", "tested", "tested", "same code, untested"),
    Support("LLaVA-OneVision", "llava_onevision", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "tested*",
            "same code, untested", "same code, untested"),
    Support("Qwen3-VL", "qwen3_vl", "Qwen/Qwen3-VL-8B-Instruct", "tested", "refused below its DeepStack layers",
            "same code, untested"),
    Support("InternVL", "internvl", "OpenGVLab/InternVL3-8B-hf", "tested (maps per tile)", "same code, untested",
            "same code, untested"),
    Support("InstructBLIP, Vicuna", "instructblip", "Salesforce/instructblip-vicuna-7b",
            "tested (Q-Former queries: no spatial map)", "untested", "untested"),
    Support("Gemma 3", "gemma3", "google/gemma-3-4b-it",
            "tested (sliding-window layers, bidirectional image blocks)", _SW, "tested (runs, on the grid)",
            "tested (with the sliding windows and image blocks)", _OWN),
    Support("PaliGemma", "paligemma", "google/paligemma-3b-mix-224",
            "tested (bidirectional image + prefix block)", "tested", "tested (runs, on the grid)",
            "tested (with the image + prefix block)", _OWN),
    Support("Mistral 3 (Pixtral)", "mistral3", "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
            "tested (rows with [IMG_BREAK] / [IMG_END]: separators count as text, not grid cells)", "tested",
            "tested (runs, on the grid)", "tested (separators are text)", _TV),
    Support("LLaVA-OneVision-1.5", "llava_onevision1_5", "lmms-lab/LLaVA-OneVision-1.5-8B-Instruct",
            "tested (transformers 5.25+)", "tested", "tested (runs, on the grid)", "tested", _TV),
    Support("Idefics3", "idefics3", "HuggingFaceM4/Idefics3-8B-Llama3",
            _TILES, "tested", "tested (runs, on the grid)", "tested (marker tokens are text)",
            _OWN + "; on transformers 5.17 its image processor needs torchvision"),
    Support("SmolVLM", "smolvlm", "HuggingFaceTB/SmolVLM-Instruct",
            _TILES, "tested", "tested (runs, on the grid)", "tested (marker tokens are text)",
            "tested where torchvision and num2words import (its processor requires them)"),
    Support("Qwen3.5", "qwen3_5", "-", **_HYBRID),
    Support("Qwen3.5-MoE", "qwen3_5_moe", "-", **_HYBRID),
    Support("Gemma 4", "gemma4", "google/gemma-4-e2b-it",
            "tested (sliding-window layers, bidirectional image blocks, KV-shared layers; images of any size); "
            "segment_flow refused (KV-shared layers compute the last query row only)",
            "refused: KV-shared layers reuse earlier layers' keys / values (and sliding-window layers)",
            "tested (runs, on the grid; layers before the KV-shared ones)", "tested (incl. the KV-shared layers)", _TV),
    Support("PaliGemma 2", "paligemma", "google/paligemma2-3b-mix-224",
            "refused: Gemma 2 attention logit softcapping", "refused (softcapping)", "same code, untested",
            "refused (softcapping)", "same code, untested"),
    Support("InstructBLIP, Flan-T5", "instructblip", "Salesforce/instructblip-flan-t5-xl",
            "refused: encoder-decoder language model", "refused", "refused", "refused", "refused"),
    Support("Qwen-VL (original)", "qwen", "Qwen/Qwen-VL-Chat", "refused: needs trust_remote_code", "refused",
            "refused", "refused", "refused"),
    Support("Shikra", "-", "shikras/shikra-7b-delta-v1", "refused: delta weights + its own code, no transformers class",
            "refused", "refused", "refused", "refused"),
    Support("InternVL remote-code exports", "internvl_chat", "OpenGVLab/InternVL2-8B",
            "refused: needs trust_remote_code; use the -hf exports", "refused", "refused", "refused", "refused"),
)
"""Every family flowkern supports and the models it refuses, with what works (docs/models.md shows this table)."""


def support_table() -> str:
    """:data:`SUPPORT` as a Markdown table (what ``flowkern info`` prints and docs/models.md holds)."""
    rows = ["| family (`model_type`) | example checkpoint | trace | prune | cam | knockout | eval |",
            "|---|---|---|---|---|---|---|"]
    for r in SUPPORT:
        rows.append(f"| {r.name} (`{r.model_type}`) | {r.example} | {r.trace} | {r.prune} | {r.cam} | {r.knockout} "
                    f"| {r.eval} |")
    return "\n".join(rows)
