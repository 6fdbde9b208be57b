"""Request and response models, one module per API (``common``: what they share)."""
