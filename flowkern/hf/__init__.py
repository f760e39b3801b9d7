"""Hugging Face integration: the only flowkern package that imports transformers (docs/architecture.md).

- :mod:`flowkern.hf.session`: the one session between a model and every analysis (trace, prune, cam, timers):
  attention switching and restoring, forward-call watching, KV-cache key maps, per-layer state pushed down, row
  events handed to the listeners.
- :mod:`flowkern.hf.attention`: the ``"flowkern"`` attention + mask functions (:func:`register`): read the pushed
  layer state, emit one row event.
- :mod:`flowkern.hf.calls`: one outermost forward call, normalised (cache, past length, 2D mask, layout inputs).
- :mod:`flowkern.hf.sites`: hooks at decoder-layer sites for an analysis that reads activations and their
  gradients (LLaVA-CAM).
- :mod:`flowkern.hf.models`: one adapter per model family (every model-specific constant lives there).
- :mod:`flowkern.hf.support`: what works on each family (the table ``flowkern info`` prints and docs/models.md shows).
- :mod:`flowkern.hf.segments`: token -> system/image/user/generated labels, image grid metadata.
- :mod:`flowkern.hf.compat`: every version-dependent transformers internal (cache keyword, cache layout, mask
  shapes, ...), with a table of what changed in which release; the only module that reads them.
- :mod:`flowkern.hf.reuse`: one computation reused across generate calls on the same inputs (the layers below a
  pruning layer, the image encoding), for a sweep's points.
- :mod:`flowkern.hf.loading`: load a model and its processor from local files (never the network).
- :mod:`flowkern.hf.inputs`: images and prompts -> the model's inputs, one builder for 1..B prompts.
- :mod:`flowkern.hf.tiny`: the one tiny-model builder (tests, benchmarks, the demo model).

Importing this package registers the attention implementation, so ``model.set_attn_implementation(
{"text_config": "flowkern"})`` works right after ``import flowkern.hf``.
"""

from flowkern.hf import compat
from flowkern.hf.attention import ATTENTION_NAME, flowkern_attention_forward, flowkern_attention_mask, register
from flowkern.hf.models import ADAPTERS, ModelAdapter, get_adapter, supported_model_types
from flowkern.hf.segments import NUM_SEGMENTS, SEGMENT_NAMES, ImageGrid, image_token_index, label_prompt

register()
compat.warn_if_untested()  # once per process: a transformers release outside TESTED_TRANSFORMERS

__all__ = [
    "ATTENTION_NAME",
    "ADAPTERS",
    "ImageGrid",
    "ModelAdapter",
    "NUM_SEGMENTS",
    "SEGMENT_NAMES",
    "flowkern_attention_forward",
    "flowkern_attention_mask",
    "get_adapter",
    "image_token_index",
    "label_prompt",
    "register",
    "supported_model_types",
]
