"""fmplexd: the backbone daemon. It owns the backbone weights, every task's extension slot, the
scheduler and the executor; it never runs tenant code (see docs/architecture.md)."""
__version__ = "0.1.0"
