"""Development tools that live beside the flowkern package, not in it (run from the repository root)."""
