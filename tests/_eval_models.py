"""The tiny offline LLaVA the ``flowkern eval`` tests answer with (16 image tokens, 4 text layers, random weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from flowkern.hf.tiny import save_tiny_llava

WORDS = ("Is there a dog cat car in the image? Answer question using single word or phrase. yes no Yes No "
         "Please describe this detail. Context: A. B. with option's letter from given choices directly.").split()
assert len(set(WORDS)) == len(WORDS)  # each word listed once (word_tokenizer would merge a repeat)


def save_eval_llava(path: Path) -> Path:
    """A LLaVA-1.5 layout (CLIP 8x8 / patch 2, Llama 4 x 32) whose vocabulary has the benchmark prompts' words."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=2, projection_dim=32)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None, initializer_range=0.3)
    save_tiny_llava(path, vision=vision, text=text, words=WORDS)
    return path


def save_image(path: Path, seed: int) -> Path:
    """A small random RGB image (size varies with the seed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12 + seed % 5, 16, 3), dtype=np.uint8)).save(path)
    return path


def slowed_flowkern(module: str, argv: list[str], delay: float) -> list[str]:
    """The command line of ``flowkern ARGV`` in a subprocess whose ``<module>.generate_answers`` (``flowkern.eval.run``
    or ``flowkern.eval.sweep``) sleeps ``delay`` seconds per batch, so that a signal sent mid-run lands mid-run."""
    # SIGINT back to Python's default: a shell's background job (``cmd &``, nohup) starts with SIGINT ignored, and the
    # child would inherit that (the tests send Ctrl-C as a terminal would)
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"import {module} as m\n"
            "_gen = m.generate_answers\n"
            "def slow(*a, **k):\n"
            f"    time.sleep({delay})\n"
            "    return _gen(*a, **k)\n"
            "m.generate_answers = slow\n"
            "from flowkern.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    return [sys.executable, "-c", code, *argv]
