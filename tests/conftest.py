"""Suite-wide checks."""

from collections import Counter
from pathlib import Path

# pytest imports test modules by their base name ("rootdir" mode): two test
# files with one name in different folders break collection of the whole suite.
_names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
_dupes = sorted(n for n, c in _names.items() if c > 1)
if _dupes:
    raise RuntimeError(f"test module names must be unique across tests/: {_dupes}")
