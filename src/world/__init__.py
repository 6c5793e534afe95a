"""The grounded-safety world, a plug-in (src/plugins.py): importing the package registers its picture drawer, its
benchmark and its part of reproduce's comparison with the floors below."""

from src.world import benchmark, reproduction, world  # noqa: F401  (each registers what it adds when imported)
