import sys
from pathlib import Path

# the benchmarks' helper modules (timing, whole_iteration) live beside their scripts, outside the package
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
