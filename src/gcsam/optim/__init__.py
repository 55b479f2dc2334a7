"""The optimizer layer, torch alone: :class:`~gcsam.optim.sam.SharpnessAwareOptimizer` and its
siblings, the cheap :mod:`~gcsam.optim.modes`, the rho :mod:`~gcsam.optim.schedules`, and what
they are made of (the functional core, gradient centralization, BatchNorm freezing, DDP and
FSDP2). Every other layer builds on this one; it imports none of them."""
