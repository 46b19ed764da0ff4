"""lossd simulate: the paper's cases, the step, the paper code's gradients against the exact ones (lossd's and
finite differences), and the command end to end through a real server and in-process."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lossd import simulate as sim


def test_cases_follow_the_papers_protocol():
    full = sim.build_cases(seed=3)
    assert len(full) == 1_715_000 and full.points.shape == (5000, 2)
    a, t = full.anchors, full.targets
    assert np.allclose(t[:, :2], 10) and np.allclose(t[:, 2] * t[:, 3], 1)
    assert sorted(set(np.round(t[:, 2] / t[:, 3], 6))) == pytest.approx(sorted(sim.RATIOS))
    area = a[:, 2] * a[:, 3]  # anchors: 7 scales of the target's area (1) x 7 ratios
    assert sorted(set(np.round(area, 6))) == pytest.approx(sorted(sim.SCALES))
    assert sorted(set(np.round(a[:, 2] / a[:, 3], 6))) == pytest.approx(sorted(sim.RATIOS))
    r = np.hypot(full.points[:, 0] - 10, full.points[:, 1] - 10)
    assert r.max() <= 3 and 1.3 < np.median(r) < 2.9  # uniform in the disc: median radius 3 / sqrt(2)
    assert np.array_equal(a[full.point == 7][:, :2], np.repeat(full.points[7:8], 343, axis=0))
    part = sim.build_cases(700, seed=3)  # --cases: a prefix of the same cases
    assert np.array_equal(part.anchors, a[:700]) and np.array_equal(part.targets, t[:700])


def test_learning_rate_schedule():
    assert [sim.learning_rate(t) for t in (1, 160, 161, 180, 181, 200)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


def test_step_by_hand():
    # IoU of a 1x1 box in a concentric 2x2 one is 1/4: the step is 0.1 * (2 - 0.25) * grad
    state = np.array([[10.0, 10.0, 1.0, 1.0], [10.0, 10.0, 1.0, 1.0]])
    target = np.array([[10.0, 10.0, 2.0, 2.0], [12.0, 10.0, 1.0, 1.0]])
    grad = np.array([[1.0, 0.0, -2.0, 0.0], [0.0, 0.0, 10.0, 0.0]])
    send, err = np.zeros((2, 4), np.float32), np.zeros(2)
    total, clamped = sim.descend_step(state, target, grad, 0.1, send, err)
    assert state[0] == pytest.approx([10 - 0.175, 10, 1 + 0.35, 1])
    # apart (IoU 0): factor 2; w = 1 - 2 would be negative and is held at MIN_SIZE
    assert state[1] == pytest.approx([10, 10, sim.MIN_SIZE, 1]) and clamped == 1
    assert err == pytest.approx([0.175 + 0.65 + 1, 2 + 1 - sim.MIN_SIZE])
    assert total == pytest.approx(err.sum()) and np.array_equal(send, state.astype(np.float32))


def _finite_difference_ascent(engine, name, a, g, h=1e-6):
    out = np.zeros_like(a)
    for k in range(4):
        d = np.zeros_like(a)
        d[:, k] = h
        lp = engine.evaluate(name, a + d, g, box_format="cxcywh", dtype="float64").loss.numpy()
        lm = engine.evaluate(name, a - d, g, box_format="cxcywh", dtype="float64").loss.numpy()
        out[:, k] = -(lp - lm) / (2 * h)
    return out


@pytest.mark.parametrize("name", sim.PAPER_LOSSES)
def test_paper_gradients_fixed_are_the_exact_gradient(engine, name):
    cases = sim.build_cases(1029, seed=5)
    a, g = cases.anchors, cases.targets
    exact = -engine.evaluate(name, a, g, box_format="cxcywh", dtype="float64", reduction="sum").grad.numpy()
    fixed = sim.paper_ascent(name, a, g, frozenset(sim.PAPER_FIXES))
    assert fixed == pytest.approx(exact, abs=2e-6)
    # and against central differences of the loss values (not the engine's gradient); rows away from the kinks
    # (a side of one box within h of the other's) only, which 1029 random cases all are
    assert not np.allclose(sim.paper_ascent(name, a, g), exact, atol=1e-3)  # the paper's own: not exact
    if name == "ciou":  # alpha is held constant in the gradient (torchvision's rule), not in the values
        return
    fd = _finite_difference_ascent(engine, name, a[::7], g[::7])
    assert fixed[::7] == pytest.approx(fd, abs=1e-5)


def test_paper_code_moves_width_twice_as_fast():
    # overlapping boxes, IoU loss: the paper's code and the exact gradient agree on x, y; w, h are doubled
    a = np.array([[10.3, 9.8, 0.8, 1.1]])
    g = np.array([[10.0, 10.0, 1.0, 1.0]])
    paper, exact = sim.paper_ascent("iou", a, g), sim.paper_ascent("iou", a, g, frozenset({"half_wh"}))
    assert paper[0, :2] == pytest.approx(exact[0, :2]) and paper[0, 2:] == pytest.approx(2 * exact[0, 2:])


def test_descendable_losses():
    catalog = [{"name": "ciou", "kind": "box", "pred": "[N,4] boxes"}, {"name": "iou", "kind": "box", "pred": "[N,4]"},
               {"name": "iou_aware", "kind": "box", "pred": "[N,5]: ..."}, {"name": "l1", "kind": "regression",
               "pred": "[N]"}, {"name": "focal", "kind": "classification", "pred": "[N,C]"},
               {"name": "eiou", "kind": "box", "pred": "[N,4]"}]
    assert sim.descendable(catalog) == ["iou", "ciou", "eiou", "l1"]


def _simulate(args, out, **kw):
    return subprocess.run([sys.executable, "-m", "lossd.cli", "simulate", "--out", str(out), "--no-progress",
                           *args], capture_output=True, text=True, timeout=120, **kw)


def test_through_the_server_as_in_process(live_server, tmp_path):
    args = ["--losses", "iou,diou", "--cases", "686", "--iterations", "20"]
    remote = _simulate(["--server", live_server.http_url, *args], tmp_path / "remote")
    assert remote.returncode == 0, remote.stderr
    # in-process (the command's own function, without a second interpreter start)
    sim.run(losses=["iou", "diou"], cases=686, iterations=20, seed=0, out=tmp_path / "local", server=None,
            progress=False)
    for name in ("iou", "diou"):
        r = json.loads((tmp_path / "remote" / f"{name}.json").read_text())
        loc = json.loads((tmp_path / "local" / f"{name}.json").read_text())
        assert r["complete"] and r["iterations_done"] == 20 and len(r["error"]) == 21
        assert r["error"] == pytest.approx(loc["error"], rel=1e-5)  # same engine, over the wire or not
        cases = sim.build_cases(686)
        assert r["error"][0] == pytest.approx(np.abs(cases.anchors - cases.targets).sum())
    diou = json.loads((tmp_path / "remote" / "diou.json").read_text())["error"]
    assert all(b < a for a, b in zip(diou, diou[1:]))
    for f in ("table.csv", "table.json", "table.md", "error_vs_iteration.png", "error_vs_iteration.svg",
              "final_error_map.png", "summary.json"):
        assert (tmp_path / "remote" / f).stat().st_size > 0, f
    rows = json.loads((tmp_path / "remote" / "table.json").read_text())
    assert [r["loss"] for r in rows] == ["iou", "diou"] and rows[1]["error_at_16"] == diou[16]
    # a rerun reads finished losses back instead of recomputing them
    before = (tmp_path / "remote" / "iou.json").stat().st_mtime_ns
    again = sim.run(losses=["iou", "diou"], cases=686, iterations=20, seed=0, out=tmp_path / "remote",
                    server=live_server.http_url, progress=False)
    assert (tmp_path / "remote" / "iou.json").stat().st_mtime_ns == before
    assert [r["error_at_20"] for r in again["losses"]] == [r["error_at_20"] for r in rows]


def test_ctrl_c_keeps_what_was_done(live_server, tmp_path):
    out = tmp_path / "run"
    # -X faulthandler: if it hangs, SIGABRT below makes it print every thread's stack before it dies
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "lossd.cli", "simulate", "--server",
                             live_server.http_url, "--losses", "iou,giou", "--cases", "343", "--iterations", "100000",
                             "--out", str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            # SIGINT as in a terminal, also when the suite runs where it is ignored (a background
                            # job ignores it, and Python then installs no KeyboardInterrupt handler)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    # iou runs first; its curve so far is written every 2 s: interrupt once some of it is on disk
    started = False
    while time.monotonic() < deadline and proc.poll() is None and not started:
        try:
            started = json.loads((out / "iou.json").read_text())["iterations_done"] > 0
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"no exit 120 s after Ctrl-C (a curve was on disk: {started}); its threads:\n{err[-6000:]}")
    assert started, err
    assert proc.returncode == 130, err
    rec = json.loads((out / "iou.json").read_text())
    assert not rec["complete"] and rec["iterations_done"] > 0 and len(rec["error"]) == rec["iterations_done"] + 1
    assert not (out / "giou.json").exists()
    assert (out / "table.md").exists() and (out / "error_vs_iteration.png").exists()


def test_names_it_cannot_descend_are_refused_before_any_work(tmp_path):
    out = tmp_path / "sim"
    r = _simulate(["--local", "--losses", "giou,focal,nope", "--cases", "50", "--iterations", "2"], out)
    assert r.returncode == 2, r.stderr
    assert "cannot descend 'focal', 'nope'" in r.stderr and "giou" in r.stderr.split("these can be:")[1]
    assert "Traceback" not in r.stderr and not list(out.glob("*.json"))


def test_a_server_run_does_not_load_torch(tmp_path):
    """The client side of `lossd simulate --server` is numpy, numba and lossd_client: no torch (seconds of
    start-up and hundreds of MB)."""
    code = ("import sys\nfrom lossd.cli import main\n"
            f"rc = main(['simulate', '--server', 'http://127.0.0.1:9', '--losses', 'giou', '--cases', '50', "
            f"'--iterations', '2', '--out', {str(tmp_path / 'sim')!r}, '--no-progress'])\n"
            "print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False"], (r.stdout, r.stderr)
    assert "unavailable" in r.stderr and "Traceback" not in r.stderr
