"""Model families (one folder each) and their registry: see pipeline/families/registry.py.

Importing this package registers the built-in families."""

from pipeline.families import dense  # noqa: F401  (registers "dense")
from pipeline.families.registry import Family, LayerShape, Projection, families, family_of, get_family

__all__ = ["Family", "LayerShape", "Projection", "families", "family_of", "get_family"]
