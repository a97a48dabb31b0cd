"""splade-obs: a SPLADE trainer with first-class observability."""

__version__ = "0.1.0"
