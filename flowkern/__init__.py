"""flowkern: see and exploit how information flows through vision-language models.

Public API:

- ops (docs/ops.md): :func:`segment_attention`, :func:`key_attention_mass`, :func:`compact_`;
- Hugging Face analysis: :func:`trace` (per-layer attention shares of the answer tokens, :class:`Flow`);
- pruning: :func:`prune` (remove image tokens from layer L on, :class:`Pruning`), :func:`compact_cache_`;
- the logit lens: :func:`lens` (each layer's output through the final norm and LM head, :class:`Lens`);
- attention knockout: :func:`knockout` (cut segment -> segment edges in a window of layers, :class:`Knockout`);
- LLaVA-CAM: :func:`cam` (per-layer Grad-CAM over the image, SmoothGrad-averaged, :class:`Cam`);
- the embedded demo model: :func:`demo_model_path` (a tiny LLaVA trained on the synthetic shapes world).
"""

from flowkern._version import __version__ as __version__
from flowkern.cam import Cam, CamView, cam
from flowkern.demo import demo_model_path
from flowkern.knockout import Knockout, knockout
from flowkern.lens import Lens, lens
from flowkern.ops import compact_, key_attention_mass, segment_attention
from flowkern.prune import Pruning, compact_cache_, prune
from flowkern.trace import Flow, trace

__all__ = [
    "segment_attention", "key_attention_mass", "compact_", "trace", "Flow", "prune", "Pruning", "compact_cache_",
    "cam", "Cam", "CamView", "demo_model_path",
    "lens", "Lens",
    "knockout", "Knockout",
]
