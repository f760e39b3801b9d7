"""``python -m flowkern.cli ...`` (and ``torchrun ... -m flowkern.cli sweep ...``): the ``flowkern`` console script.

The package is imported once, as ``flowkern.cli``, so the :class:`flowkern.cli.common.UsageError` the commands raise
is the class :func:`flowkern.cli.main` catches.
"""

from flowkern.cli import entry

if __name__ == "__main__":
    entry()
