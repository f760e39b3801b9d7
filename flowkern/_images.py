"""Decoding one image fully, for the input checks (PIL only: usable by the torch-free task loaders too).

:func:`decode_image` loads every pixel of a file or an in-memory stream, so a truncated file fails here and not in the
middle of a run, and refuses a header whose size PIL flags as a possible decompression bomb.
"""

from __future__ import annotations

import os
from typing import IO, Any

__all__ = ["ImageError", "decode_image"]


class ImageError(ValueError):
    """An image that cannot be used (missing, not an image, truncated, a decompression-bomb header): the message
    names the file (or the table cell)."""


def decode_image(source: str | os.PathLike[str] | IO[bytes], what: str, name: Any = None) -> Any:
    """The fully decoded image in ``source`` (pixels loaded, file closed).

    Args:
        source: a path, or a binary stream (an image stored in a table cell).
        what: the option it came from, first in the messages (``"--images"``, ``"--data:"``).
        name: how the messages name it (default: ``source``).

    Returns:
        the ``PIL.Image`` in its own mode (the caller converts it).

    Raises:
        ImageError: naming ``what`` and the image, for anything the decoder raises: data that is not an image, a
            file cut short, or a header whose size PIL refuses as a possible decompression bomb (over
            ``PIL.Image.MAX_IMAGE_PIXELS``; PIL only warns up to twice that, which is refused here too: such an
            image would cost gigabytes per copy).
    """
    import warnings

    from PIL import Image, ImageFile, UnidentifiedImageError

    label = source if name is None else name
    # a process-wide PIL switch that another library may have turned on (lmms-eval does, on import) would let a
    # truncated file load with grey pixels: the check decodes strictly whatever it says
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                im.load()  # the pixels stay usable once the file is closed
                return im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{what} {label}: refused as a possible decompression bomb ({exc}); PIL's limit is "
                         f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what} {label}: not a readable image (not an image format PIL knows)") from None
    except Exception as exc:  # a decoder fed damaged data raises OSError, SyntaxError, ValueError, zlib/struct errors
        reason = str(exc) or type(exc).__name__
        raise ImageError(f"{what} {label}: not a readable image ({reason})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
