"""Train the demo model: a tiny LLaVA-1.5-layout model on the synthetic shapes world.

.. code-block:: console

    nice -n 10 python -m flowkern.demo.train --out flowkern/demo/model --seed 0   # 18-27 min on a shared 2-core CPU

What it builds (:func:`write_initial`, through :func:`flowkern.hf.tiny.save_tiny_llava`): a
``LlavaForConditionalGeneration`` with a CLIP vision tower (96 x 96 pixels, 12 x 12 patches -> 64 image tokens,
3 layers, width 96), LLaVA-1.5's two-layer GELU MLP projector and a Llama language model (8 decoder layers,
width 128, 4 heads), a word-level tokenizer over the shapes vocabulary (:func:`flowkern.eval.shapes.vocabulary`),
a CLIP image processor and a chat template in LLaVA-1.5's layout *with its system prompt*:
``<system prompt> USER : <image> <question> ASSISTANT :`` (so system / image / user segments exist as in the paper).

Training data are drawn on the fly, example ``i`` from ``random.Random(f"train:{seed}:{i}")``: a scene and one of
the four task analogues (POPE yes/no, SQA multiple choice, TextVQA label reading, caption), with the prompts the
:mod:`flowkern.eval` loaders build, so evaluation sees exactly the training format. Loss: next-token cross-entropy on
the answer and ``</s>`` (each example weighted by ``1 / sqrt(answer tokens)``, so captions do not drown the one-word
answers), plus an auxiliary dense loss on the projector output (the image tokens the language model reads): each image
token must point, by cosine similarity with the language model's own input embeddings, to the words of what lies
under its patch -- its colour word, its shape word, its label character (``##K`` for the second character of a
two-character label) -- or to a learned "nothing" vector (:func:`flowkern.eval.shapes.patch_targets`). Image tokens
thus start out near the words the answers use, and the language model learns to read them in minutes instead of
hours. (A first run with plain linear heads instead, 26 min, came out image-blind: POPE 50 %.) The "nothing" vectors
are a training aid and are not saved.

Reproducible from ``--seed`` with the same torch version and ``--threads`` (float summation order depends on both).
The files written are exactly what ``save_pretrained`` writes for the model and ``LlavaProcessor`` (config.json,
generation_config.json, model.safetensors, tokenizer files, processor / chat template files) plus
``training.json`` (arguments, losses, run time).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowkern.eval import chair, pope, sqa, textvqa
from flowkern.eval import shapes as world

__all__ = ["VISION", "TEXT", "TASK_MIX", "CHAT_TEMPLATE", "write_initial", "answer_ids", "training_example",
           "encode", "train", "main"]

VISION: dict[str, Any] = dict(image_size=96, patch_size=12, hidden_size=96, intermediate_size=384,
                              num_hidden_layers=3, num_attention_heads=4)
"""The CLIP vision tower: 8 x 8 = 64 image tokens (the CLS token is dropped, as in LLaVA-1.5)."""

TEXT: dict[str, Any] = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
                            num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
"""The Llama language model."""

TASK_MIX: dict[str, float] = {"pope": 0.3, "sqa": 0.3, "textvqa": 0.15, "caption": 0.25}
"""Share of each task analogue in the training stream."""

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

_POPE_ANSWER = {"yes": "Yes", "no": "No"}


def write_initial(out: str | Path, seed: int) -> None:
    """Write the untrained model, tokenizer, image processor and chat template to ``out`` (random weights drawn
    after ``torch.manual_seed(seed)``)."""
    from flowkern.hf.tiny import save_tiny_llava

    save_tiny_llava(out, vision=VISION, text=TEXT, words=world.vocabulary(), filler=0,
                    chat_template=CHAT_TEMPLATE, seed=seed)


def answer_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of an answer: whitespace words of the vocabulary; a two-character label missing from it becomes
    its first character and the ``##`` continuation of the second (decoded without a space).

    Raises:
        ValueError: a word the vocabulary cannot spell.
    """
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    for word in text.split():
        if word in vocab:
            ids.append(vocab[word])
        elif len(word) == 2 and word[0] in vocab and f"##{word[1]}" in vocab:
            ids += [vocab[word[0]], vocab[f"##{word[1]}"]]
        else:
            raise ValueError(f"answer word {word!r} is not in the demo vocabulary")
    return ids


def training_example(seed: int, index: int) -> dict[str, Any]:
    """Training example ``index`` of stream ``seed``: ``task``, ``scene``, ``image`` (PIL, JPEG round trip for
    TextVQA like its files), ``prompt`` (the loaders' user text) and ``answer``."""
    rng = random.Random(f"train:{seed}:{index}")
    task = rng.choices(list(TASK_MIX), weights=list(TASK_MIX.values()))[0]
    scene = world.make_scene(rng, label=True if task == "textvqa" else None, seed=f"train:{seed}:{index}")
    image = world.render(scene)
    if task == "pope":
        split = rng.choice(["random", "adversarial", "popular"])
        obj, label = rng.choice(world.pope_questions(scene, rng, _UNIFORM)[split])
        prompt, answer = world.pope_question_text(obj) + pope.PROMPT_SUFFIX, _POPE_ANSWER[label]
    elif task == "sqa":
        p = world.sqa_problem(scene, rng)
        prompt, answer = sqa.build_prompt(p["question"], p["choices"], p["hint"]), chr(ord("A") + p["answer"])
    elif task == "textvqa":
        question, _ = world.textvqa_question(scene, rng)
        prompt, answer = textvqa.build_prompt(question), scene.label.text
        image = world.jpeg_roundtrip(image)
    else:
        prompt, answer = chair.PROMPT, world.caption_text(scene)
    return {"task": task, "scene": scene, "image": image, "prompt": prompt, "answer": answer}


class _Uniform(dict):
    """A ``Counter`` stand-in whose ranking is random per call (training's *popular* negatives: any absent pair)."""

    def get(self, key: Any, default: Any = None) -> float:  # noqa: D102 - dict API
        return random.random()


_UNIFORM = _Uniform()


def encode(processor: Any, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A right-padded training batch: ``input_ids``, ``attention_mask``, ``pixel_values``, ``labels`` (-100 on
    the prompt and padding) and ``weights`` (per example, ``1 / sqrt(answer tokens)``).

    The prompt goes through the processor exactly as at inference (chat template with the generation prompt, the
    image placeholder expanded to the image tokens), then the answer ids and ``</s>`` are appended.
    """
    tok = processor.tokenizer
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex["prompt"]}]}],
        add_generation_prompt=True, tokenize=False) for ex in examples]
    enc = processor(images=[ex["image"] for ex in examples], text=texts, return_tensors="pt", padding=True)
    rows, labels, weights = [], [], []
    for k, ex in enumerate(examples):
        prompt_ids = enc["input_ids"][k][enc["attention_mask"][k].bool()].tolist()
        ans = answer_ids(tok, ex["answer"]) + [tok.eos_token_id]
        rows.append(prompt_ids + ans)
        labels.append([-100] * len(prompt_ids) + ans)
        weights.append(1.0 / math.sqrt(len(ans)))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    label_t = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[k, :len(r)] = torch.tensor(r)
        label_t[k, :len(r)] = torch.tensor(lab)
        mask[k, :len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": enc["pixel_values"],
            "labels": label_t, "weights": torch.tensor(weights)}


def _patch_batch(examples: Sequence[dict[str, Any]], grid: int) -> dict[str, torch.Tensor]:
    targets = [world.patch_targets(ex["scene"], grid) for ex in examples]
    return {k: torch.tensor([t[k] for t in targets]) for k in ("color", "shape", "char", "char_second")}


def _aux_loss(feats: torch.Tensor, targets: dict[str, torch.Tensor], cands: dict[str, list[int]],
              nothing: torch.nn.ParameterDict, embeddings: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    """Mean over colour / shape / character of the patch-wise cross-entropy of ``scale * cos(image token, word)``
    over ["nothing", candidate words]; the second character of a two-character label is the ``##`` word."""
    f = torch.nn.functional.normalize(feats.reshape(-1, feats.shape[-1]), dim=-1)
    total = feats.new_zeros(())
    for key, ids in cands.items():
        words = torch.cat([nothing[key][None], embeddings[ids]], dim=0)
        logits = scale * f @ torch.nn.functional.normalize(words, dim=-1).T
        target = targets[key].reshape(-1)
        if key == "char":
            target = torch.where(targets["char_second"].reshape(-1).bool() & (target > 0),
                                 target + len(world.LABEL_CHARS), target)
        total = total + torch.nn.functional.cross_entropy(logits, target)
    return total / len(cands)


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(out: str | Path, *, seed: int = 0, steps: int = 1200, batch_size: int = 32, lr: float = 1.5e-3,
          warmup: int = 60, aux_weight: float = 0.5, threads: int = 1, log_every: int = 25) -> dict[str, Any]:
    """Train the demo model into ``out`` (see the module docstring); returns the ``training.json`` record."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(threads)
    out = Path(out)
    start = time.time()
    write_initial(out, seed)
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    model.train()
    grid = VISION["image_size"] // VISION["patch_size"]
    width = TEXT["hidden_size"]
    torch.manual_seed(seed + 1)
    vocab = processor.tokenizer.get_vocab()
    cands = {"color": [vocab[c] for c in world.COLORS], "shape": [vocab[s] for s in world.SHAPES],
             "char": [vocab[c] for c in world.LABEL_CHARS] + [vocab[f"##{c}"] for c in world.LABEL_CHARS]}
    nothing = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.randn(width) * 0.02) for k in cands})
    embed = model.get_input_embeddings()
    captured: dict[str, torch.Tensor] = {}
    projector = model.model.multi_modal_projector
    hook = projector.register_forward_hook(lambda _m, _i, o: captured.__setitem__("image", o))
    params = list(model.parameters()) + list(nothing.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)
    history = []
    data_time = 0.0
    index = 0
    for step in range(steps):
        t0 = time.time()
        examples = [training_example(seed, index + k) for k in range(batch_size)]
        index += batch_size
        batch = encode(processor, examples)
        targets = _patch_batch(examples, grid)
        data_time += time.time() - t0
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100,
            reduction="none").view(shift_labels.shape)
        per_example = token_loss.sum(1) * batch["weights"]
        lm_loss = per_example.sum() / (shift_labels != -100).sum(1).float().mul(batch["weights"]).sum()
        feats = captured.pop("image").reshape(batch_size, grid * grid, -1)
        aux = _aux_loss(feats, targets, cands, nothing, embed.weight)
        loss = lm_loss + aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            elapsed = time.time() - start
            rec = {"step": step, "loss": round(loss.item(), 4), "lm": round(lm_loss.item(), 4),
                   "aux": round(aux.item(), 4), "lr": round(opt.param_groups[0]["lr"], 6),
                   "elapsed_s": round(elapsed, 1)}
            history.append(rec)
            eta = elapsed / (step + 1) * (steps - step - 1)
            print(f"step {step:5d}/{steps}  loss {rec['loss']:.4f}  lm {rec['lm']:.4f}  aux {rec['aux']:.4f}  "
                  f"lr {rec['lr']:.2e}  {elapsed / 60:.1f} min  eta {eta / 60:.1f} min", flush=True)
    hook.remove()
    model.eval()
    tok = processor.tokenizer
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out)
    record = {
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "aux_weight": aux_weight,
        "threads": threads, "examples": index, "task_mix": TASK_MIX, "train_seconds": round(time.time() - start, 1),
        "data_seconds": round(data_time, 1), "torch": torch.__version__, "python": platform.python_version(),
        "parameters": sum(p.numel() for p in model.parameters()), "history": history,
        "command": "python -m flowkern.demo.train " + " ".join(sys.argv[1:]),
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m flowkern.demo.train --out DIR --seed S``."""
    p = argparse.ArgumentParser(prog="python -m flowkern.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output directory (the model is written here)")
    p.add_argument("--seed", type=int, default=0, help="weights and data stream seed (default 0)")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps (default 1200)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (default 1.5e-3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared or 2-core machine one thread is faster; the "
                        "result depends on it)")
    args = p.parse_args(argv)
    record = train(args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   threads=args.threads)
    print(f"trained {record['parameters'] / 1e6:.2f} M parameters in {record['train_seconds'] / 60:.1f} min; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
