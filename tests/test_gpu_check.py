"""eval/gpu_check.py cannot rot: its --dry-run runs every section on the CPU, as the device machine would run it,
without the packages that machine lacks (gguf, lm_eval, datasets, compressed-tensors)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABSENT_ON_DEVICE = ["gguf", "lm_eval", "datasets", "compressed_tensors"]
BLOCKER = f'''
import sys
from importlib.abc import MetaPathFinder

class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_DEVICE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the device machine)")

sys.meta_path.insert(0, Absent())
'''


def test_dry_run_reports_every_section_without_the_optional_packages(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)  # also loaded by the llm-sparsify children
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    blocked = subprocess.run([sys.executable, "-c", "import gguf"], env=env, capture_output=True, text=True)
    assert "absent on the device machine" in blocked.stderr  # the blocker works, so the check below means something
    out = tmp_path / "gpu_check.md"
    run = subprocess.run([sys.executable, "eval/gpu_check.py", "--dry-run", "--out", str(out),
                          "--workdir", str(tmp_path / "work")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = out.read_text()
    assert report.strip() in run.stdout  # the printed table is the written one
    for heading in ("**Correctness", "**Speed and memory", "**2:4 inference"):
        assert heading in report, report
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ")]
    fp32 = [row for row in rows if row[1] == "float32"]
    # CPU fp32 against itself: equal, on the tiny Llama (3 recipes) and the tiny Mixtral (2), its experts included
    assert len(fp32) == 5 and all(row[2] == "100.0000%" for row in fp32), report
    assert report.count("**Correctness") == 2 and "tiny Mixtral" in report
    speed = [row for row in rows if row[0].lstrip("| ") in ("wanda-50", "sparsegpt-50")]
    assert len(speed) == 2 and all(row[-1].startswith("pass") for row in speed), report
    not_run = report.split("**Not run**")[1]
    assert "semi-structured sparse kernels need a CUDA GPU" in not_run  # said, not silently skipped
    assert "correctness:" not in not_run and "speed:" not in not_run, not_run  # no section failed
