"""What the ``flowkern`` subcommands share: user errors, argument groups, loading a model and its inputs.

Every command module of :mod:`flowkern.cli` imports from here (and from the library), never from a sibling command
module or from the package's ``__init__``, so the commands load in any order and on their own:

- errors: :class:`UsageError` (one line on stderr, exit 2) and :func:`user_errors`, which turns the
  ``FileNotFoundError`` / ``ValueError`` / ``ImportError`` of the steps a user can fix into one;
  :func:`error_line` prints a message on a line of its own, also after a progress bar cut short by Ctrl-C
  (:func:`track_stderr`, which :func:`flowkern.cli.main` runs every command under);
- argument groups: :func:`add_model_arguments` (``flow``, ``generate``, ``cam``: one prompt on a model; every
  ``--model`` goes through :func:`model_argument`, so ``demo`` names the shipped model),
  :func:`add_device_arguments`, :func:`add_task_arguments` and :func:`add_answer_arguments` (``eval``, ``sweep``:
  a benchmark's questions), and the pruning options of every command from one table (:data:`PRUNE_FLAGS`):
  :func:`add_prune_arguments`, :func:`check_prune_arguments`, :func:`spec_from_args` (a
  :class:`flowkern.plan.PruneSpec`), :func:`prune_from_args` and :func:`parse_keep`;
- from arguments to work: :func:`load_from_args` (:class:`LoadedInputs`), :func:`check_output_dir`, :func:`output_path`,
  :func:`parse_layers`, :func:`config_from_args` (an engine's config dataclass from the same-named options), and
  :func:`summary_text` (the metrics summary ``score`` and ``eval`` print).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flowkern.demo import resolve_model, shadowed_demo
from flowkern.eval import TASKS
from flowkern.plan import PRUNE_OPTIONS, RANKS, WHENS, PruneSpec, parse_schedule
from flowkern.plan import parse_keep as plan_parse_keep

__all__ = [
    "UsageError",
    "user_errors",
    "error_line",
    "check_counts",
    "run_resumable",
    "track_stderr",
    "add_model_arguments",
    "model_argument",
    "add_device_arguments",
    "add_task_arguments",
    "add_answer_arguments",
    "PRUNE_FLAGS",
    "add_prune_arguments",
    "check_prune_arguments",
    "spec_from_args",
    "prune_from_args",
    "parse_keep",
    "LoadedInputs",
    "load_from_args",
    "check_output_dir",
    "output_path",
    "parse_layers",
    "check_layers_early",
    "config_from_args",
    "summary_text",
]

# ----------------------------------------------------------------------------------------------------------
# errors


class UsageError(Exception):
    """A mistake the user can fix (missing file, unsupported model, bad option): one line on stderr, exit 2."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn ``FileNotFoundError``, ``ValueError`` and ``ImportError`` raised inside into :class:`UsageError`.

    Wrap only the steps whose failures are the user's to fix (argument checks, loading, building inputs), not the
    analysis itself, so that bugs keep their tracebacks.
    """
    try:
        yield
    except UsageError:
        raise
    except FileNotFoundError as exc:
        msg = str(exc) if exc.args and not exc.filename else f"{exc.filename}: {exc.strerror or exc}"
        raise UsageError(msg) from exc
    except (ValueError, ImportError) as exc:
        raise UsageError(str(exc)) from exc


class _LineTracker:
    """``sys.stderr`` seen through: every write is passed on, and :attr:`line_open` says whether the last one left
    a line unfinished (a progress bar draws ``\\r<bar>`` without a newline). Set before the write and settled after
    it, so an interrupt between the two can only err towards an extra line break, never towards a missing one."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.line_open = False

    def write(self, text: str) -> int:
        if text:
            self.line_open = True
        n = self.stream.write(text)
        if text:
            self.line_open = not text.endswith(("\n", "\r"))
        return n

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, ...
        return getattr(self.stream, name)


@contextlib.contextmanager
def track_stderr() -> Iterator[None]:
    """Inside, ``sys.stderr`` remembers whether its current line is unfinished, for :func:`error_line` (progress
    bars made inside write through it), and flowkern's input warnings (:class:`flowkern.hf.inputs.InputWarning`) are
    printed as one ``flowkern: warning: ...`` line each. Restored on exit (unless something replaced it meanwhile)."""
    import warnings

    from flowkern.hf.inputs import InputWarning

    tracker = _LineTracker(sys.stderr)
    sys.stderr = tracker
    default_show = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, InputWarning):  # flowkern's own: one line, without a source line
            error_line(f"flowkern: warning: {' '.join(str(message).split())}")
        else:
            default_show(message, category, *args, **kwargs)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        if sys.stderr is tracker:
            sys.stderr = tracker.stream


def error_line(message: str) -> None:
    """Print ``message`` on stderr on a line of its own: after a line break when the current line is unfinished
    (a progress bar that a Ctrl-C stopped between drawing itself and ending its line; see :func:`track_stderr`)."""
    if getattr(sys.stderr, "line_open", False):
        sys.stderr.write("\n")
    print(message, file=sys.stderr)


_Result = TypeVar("_Result")


def check_counts(counts: Mapping[str, int | None]) -> None:
    """Raise :class:`UsageError` naming the first count flag below 1 (``counts``: flag -> value, None = not given)."""
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: expected an integer >= 1")


def run_resumable(command: str, out: Any, work: Callable[[], _Result]) -> _Result | None:
    """``work()`` of a resumable command (sweep, knockout, compare): an input the eval refuses becomes a
    :class:`UsageError`; Ctrl-C prints one line saying the answers so far stay in ``out`` and returns None (the
    command then exits 130).

    Args:
        command: the subcommand's name, for the line. out: its output folder. work: what it runs.
    """
    from flowkern.eval.run import EvalUsageError

    try:
        return work()
    except EvalUsageError as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        error_line(f"flowkern {command}: interrupted; answers so far are kept in {out}, rerun the same command to "
                   "resume")
        return None


# ----------------------------------------------------------------------------------------------------------
# argument groups


MODEL_HELP = "hub id (already in the Hugging Face cache; never downloaded) or local directory"


def model_argument(text: str) -> str:
    """``--model``: what to load (:func:`flowkern.demo.resolve_model`: ``demo`` is the shipped model's folder, with a
    warning when a ``./demo`` exists too, which ``--model ./demo`` loads).

    Raises:
        argparse.ArgumentTypeError: ``demo`` in an install without the model files.
    """
    note = shadowed_demo(text)
    if note:
        print(f"flowkern: warning: {note}", file=sys.stderr)
    try:
        return resolve_model(text)
    except FileNotFoundError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_device_arguments(parser: argparse.ArgumentParser, *, torchrun: bool = False) -> None:
    """Add ``--device`` (default auto) and ``--dtype`` (default auto); ``torchrun``: say what a process of a
    ``torchrun`` job uses."""
    where = " (under torchrun: cuda:LOCAL_RANK)" if torchrun else ""
    parser.add_argument("--device", default="auto", help=f"auto (cuda if available), cpu, cuda or cuda:N{where}")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights dtype (auto: float32 on CPU, the checkpoint's dtype on CUDA)")


def add_model_arguments(
    parser: argparse.ArgumentParser, *, prompt: bool = True, max_new_tokens: int | None = 16
) -> None:
    """Add ``--model --image --prompt --device --dtype`` (and ``--max-new-tokens`` unless None) to a subparser."""
    parser.add_argument("--model", required=True, type=model_argument, help=MODEL_HELP)
    parser.add_argument("--image", required=True, nargs="+", metavar="PATH",
                        help="input image(s); heatmaps are drawn for the first one")
    if prompt:
        parser.add_argument("--prompt", required=True,
                            help="the question; wrapped in the model's chat template with an image slot, unless it "
                                 "already contains the image placeholder (e.g. <image>)")
    add_device_arguments(parser)
    if max_new_tokens is not None:
        parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                            help=f"answer length limit, greedy decoding (default {max_new_tokens})")


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model --task --data --images``: which model answers which benchmark's questions (``eval``,
    ``sweep``)."""
    parser.add_argument("--model", required=True, type=model_argument, help=MODEL_HELP)
    parser.add_argument("--task", required=True, metavar="TASK", help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--data", required=True, type=Path, metavar="PATH",
                        help="the task's official files, as for `flowkern score --data`; or the lmms-lab tables: "
                             "a parquet / Arrow file, a folder of them, or a dataset id in the local Hugging Face "
                             "cache (lmms-lab/POPE; never downloaded)")
    parser.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="image folder (pope: COCO val2014, required; sqa: default <data>/images; textvqa: "
                             "default <data folder>/train_images; chair: default <data>/val2014)")


def add_answer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--limit --batch-size --max-new-tokens --strict --split --ocr``: how the questions are answered and
    scored (``eval``, ``sweep``)."""
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="answer only the first N questions")
    parser.add_argument("--batch-size", type=int, default=1, metavar="B",
                        help="questions per generate call (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="answer length limit (default 128; chair 512)")
    parser.add_argument("--strict", action="store_true",
                        help="pope only: score with lmms-eval's exact yes/no parsing (scoring only; answers "
                             "unchanged)")
    parser.add_argument("--split", default=None, metavar="SPLIT",
                        help="sqa: the pid_splits.json split (default test); parquet / dataset-id data: the "
                             "dataset's split or SUBSET/SPLIT (e.g. adversarial, Full/popular; default: pope all "
                             "of subset default, sqa ScienceQA-IMG/test, textvqa validation, chair val)")
    parser.add_argument("--ocr", action="store_true", help="textvqa only: add the OCR tokens to the prompt")


# ----------------------------------------------------------------------------------------------------------
# pruning flags: one table (flow, generate, eval, sweep)


def parse_keep(text: str) -> int | float:
    """``--keep``: :func:`flowkern.plan.parse_keep` (``"0"`` / ``"64"``, ``"0.25"`` or ``"25%"``).

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    try:
        return plan_parse_keep(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_rank(text: str) -> str:
    """``--rank``: a registered scorer name (:func:`flowkern.scorers.scorer_names`)."""
    from flowkern.scorers import scorer_names

    names = tuple(dict.fromkeys(RANKS + scorer_names()))
    if text not in names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(names)}")
    return text


def parse_schedule_arg(text: str) -> tuple[tuple[int, int | float], ...]:
    """``--prune-schedule``: :func:`flowkern.plan.parse_schedule` as an argparse type."""
    try:
        return parse_schedule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


PRUNE_FLAGS: dict[str, dict[str, Any]] = {
    "layer": {"flag": "--prune-layer", "type": int, "metavar": "L",
              "help": "remove image tokens from decoder layer L on (0-based; the paper's layer L+1); off by default"},
    "keep": {"flag": "--keep", "type": parse_keep, "metavar": "K",
             "help": "image tokens kept per sample: 0 (drop all, default), a count (64) or a fraction (0.25, 25%%)"},
    "rank": {"flag": "--rank", "type": parse_rank, "metavar": "SCORER",
             "help": "which to keep, a scorer (flowkern info lists them): attention received from the last prompt "
                     "token at layer L-1 (default), random (seeded control), none (the first K), grid (uniform on "
                     "the image grid: control), ..."},
    "seed": {"flag": "--prune-seed", "type": int, "metavar": "N", "help": "seed of --rank random (default 0)"},
    "when": {"flag": "--prune-when", "choices": list(WHENS),
             "help": "prefill: layers >= L never see the removed tokens (default); decode: full prefill, then "
                     "the KV cache of layers >= L is compacted for the decode steps"},
    "schedule": {"flag": "--prune-schedule", "type": parse_schedule_arg, "metavar": "L:K,...",
                 "help": "multi-stage pruning instead of --prune-layer/--keep: at each layer L keep K of the "
                         "surviving image tokens (e.g. 2:0.5,8:0.25,16:0.125)"},
    "merge": {"flag": "--prune-merge", "action": "store_const", "const": True,
              "help": "average each removed image token into its most similar kept one"},
}
"""The one table of pruning options: :class:`flowkern.plan.PruneSpec` field -> its flag and ``add_argument``
settings. The option's ``dest`` is :data:`flowkern.plan.PRUNE_OPTIONS` of the field (``--prune-layer`` ->
``args.prune_layer``); :func:`add_prune_arguments` is the only place that adds them to a parser."""


def add_prune_arguments(
    parser: argparse.ArgumentParser,
    *,
    fields: Sequence[str] = tuple(PRUNE_FLAGS),
    flags: Mapping[str, str] | None = None,
    defaults: bool = False,
) -> None:
    """Add the pruning options of :data:`PRUNE_FLAGS` to ``parser``, in one argument group.

    Args:
        fields: which :class:`~flowkern.plan.PruneSpec` fields get an option (default all: ``--prune-layer --keep
            --rank --prune-seed --prune-when``; pruning is then off unless --prune-layer is given).
        flags: other spellings of some fields' flags (``sweep``: ``{"seed": "--seed"}``).
        defaults: options default to :class:`~flowkern.plan.PruneSpec`'s values (a command without
            ``--prune-layer``); otherwise to None, so that :func:`check_prune_arguments` sees which were given.
    """
    unknown = sorted(set(fields) - set(PRUNE_FLAGS))
    if unknown:
        raise ValueError(f"fields: no pruning option {', '.join(unknown)} (known: {', '.join(PRUNE_FLAGS)})")
    spec = PruneSpec()
    g = parser.add_argument_group("image-token pruning (flowkern.prune)")
    for name in fields:
        settings = dict(PRUNE_FLAGS[name])
        flag = settings.pop("flag")
        flag = (flags or {}).get(name, flag)
        g.add_argument(flag, dest=PRUNE_OPTIONS[name], default=getattr(spec, name) if defaults else None, **settings)


def check_prune_arguments(args: argparse.Namespace) -> None:
    """Refuse pruning options given without ``--prune-layer`` (they would be silently ignored); with it, fill in the
    defaults of the others (``--keep 0 --rank attention --prune-seed 0 --prune-when prefill``). Call before loading a
    model; calling it again is harmless. A command without ``--prune-layer`` (``sweep``) is left as it is.

    Raises:
        UsageError: e.g. ``--keep 5`` without ``--prune-layer``.
    """
    layer, schedule = PRUNE_OPTIONS["layer"], PRUNE_OPTIONS["schedule"]
    if not hasattr(args, layer):
        return
    others = {name: dest for name, dest in PRUNE_OPTIONS.items() if name not in ("layer", "schedule")}
    if getattr(args, layer) is None and getattr(args, schedule, None) is None:
        given = [PRUNE_FLAGS[name]["flag"] for name, dest in others.items() if getattr(args, dest, None) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without "
                             "--prune-layer L (or --prune-schedule)")
        return
    if getattr(args, layer) is not None and getattr(args, schedule, None) is not None:
        raise UsageError("--prune-schedule replaces --prune-layer and --keep: give one of them")
    if getattr(args, schedule, None) is not None and getattr(args, others["keep"], None) is not None:
        raise UsageError("--prune-schedule gives each stage's keep: drop --keep")
    spec = PruneSpec()
    for name, dest in others.items():
        if getattr(args, dest, None) is None and not (name == "keep" and getattr(args, schedule, None) is not None):
            setattr(args, dest, getattr(spec, name))


def spec_from_args(args: argparse.Namespace) -> PruneSpec:
    """The :class:`~flowkern.plan.PruneSpec` of the options :func:`add_prune_arguments` added (after
    :func:`check_prune_arguments`); an option the command does not have keeps the field's default.

    Raises:
        UsageError: pruning options without ``--prune-layer``, or a bad value.
    """
    check_prune_arguments(args)
    values = {name: getattr(args, dest) for name, dest in PRUNE_OPTIONS.items()
              if getattr(args, dest, None) is not None}
    with user_errors():
        return PruneSpec(**values)


def prune_from_args(model: Any, args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """``flowkern.prune(model, ...)`` from the flags of :func:`add_prune_arguments`, or a null context when
    ``--prune-layer`` is not given. Use as ``with prune_from_args(model, args) as pruning: ...`` (``pruning`` is a
    :class:`flowkern.prune.Pruning` or None).

    Raises:
        UsageError: a bad combination (e.g. ``--rank attention`` with ``--prune-layer 0``).
    """
    spec = spec_from_args(args)
    if not spec.enabled:
        return contextlib.nullcontext()
    from flowkern.prune import prune

    with user_errors():
        try:
            return prune(model, spec)
        except NotImplementedError as exc:
            raise ValueError(str(exc)) from exc


# ----------------------------------------------------------------------------------------------------------
# from arguments to work


@dataclass
class LoadedInputs:
    """What :func:`load_from_args` returns: the model, its processor, the RGB images and the processor outputs."""

    model: Any
    processor: Any
    images: list
    inputs: Any

    @property
    def prompt_length(self) -> int:
        """Tokens in the prompt (``input_ids.shape[1]``)."""
        return int(self.inputs["input_ids"].shape[1])

    def decode(self, sequences: Any) -> str:
        """The answer text of the first sample of ``generate``'s output (prompt tokens removed)."""
        ids = self.inputs["input_ids"]
        seq = sequences[0]
        n = ids.shape[1]
        if seq.shape[0] >= n and bool((seq[:n].to(ids.device) == ids[0]).all()):
            seq = seq[n:]
        decoder = self.processor if hasattr(self.processor, "batch_decode") else self.processor.tokenizer
        return decoder.batch_decode(seq[None].cpu(), skip_special_tokens=True)[0].strip()


def load_from_args(args: argparse.Namespace) -> LoadedInputs:
    """Load the images (first, so a typo fails fast), the model and its processor, and build the inputs.

    Raises:
        UsageError: missing image / model directory, uncached hub id, unsupported model, prompt without an image slot.
    """
    from flowkern.hf.inputs import build_inputs, load_images
    from flowkern.hf.loading import load_model, position_range_message

    with user_errors():
        images = load_images(args.image)
        model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
        inputs = build_inputs(processor, model, images, getattr(args, "prompt", ""))
    loaded = LoadedInputs(model, processor, images, inputs)
    warning = position_range_message(model, loaded.prompt_length + int(getattr(args, "max_new_tokens", 0) or 0))
    if warning:
        print(f"flowkern {getattr(args, 'command', '')}: warning: {warning}", file=sys.stderr)
    return loaded


def check_output_dir(args: argparse.Namespace, name: str = "out") -> Path:
    """Validate a command's result folder (``args.<name>``, flag ``--<name>``) before any work, honouring
    ``--overwrite``; returns the absolute path.

    Raises:
        UsageError: an empty path, a file where the folder should be, a place that cannot be written (a probe entry
            is created and removed), a folder in use or of another command's kind, or a previous run's files without
            --overwrite.
    """
    from flowkern import _io

    with user_errors():
        return _io.check_output_dir(getattr(args, name), overwrite=getattr(args, "overwrite", False),
                                    what=f"--{name.replace('_', '-')}", kind=getattr(args, "command", None))


def output_path(text: str) -> Path | str:
    """The ``type`` of an ``--out`` option: a :class:`~pathlib.Path`, except that an empty text stays ``""`` (a
    ``Path("")`` would be the working directory) for :func:`flowkern.outdir.check_path` to refuse by name."""
    return Path(text) if text.strip() else text


def parse_layers(spec: str | None, num_layers: int, *, default_count: int = 8) -> list[int]:
    """Decoder layers from ``"0,4,8"`` (negative counts from the end), ``"all"``, or None/``"auto"``: up to
    ``default_count`` evenly spaced layers, the first and the last included.

    Raises:
        UsageError: a malformed spec or a layer outside ``[-num_layers, num_layers)``.
    """
    if spec is None or spec.strip().lower() == "auto":
        count = min(default_count, num_layers)
        if count <= 1:
            return [0]
        return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})
    if spec.strip().lower() == "all":
        return list(range(num_layers))
    layers = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            layer = int(part)
        except ValueError:
            raise UsageError(f"--layers {spec!r}: expected comma-separated integers, 'all' or 'auto'") from None
        if not -num_layers <= layer < num_layers:
            raise UsageError(f"--layers: layer {layer} is out of range; the model has {num_layers} decoder layers")
        layers.append(layer % num_layers)
    if not layers:
        raise UsageError(f"--layers {spec!r}: no layer given")
    return list(dict.fromkeys(layers))


def check_layers_early(args: argparse.Namespace) -> None:
    """Check ``args.layers`` (:func:`parse_layers`) before the model loads, against the decoder-layer count its
    config.json gives (no weights read; :func:`flowkern.eval.sweep.files.checkpoint_layers`); when that file does
    not say, the command checks it once the model is loaded.

    Raises:
        UsageError: a malformed spec or a layer out of range.
    """
    from flowkern.eval.sweep.files import checkpoint_layers

    num_layers = checkpoint_layers(args.model)
    if num_layers is not None:
        parse_layers(args.layers, num_layers)


_Config = TypeVar("_Config")


def config_from_args(cls: type[_Config], args: argparse.Namespace, **values: Any) -> _Config:
    """An engine's config dataclass (``EvalConfig``, ``SweepConfig``, ``DemoConfig``, ...) from the options of the
    same names: each field takes ``values[name]`` if given, else ``args.<name>`` unless that is missing or None
    (an option left unset keeps the field's default).

    Raises:
        TypeError: ``cls`` is not a dataclass, or ``values`` names a field it does not have.
    """
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(values) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    kwargs = {n: getattr(args, n) for n in names if n not in values and getattr(args, n, None) is not None}
    return cls(**kwargs, **values)


def summary_text(result: dict) -> str:
    """Human-readable lines of a task's metrics (a :meth:`flowkern.eval.tasks.base.Task.score` result): counts, parsing,
    the main metrics, POPE's per-split numbers."""
    task = result["task"]
    parts = [f"{task}: {result['n']} predictions scored"]
    if result.get("missing"):
        parts.append(f"{result['missing']} questions without a prediction (not scored)")
    if result.get("ignored"):
        parts.append(f"{result['ignored']} predictions ignored (questions outside the scored subset)")
    if "parsing" in result:
        parts.append(f"parsing {result['parsing']}")
    keys = {"pope": ("accuracy", "precision", "recall", "f1", "yes_ratio"), "chair": ("chair_s", "chair_i", "recall")}
    metrics = ", ".join(f"{k} {result[k]:.4f}" for k in keys.get(task, ("accuracy",)))
    lines = ["; ".join(parts), f"  {metrics}"]
    for split, m in result.get("splits", {}).items():
        lines.append(f"  {split}: " + ", ".join(f"{k} {m[k]:.4f}" for k in keys["pope"]) + f" (n={m['n']})")
    return "\n".join(lines)
