import sys
from pathlib import Path

# tests/launch.py is a plain helper module; make it importable as `launch`.
sys.path.insert(0, str(Path(__file__).parent))
