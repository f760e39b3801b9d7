"""flowkern: see and exploit how information flows through vision-language models.

Public API (DESIGN.md §3): :func:`segment_attention`, :func:`key_attention_mass`.
"""

from flowkern.ops import key_attention_mass, segment_attention

__all__ = ["segment_attention", "key_attention_mass"]
__version__ = "0.1.0"
