"""``benchmarks/native_round.py`` runs, and its fit explains what it measured.

The benchmark's figures belong in notes, not tests; this only keeps it working (it
drives ``_C.LeaderRounds`` directly, so a change to the rounds' frame format or
constructor would otherwise break it silently) and checks its fit on the plans it was
not fitted on, with a tolerance loose enough for a loaded machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "native_round.py"


def test_native_round_benchmark_runs_and_fits(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--rounds", "2", "--calls", "100", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert {r["partners"] for r in result["rows"]} >= set(range(1, 8))
    fit = result["fit"]
    assert fit["m"] > 0 and abs(fit["worst_check_error"]) < 0.5, proc.stdout
    assert set(result["predicted_us"]) == {"10.0", "30.0", "100.0"}
