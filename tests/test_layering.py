"""The package's layering holds: no import cycles, no import of a higher layer (bench/code_health.py)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_no_import_cycles_and_no_upward_imports():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "code_health.py"), "--longest", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "import cycles: 0" in result.stdout
    assert "imports of a higher layer: 0" in result.stdout
