"""Imported first by an entry point run as a script (``python src/train.py`` from any folder).

Python then puts the script's folder src/ on ``sys.path``, not the repository root, so ``src.*`` imports would
fail; this puts the root first. Imported as ``src.train`` (tests, ``python -m src.train``) the root is already on
``sys.path`` and this module is not used.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
