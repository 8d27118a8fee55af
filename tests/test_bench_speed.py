"""bench/train_speed.py's lock-step driver: every contender steps, every ratio is computed.

No timing is asserted here (timings belong to the benchmark, not to unit tests); this checks
that the benchmark runs end to end on the shipped model and reports what it claims to.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a minute or more: started first (conftest.py)

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_speed.py"


def test_lock_step_bench_reports_every_contender_and_ratio(tmp_path):
    out = tmp_path / "speed.json"
    # the smallest run that still has a warm-up round and more than one timed round, at 32x32, batch 2
    p = subprocess.run([sys.executable, str(BENCH), "--steps", "2", "--warmup", "1", "--threads", "1",
                        "--resolution", "32", "--batch", "2", "--rank", "4",
                        "--contenders", "reference", "difflora_standard", "difflora_addift", "difflora_lowmem",
                        "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["summary"]) == {"reference", "difflora_standard", "difflora_addift", "difflora_lowmem"}
    for c, s in r["summary"].items():
        assert s["steps_measured"] == 2, c  # warm-up rounds are not counted
        assert s["median_step_s"] > 0 and 0.1 < s["peak_gb"] < 24, (c, s)
    assert r["unet_train_gflop"] > 0.5  # the toy U-Net's forward+backward at 32x32, batch 2: 0.69
    ratios = r["ratios"]
    assert set(ratios) == {"difflora_standard_time / reference_time", "difflora_addift_time / reference_time",
                           "difflora_addift_time / difflora_standard_time", "difflora_standard_peak / reference_peak",
                           "difflora_lowmem_time / difflora_standard_time", "difflora_lowmem_peak / reference_peak"}
    std, ref = r["summary"]["difflora_standard"]["median_step_s"], r["summary"]["reference"]["median_step_s"]
    assert abs(ratios["difflora_standard_time / reference_time"]["ratio_of_medians"] - std / ref) < 1e-12
    assert "target difflora_standard_time / reference_time <= 0.8" in p.stdout
