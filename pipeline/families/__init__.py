"""Model families (one folder each) and their registry: see pipeline/families/registry.py.

Importing this package registers the built-in families."""

from pipeline.families import dense, moe  # noqa: F401  (register "dense", "moe")
from pipeline.families.registry import Family, LayerShape, Projection, families, family_of, get_family

__all__ = ["Family", "LayerShape", "Projection", "families", "family_of", "get_family"]
