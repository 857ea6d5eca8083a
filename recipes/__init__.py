"""Recipes installed with jepa-forge (package data); see `jepa recipe list`."""
