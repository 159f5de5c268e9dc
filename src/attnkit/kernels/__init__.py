"""Hand-written kernels, imported lazily by the fast paths that use them (never at ``import attnkit``)."""
