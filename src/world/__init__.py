"""The grounded-safety world, a plug-in (src/plugins.py): importing the package registers its picture drawer and
its benchmark with the floors below."""

from src.world import benchmark, world  # noqa: F401  (each registers what it adds when imported)
