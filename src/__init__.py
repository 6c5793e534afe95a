import os
from pathlib import Path

# configs/paths/default.yaml resolves paths.root_dir from PROJECT_ROOT: set here, every way of running an entry
# point (as a script, with `python -m`, or imported by a test) composes the same paths.
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
