"""bench/gpu_smoke.py, the first thing a user runs on a GPU machine, runs here too (its CPU fallback) so it
cannot rot: every stage ok with 1 process and with 2 under torchrun, all stages in one process group."""
from conftest import run_script


def test_gpu_smoke_runs_every_stage_with_one_and_two_processes(tmp_path):
    for nproc in (None, 2):
        table = tmp_path / f"smoke_{nproc}.md"
        run_script("bench/gpu_smoke.py", "--out", table, "--work", tmp_path / f"work_{nproc}", nproc=nproc)
        rows = [row for row in table.read_text().splitlines() if row.startswith("| ") and "---" not in row]
        assert len(rows) == 14 and all("| ok |" in row for row in rows[1:]), table.read_text()
