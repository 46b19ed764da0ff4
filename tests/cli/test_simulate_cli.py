"""`lossd simulate` from the command line: the options are checked in the parser (named, one line, exit 2), a
server that is not there is named by its URL, and the progress bar counts iterations."""

import subprocess
import sys

import pytest

from lossd.simulate import CASES_PER_POINT, POINTS, build_cases

from ..conftest import free_port


def _simulate(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lossd.cli", "simulate", *args], capture_output=True, text=True,
                          timeout=timeout)


def _error_line(r) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip().splitlines()[-1]


def test_cases_beyond_the_papers_are_refused_before_anything_is_drawn(tmp_path):
    # 1,000,000,000 cases used to draw cases / 343 anchor centres and run out of memory
    line = _error_line(_simulate("--cases", "1000000000", "--out", str(tmp_path / "s"), "--local", timeout=30))
    assert "--cases" in line and "1,715,000" in line
    assert "--cases" in _error_line(_simulate("--cases", "1715001", "--out", str(tmp_path / "s"), timeout=30))
    assert not (tmp_path / "s").exists()


def test_build_cases_refuses_more_than_the_paper_has():
    assert POINTS * CASES_PER_POINT == 1_715_000
    with pytest.raises(ValueError, match="1,715,000"):
        build_cases(1_715_001)
    with pytest.raises(ValueError, match="seed"):
        build_cases(343, seed=-1)
    assert len(build_cases(1_715_000)) == 1_715_000  # the bound itself is allowed


@pytest.mark.parametrize("option, value, words", [("--seed", "-1", [">= 0"]), ("--seed", "x", ["whole number"]),
                                                   ("--shards", "1000", ["at most 64"]),
                                                   ("--cases", "0", ["> 0"])])
def test_options_are_named_in_their_errors(tmp_path, option, value, words):
    line = _error_line(_simulate(option, value, "--out", str(tmp_path / "s"), timeout=30))
    assert f"argument {option}" in line and all(w in line for w in words), line


def test_a_server_that_is_not_there_is_named(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    r = _simulate("--server", url, "--cases", "343", "--iterations", "2", "--losses", "iou", "--out",
                  str(tmp_path / "s"), "--no-progress")
    line = _error_line(r)
    assert len(r.stderr.strip().splitlines()) == 1
    assert url in line and "lossd serve" in line and "--local" in line


def test_progress_counts_iterations_not_shard_steps(tmp_path):
    r = _simulate("--local", "--cases", "686", "--iterations", "20", "--shards", "2", "--losses", "iou", "--out",
                  str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    assert "20/20" in r.stderr and "40/40" not in r.stderr, r.stderr[-500:]
    assert "iteration" in r.stderr


@pytest.mark.parametrize("args, words", [
    (["--losses", ""], ["argument --losses", "one or more"]),
    (["--losses", " , "], ["argument --losses", "one or more"]),
    (["--map", ""], ["argument --map", "one or more"]),
    (["--iterations", "100000000"], ["argument --iterations", "at most 100,000"]),
    (["--local", "--server", "http://127.0.0.1:9"], ["argument --server", "not allowed with argument --local"]),
])
def test_options_that_cannot_work_together_or_at_all_are_refused(tmp_path, args, words):
    line = _error_line(_simulate(*args, "--out", str(tmp_path / "s"), timeout=30))
    assert all(w in line for w in words), line
    assert not (tmp_path / "s").exists()


def test_an_out_that_is_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = _simulate("--local", "--losses", "iou", "--cases", "343", "--iterations", "2", "--out",
                  str(tmp_path / "afile"), "--no-progress", timeout=60)
    assert _error_line(r) == (f"lossd simulate: error: --out {tmp_path / 'afile'}: cannot create the output folder: "
                              "File exists"), r.stderr


@pytest.mark.parametrize("map_", ["nope", "ciou"])  # no such loss; a loss that is not run
def test_a_map_of_losses_that_do_not_run_is_refused_before_any_work(tmp_path, map_):
    out = tmp_path / "s"
    r = _simulate("--local", "--losses", "iou", "--map", map_, "--cases", "343", "--iterations", "2", "--out",
                  str(out), "--no-progress", timeout=60)
    line = _error_line(r)
    assert f"--map {map_}: not among the losses of this run (iou)" in line, line
    assert not list(out.glob("*.json"))


def test_a_loss_named_twice_runs_once(tmp_path):
    out = tmp_path / "s"
    r = _simulate("--local", "--losses", "iou,iou", "--cases", "343", "--iterations", "2", "--out", str(out),
                  "--no-progress", timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and '"iou"' in rows[0], r.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_cuda_device_without_a_gpu_is_one_line(tmp_path):
    line = _error_line(_simulate("--local", "--device", "cuda", "--losses", "iou", "--cases", "343", "--out",
                                 str(tmp_path / "s"), timeout=60))
    assert line == "lossd simulate: error: --device cuda: torch sees no CUDA GPU here; use cpu or auto"
