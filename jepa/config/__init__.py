"""Recipes: schema, loading, overrides and error rendering."""

from .load import Resolved, find_recipe, list_recipes, load_recipe, parse_override
from .schema import Recipe

__all__ = ["Recipe", "Resolved", "find_recipe", "list_recipes", "load_recipe", "parse_override"]
