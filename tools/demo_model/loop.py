"""The demo model's training run: :func:`write_initial` (the untrained model, tokenizer, processor and template) and
:func:`train` (two stages on the training stream, then ``save_pretrained`` and ``training.json``).

Stage 1, **vision**: the vision tower and projector alone, on the dense patch loss (the language model's input
embeddings fixed), plus, with ``position_aids``, the column / row read-out of each image token; the tower's position
embeddings then start as a 2-D sine / cosine code. Stage 2, **full**: everything, on next-token cross-entropy over
the answer and ``</s>`` (each example's mean over its answer tokens), plus the patch loss, the attention guides
(:data:`~tools.demo_model.config.GUIDES` and, as configured, the names and compare guides) and the place / compare
read-outs. The matmuls run under bfloat16 autocast with ``precision="bf16"``. The guides and read-outs are training
aids only: the files written are a plain LLaVA.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flowkern import shapes as world
from flowkern.hf.compat import pretrained_kwargs
from tools.demo_model.config import (
    ATTENTION_HEADS,
    ATTENTION_LAYERS,
    CHAT_TEMPLATE,
    COMPARE_GUIDES,
    COMPARE_LAYER,
    GUIDES,
    NAMES_GUIDES,
    NAMES_PLACE_LAYER,
    PLACE_LAYER,
    PLACE_WEIGHT,
    POPE_TRAIN_SPLITS,
    POSITION_DIMS,
    POSITION_WEIGHT,
    TEXT,
    VISION,
    TrainConfig,
    check_init,
)
from tools.demo_model.data import TrainingStream
from tools.demo_model.losses import (
    PATCH_WORDS,
    attention_loss,
    cell_loss,
    grid_positions,
    learning_rate,
    patch_loss,
    position_loss,
)

__all__ = ["write_initial", "train"]


def write_initial(out: str | Path, seed: int) -> None:
    """Write the untrained model, tokenizer, image processor and chat template to ``out`` (random weights drawn
    after ``torch.manual_seed(seed)``)."""
    from flowkern.hf.tiny import save_tiny_llava

    save_tiny_llava(out, vision=VISION, text=TEXT, words=world.vocabulary(), filler=0,
                    chat_template=CHAT_TEMPLATE, seed=seed)


def train(out: str | Path, config: TrainConfig | None = None) -> dict[str, Any]:
    """Train the demo model into ``out`` with ``config`` (None: :class:`TrainConfig`'s defaults, the shipped
    recipe); returns the ``training.json`` record (the configuration, the loss curve, the run time).

    The files written are what ``save_pretrained`` writes for the model and ``LlavaProcessor`` plus
    ``training.json``. Reproducible from ``config.seed`` with the same torch version and ``config.threads`` (float
    summation order depends on both).

    Raises:
        FileNotFoundError: ``config.init`` holds no trained model (before anything is written).
    """
    config = TrainConfig() if config is None else config
    check_init(config.init)
    run = _Run(Path(out), config)
    run.vision_stage()
    run.full_stage()
    return run.save()


class _Run:
    """One training run's state: the model, the processor, the aids (the patch loss's "nothing" vectors, the
    read-out heads), the batch stream and the loss history."""

    def __init__(self, out: Path, config: TrainConfig) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        c = self.config = config
        self.out = out
        # bf16 autocast: matmuls in bfloat16 (2x faster on a CPU with AVX512-BF16), weights and optimizer in float32
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.precision == "bf16")
        # stage 1 is bound by drawing images: leave the worker its core
        torch.set_num_threads(max(1, c.threads - c.workers))
        self.start = time.time()
        write_initial(out, c.seed)
        self.processor = AutoProcessor.from_pretrained(out, local_files_only=True)
        # eager attention while training: the attention guide needs the probabilities.
        model = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True, dtype=torch.float32,
                                                              attn_implementation="eager", **pretrained_kwargs())
        self.grid = VISION["image_size"] // VISION["patch_size"]
        if c.init is not None:
            trained = LlavaForConditionalGeneration.from_pretrained(c.init, local_files_only=True,
                                                                    dtype=torch.float32, **pretrained_kwargs())
            model.load_state_dict(trained.state_dict(), strict=True)
            del trained
        elif c.position_aids:
            tower = model.model.vision_tower
            embeddings = getattr(tower, "vision_model", tower).embeddings
            with torch.no_grad():
                embeddings.position_embedding.weight.copy_(grid_positions(self.grid, VISION["hidden_size"],
                                                                          POSITION_DIMS))
        model.train()
        self.model = model
        width = TEXT["hidden_size"]
        torch.manual_seed(c.seed + 1)
        vocab = self.processor.tokenizer.get_vocab()
        self.cands = {key: [vocab[w] for w in words] for key, words in PATCH_WORDS.items()}
        self.nothing = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.randn(width) * 0.02) for k in self.cands})
        # the read-out heads exist only with the aids (creating them draws from the global RNG)
        self.heads = torch.nn.ModuleDict({"position": torch.nn.Linear(width, 2 * self.grid),
                                          "place": torch.nn.Linear(width, 2 * self.grid)} if c.position_aids else {})
        if c.names_compare:
            self.heads["compare"] = torch.nn.Linear(width, 2)
        self.guides = {**GUIDES, **(NAMES_GUIDES if c.names_guides else {}),
                       **(COMPARE_GUIDES if c.names_compare else {})}
        self.position_weight = POSITION_WEIGHT if c.position_aids else 0.0
        self.place_weight = PLACE_WEIGHT if c.position_aids else 0.0
        self.captured: dict[str, torch.Tensor] = {}
        self.hook = model.model.multi_modal_projector.register_forward_hook(
            lambda _m, _i, o: self.captured.__setitem__("image", o))
        self.history: list[dict[str, Any]] = []
        self.data_time = 0.0
        plan = [("vision", c.vision_steps, c.vision_batch_size), ("full", c.steps, c.batch_size)]
        stream = TrainingStream(self.processor, c.seed, self.grid, plan, c.task_mix, c.sqa_boost)
        self.batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=c.workers,
                                                        prefetch_factor=4 if c.workers else None))

    def _next(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        t0 = time.time()
        _, batch, targets = next(self.batches)
        self.data_time += time.time() - t0
        return batch, targets

    def _log(self, stage: str, step: int, total: int, t_stage: float, **losses: torch.Tensor) -> None:
        elapsed = time.time() - self.start
        rec = {"stage": stage, "step": step, **{k: round(v.item(), 4) for k, v in losses.items()},
               "elapsed_s": round(elapsed, 1)}
        self.history.append(rec)
        eta = (time.time() - t_stage) / (step + 1) * (total - step - 1)
        print(f"{stage} {step:5d}/{total}  " + "  ".join(f"{k} {v.item():.4f}" for k, v in losses.items())
              + f"  {elapsed / 60:.1f} min  eta {eta / 60:.1f} min", flush=True)

    def _patch_terms(self, batch_size: int, targets: dict[str, torch.Tensor], embeddings: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured image tokens ``[B, grid * grid, width]`` and the patch loss (+ the position read-out)."""
        feats = self.captured.pop("image").float().reshape(batch_size, self.grid * self.grid, -1)
        aux = patch_loss(feats, targets, self.cands, self.nothing, embeddings)
        if self.position_weight:
            aux = aux + self.position_weight * position_loss(feats, self.heads["position"], self.grid)
        return feats, aux

    def vision_stage(self) -> None:
        """Stage 1: the vision tower and projector on the patch loss (the language model's embeddings fixed)."""
        c, model = self.config, self.model
        vision_params = [p for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
        opt = torch.optim.AdamW(vision_params + list(self.nothing.parameters()) + list(self.heads.parameters()),
                                lr=c.vision_lr, betas=(0.9, 0.98), weight_decay=0.01)
        embeddings = model.get_input_embeddings().weight.detach()
        t_stage = time.time()
        for step in range(c.vision_steps):
            batch, targets = self._next()
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, c.vision_steps, c.vision_lr, c.warmup)
            with self.autocast:
                model.model.get_image_features(pixel_values=batch["pixel_values"])
            _, aux = self._patch_terms(c.vision_batch_size, targets, embeddings)
            opt.zero_grad(set_to_none=True)
            aux.backward()
            torch.nn.utils.clip_grad_norm_(vision_params, 1.0)
            opt.step()
            if step % c.log_every == 0 or step == c.vision_steps - 1:
                self._log("vision", step, c.vision_steps, t_stage, aux=aux)

    def full_stage(self) -> None:
        """Stage 2: everything, on the answer loss + the patch loss + the attention guides and read-outs."""
        c, model = self.config, self.model
        torch.set_num_threads(c.threads)
        params = list(model.parameters()) + list(self.nothing.parameters()) + list(self.heads.parameters())
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=c.lr, betas=(0.9, 0.98), eps=1e-8)
        t_stage = time.time()
        for step in range(c.steps):
            batch, targets = self._next()
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, c.steps, c.lr, c.warmup)
            losses = self._full_loss(batch, targets)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % c.log_every == 0 or step == c.steps - 1:
                self._log("full", step, c.steps, t_stage, **losses)

    def _full_loss(self, batch: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``loss`` (the total) and its terms ``lm``, ``aux`` (patch loss and read-outs), ``guide``."""
        c = self.config
        with self.autocast:
            output = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                pixel_values=batch["pixel_values"], output_attentions=c.attention_weight > 0,
                                output_hidden_states=self.place_weight > 0)
        logits = output.logits.float()
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100,
            reduction="none").view(shift_labels.shape)
        per_example = token_loss.sum(1) * batch["weights"]
        lm_loss = per_example.sum() / (shift_labels != -100).sum(1).float().mul(batch["weights"]).sum()
        _, aux = self._patch_terms(c.batch_size, targets, self.model.get_input_embeddings().weight)
        guide = (sum((attention_loss(output.attentions, batch[f"{name}_rows"], batch[f"{name}_keys"], layers,
                                     head_range)
                      for name, (layers, head_range) in self.guides.items()), lm_loss.new_zeros(()))
                 if c.attention_weight > 0 else lm_loss.new_zeros(()))
        layers = batch["place_layers"]
        keep = (layers == PLACE_LAYER) | (layers == NAMES_PLACE_LAYER) if c.names_place else layers == PLACE_LAYER
        if self.place_weight and keep.any():
            rows, cells = batch["place_rows"][keep], batch["place_cells"][keep]
            hidden = torch.stack([output.hidden_states[int(layer)][row, at]
                                  for layer, (row, at) in zip(layers[keep].tolist(), rows.tolist(), strict=True)])
            aux = aux + self.place_weight * cell_loss(self.heads["place"](hidden.float()), cells[:, 0], cells[:, 1])
        if c.names_compare and batch["compare_rows"].numel():
            rows = batch["compare_rows"]
            hidden = output.hidden_states[COMPARE_LAYER][rows[:, 0], rows[:, 1]].float()
            aux = aux + self.place_weight * torch.nn.functional.cross_entropy(self.heads["compare"](hidden),
                                                                              batch["compare_labels"])
        loss = lm_loss + c.aux_weight * aux + c.attention_weight * guide
        return {"loss": loss, "lm": lm_loss, "aux": aux, "guide": guide}

    def save(self) -> dict[str, Any]:
        """Save the model beside the initial files and write ``training.json``; returns its record."""
        self.hook.remove()
        model, tok, c = self.model, self.processor.tokenizer, self.config
        model.eval()
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
        model.save_pretrained(self.out)
        record = {
            "seed": c.seed, "steps": c.steps, "batch_size": c.batch_size, "lr": c.lr, "warmup": c.warmup,
            "aux_weight": c.aux_weight, "attention_weight": c.attention_weight,
            "attention_layers": list(ATTENTION_LAYERS), "attention_heads": ATTENTION_HEADS,
            "guides": {k: [list(v[0]), list(v[1])] for k, v in self.guides.items()},
            "vision_steps": c.vision_steps, "vision_batch_size": c.vision_batch_size,
            "vision_lr": c.vision_lr, "threads": c.threads, "init": None if c.init is None else str(c.init),
            "examples": c.vision_steps * c.vision_batch_size + c.steps * c.batch_size, "task_mix": c.task_mix,
            "workers": c.workers, "precision": c.precision, "pope_train_splits": list(POPE_TRAIN_SPLITS),
            "sqa_boost": None if c.sqa_boost is None else list(c.sqa_boost), "position_aids": c.position_aids,
            "position_dims": POSITION_DIMS if c.position_aids else 0, "position_weight": self.position_weight,
            "place_weight": self.place_weight, "names_place": c.names_place, "names_compare": c.names_compare,
            "train_seconds": round(time.time() - self.start, 1), "data_wait_seconds": round(self.data_time, 1),
            "torch": torch.__version__, "python": platform.python_version(),
            "parameters": sum(p.numel() for p in model.parameters()), "history": self.history,
            "command": "python -m tools.demo_model.train " + " ".join(sys.argv[1:]),
        }
        init_record = None if c.init is None else c.init / "training.json"
        if init_record is not None and init_record.is_file():  # the run this one continued, and so on
            record["init_record"] = json.loads(init_record.read_text())
            record["total_train_seconds"] = round(record["train_seconds"]
                                                  + record["init_record"].get("total_train_seconds",
                                                                              record["init_record"]["train_seconds"]),
                                                  1)
        (self.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        return record
