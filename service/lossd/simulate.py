"""`lossd simulate`: the regression simulation of the DIoU paper, run on lossd's own gradients.

Zheng et al., "Distance-IoU Loss: Faster and Better Learning for Bounding Box Regression" (AAAI 2020), Sec. 3:
7 targets centred at (10, 10), each of area 1, aspect ratios 1:4 ... 4:1; anchors centred at 5,000 points drawn
uniformly in the disc of radius 3 around (10, 10), each with 7 scales (0.5 ... 2 times the target's area) and the
same 7 aspect ratios: 5,000 x 7 x 7 x 7 = 1,715,000 regression cases. Each case descends for 200 iterations on
(x, y, w, h):

    B(t) = B(t-1) - lr(t) * (2 - IoU(B(t-1), B_gt)) * dL/dB(t-1)      lr = 0.1 (t <= 160), 0.01 (<= 180), 0.001

and the error at iteration t is the sum over all cases of |dx| + |dy| + |dw| + |dh| against the target.

The gradient dL/dB comes from the service (box_format="cxcywh", return_grad), through a running server
(lossd_client.LossClient) or in-process (Engine). Results are written per loss as each one finishes, so an
interrupted run keeps what was done and a rerun continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from numba import njit

# w:h of the targets and of the anchors, 1:4 ... 4:1, and the anchors' areas relative to the target's
RATIOS = (1 / 4, 1 / 3, 1 / 2, 1.0, 2.0, 3.0, 4.0)
SCALES = (0.5, 0.67, 0.75, 1.0, 1.33, 1.5, 2.0)
CENTRE = 10.0
RADIUS = 3.0
POINTS = 5000
CASES_PER_POINT = len(RATIOS) * len(SCALES) * len(RATIOS)
PAPER_LOSSES = ("iou", "giou", "diou", "ciou")
# the paper steps on a box that must stay a box; a width or height the step would take to zero or below is held
# at this size (counted in the results as `clamped`)
MIN_SIZE = 1e-6


@dataclass(frozen=True)
class Cases:
    """The regression cases: anchors and targets [N, 4] in cxcywh (float64), and each anchor's point index."""

    anchors: np.ndarray
    targets: np.ndarray
    point: np.ndarray
    points: np.ndarray  # [P, 2] anchor centres

    def __len__(self) -> int:
        return self.anchors.shape[0]


def build_cases(cases: int | None = None, seed: int = 0) -> Cases:
    """The paper's 1,715,000 cases (or the first `cases` of them, over ceil(cases / 343) points).

    Order: point, target ratio, anchor scale, anchor ratio (the paper's loop order)."""
    total = POINTS * CASES_PER_POINT
    if cases is not None and not 1 <= cases <= total:
        raise ValueError(f"cases must be between 1 and {total:,} (the paper's cases; N selects a prefix of them), "
                         f"got {cases:,}")
    if seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed}")
    n_points = POINTS if cases is None else max(1, math.ceil(cases / CASES_PER_POINT))
    rng = np.random.default_rng(seed)
    # all 5,000 drawn whatever `cases` is, so a small run is a prefix of the full one
    r = RADIUS * np.sqrt(rng.random(max(POINTS, n_points)))  # sqrt: uniform over the disc's area
    theta = 2 * np.pi * rng.random(max(POINTS, n_points))
    points = np.column_stack([CENTRE + r * np.cos(theta), CENTRE + r * np.sin(theta)])[:n_points]
    ratio = np.asarray(RATIOS)
    scale = np.asarray(SCALES)
    # index grids over (point, target ratio, scale, anchor ratio)
    p, tr, s, ar = (g.ravel() for g in np.meshgrid(np.arange(n_points), np.arange(len(RATIOS)),
                                                   np.arange(len(SCALES)), np.arange(len(RATIOS)), indexing="ij"))
    tw, th = np.sqrt(ratio[tr]), 1 / np.sqrt(ratio[tr])  # area 1
    area = scale[s]
    aw, ah = np.sqrt(area * ratio[ar]), np.sqrt(area / ratio[ar])
    anchors = np.column_stack([points[p, 0], points[p, 1], aw, ah])
    targets = np.column_stack([np.full(p.shape, CENTRE), np.full(p.shape, CENTRE), tw, th])
    n = anchors.shape[0] if cases is None else cases
    return Cases(anchors[:n].copy(), targets[:n].copy(), p[:n].copy(), points)


def learning_rate(t: int, iterations: int = 200) -> float:
    """The paper's schedule: 0.1 up to 80% of the iterations (160 of 200), 0.01 to 90%, then 0.001 (t from 1)."""
    if t <= round(0.8 * iterations):
        return 0.1
    if t <= round(0.9 * iterations):
        return 0.01
    return 0.001


@njit(cache=True, nogil=True, fastmath=False)
def _descend(state, target, grad, lr, send, case_error):  # pragma: no cover - compiled
    """One step for every case: state -= lr * (2 - IoU(state, target)) * grad, in place. Writes the new state
    (float32) to `send` for the next request and each case's |dx|+|dy|+|dw|+|dh| to case_error; returns their
    sum and how many widths/heights were held at MIN_SIZE."""
    total = 0.0
    clamped = 0
    for i in range(state.shape[0]):
        x, y, w, h = state[i, 0], state[i, 1], state[i, 2], state[i, 3]
        tx, ty, tw, th = target[i, 0], target[i, 1], target[i, 2], target[i, 3]
        iw = min(x + w / 2, tx + tw / 2) - max(x - w / 2, tx - tw / 2)
        ih = min(y + h / 2, ty + th / 2) - max(y - h / 2, ty - th / 2)
        inter = iw * ih if iw > 0 and ih > 0 else 0.0
        union = w * h + tw * th - inter
        iou = inter / union if union > 0 else 0.0
        f = lr * (2.0 - iou)
        err = 0.0
        for k in range(4):
            v = state[i, k] - f * grad[i, k]
            if k >= 2 and not v >= MIN_SIZE:
                v = MIN_SIZE
                clamped += 1
            state[i, k] = v
            send[i, k] = v
            err += abs(v - target[i, k])
        case_error[i] = err
        total += err
    return total, clamped


def descend_step(state: np.ndarray, target: np.ndarray, grad: np.ndarray, lr: float, send: np.ndarray,
                 case_error: np.ndarray) -> tuple[float, int]:
    """Python face of the compiled step (see _descend)."""
    total, clamped = _descend(state, target, np.ascontiguousarray(grad), lr, send, case_error)
    return float(total), int(clamped)


def case_error(boxes: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.abs(boxes - targets).sum(axis=1)


# ------------------------------------------------------------------------------------------------- gradients
GradFn = Callable[[str, np.ndarray, np.ndarray, dict], np.ndarray]


class RemoteGradients:
    """d loss / d (x, y, w, h) from a running server, over REST or gRPC (the URL's scheme)."""

    # one request per shard (857,500 boxes: 27 MB up, 14 MB down at full size) under the server's default body
    # limit (64 MiB): with reduction="sum" no per-row losses travel back, and the shard threads keep the wire and
    # the server busy (measured ~25% more pairs/s than the client's 8 MiB pieces on 2 cores)
    REQUEST_BYTES = 48 * 2**20

    def __init__(self, url: str, api_key: str | None = None) -> None:
        from lossd_client import LossClient

        self.url = url
        self.client = LossClient(url, api_key=api_key, timeout=300, max_request_bytes=self.REQUEST_BYTES)
        self.label = f"server {url}"

    def __call__(self, name: str, pred: np.ndarray, target: np.ndarray, params: dict) -> np.ndarray:
        from lossd_client import TooLargeError

        try:
            # reduction="sum": each row's gradient is its own loss's
            return self.client.loss(name, pred, target, box_format="cxcywh", reduction="sum", params=params).grad
        except TooLargeError:
            if self.client.max_request_bytes <= 8 * 2**20:
                raise
            self.client.max_request_bytes = 8 * 2**20  # a server with a smaller body limit: the client's pieces
            return self(name, pred, target, params)

    def catalog(self) -> list[dict]:
        return self.client.losses()

    def close(self) -> None:
        self.client.close()


class LocalGradients:
    """The same, from an Engine in this process."""

    def __init__(self, device: str = "cpu") -> None:
        from .engine import Engine

        self.engine = Engine(device=device, warm=False)
        self.label = f"in-process engine ({self.engine.device})"

    def __call__(self, name: str, pred: np.ndarray, target: np.ndarray, params: dict) -> np.ndarray:
        return self.engine.evaluate(name, pred, target, box_format="cxcywh", reduction="sum", params=params,
                                    return_grad=True).grad.numpy()

    def catalog(self) -> list[dict]:
        return self.engine.losses()

    def close(self) -> None:
        pass


class PaperGradients:
    """The gradients of the paper's own simulation code (MATLAB, github.com/Zzh-tju/DIoU, `simulation
    experiment/`), re-derived here in numpy for comparison: not lossd's, and not exact. What they do, in the paper's
    code's terms (boxes as top/bottom/left/right, the step *adds* the gradient of the similarity):

    - IoU: (U dI - I dU) / U^2 while the boxes overlap, else 0; sides are turned into (x, y, w, h) with
      dw = dr - dl (the exact chain rule has (dr - dl) / 2, so w and h move twice as fast as x and y).
    - GIoU: the IoU part plus (C dU - U dC) / C^2; I and U are taken from the signed intersection (a product of
      two negative extents when the boxes are apart), and converted like IoU.
    - DIoU: the IoU part plus the distance part derived directly in (x, y, w, h); there the enclosing diagonal's
      term enters d/dx and d/dy with the wrong sign (the centre is pulled harder than the loss says), the
      derivatives of the enclosing box's width and height share one set of terms (d Cw/dy and d Ch/dx are not
      zero), and when the prediction spans the target on both sides d Cw/dw is taken as -1 (exactly: +1).
    - CIoU: DIoU's plus alpha * d v with the 1 / (w^2 + h^2) factor of d v left out (the paper's choice, Sec. 4)
      and alpha = v / (1 - IoU + v + 1e-7), IoU 0 when apart.
    """

    LOSSES = PAPER_LOSSES

    def __init__(self, fixes: frozenset[str] = frozenset()) -> None:
        self.fixes = frozenset(fixes)
        self.label = "the paper's hand-derived gradients (numpy" + (
            f"; fixed: {', '.join(sorted(self.fixes))})" if self.fixes else ")")

    def __call__(self, name: str, pred: np.ndarray, target: np.ndarray, params: dict) -> np.ndarray:
        if name not in self.LOSSES:
            raise ValueError(f"the paper's code has gradients for {list(self.LOSSES)} only, not {name!r}")
        return -paper_ascent(name, pred.astype(np.float64), target.astype(np.float64), self.fixes)

    def catalog(self) -> list[dict]:
        return [{"name": n, "kind": "box", "pred": "[N,4]"} for n in self.LOSSES]

    def close(self) -> None:
        pass


def _tblr(b: np.ndarray):
    x, y, w, h = b.T
    return y - h / 2, y + h / 2, x - w / 2, x + w / 2


PAPER_FIXES = ("half_wh", "clamped_intersection", "enclosing_terms", "enclosing_sign", "aspect_denominator")


def paper_ascent(name: str, a: np.ndarray, g: np.ndarray, fixes: frozenset[str] = frozenset()) -> np.ndarray:
    """The paper code's ascent direction [N, 4] in (x, y, w, h) for iou/giou/diou/ciou (see PaperGradients).

    fixes turns single departures from the exact gradient off, to see which one matters: "half_wh" (dw =
    (dr - dl) / 2), "clamped_intersection" (I = 0 and dI = 0 when the boxes are apart), "enclosing_terms" (the
    exact derivatives of the enclosing box's width and height in DIoU/CIoU's distance part), "enclosing_sign" (the
    sign of the enclosing diagonal's term in the distance part's d/dx and d/dy), "aspect_denominator" (CIoU's
    d v with its 1 / (w^2 + h^2)). With all five, the result is the exact gradient (alpha held constant, as
    torchvision and lossd's default alpha_rule do)."""
    unknown = set(fixes) - set(PAPER_FIXES)
    if unknown:
        raise ValueError(f"unknown fixes {sorted(unknown)}; known: {list(PAPER_FIXES)}")
    pt, pb, pl, pr = _tblr(a)
    gt, gb, gl, gr = _tblr(g)
    it, ib, il, ir = np.maximum(pt, gt), np.minimum(pb, gb), np.maximum(pl, gl), np.minimum(pr, gr)
    inter = (ib - it) * (ir - il)  # signed, as in the paper's code
    if "clamped_intersection" in fixes:
        inter = np.maximum(ib - it, 0) * np.maximum(ir - il, 0)
    union = (pb - pt) * (pr - pl) + (gb - gt) * (gr - gl) - inter
    overlap = (it < ib) & (il < ir)
    # d I and d U with respect to the prediction's t, b, l, r
    iw, ih = (ir - il, ib - it) if "clamped_intersection" not in fixes else (np.maximum(ir - il, 0),
                                                                              np.maximum(ib - it, 0))
    di = {"t": np.where(pt > gt, -iw, 0.0), "b": np.where(pb < gb, iw, 0.0),
          "l": np.where(pl > gl, -ih, 0.0), "r": np.where(pr < gr, ih, 0.0)}
    if "clamped_intersection" in fixes:
        di = {k: np.where(overlap, v, 0.0) for k, v in di.items()}
    dx = {"t": -(pr - pl), "b": pr - pl, "l": -(pb - pt), "r": pb - pt}
    du = {k: dx[k] - di[k] for k in di}
    ok = overlap & (union > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        diou_s = {k: np.where(ok, (union * di[k] - inter * du[k]) / union ** 2, 0.0) for k in di}

    half = 0.5 if "half_wh" in fixes else 1.0

    def xywh(s):
        return np.column_stack([s["l"] + s["r"], s["t"] + s["b"], half * (s["r"] - s["l"]),
                                half * (s["b"] - s["t"])])

    if name == "iou":
        return xywh(diou_s)
    ct, cb, cl, cr = np.minimum(pt, gt), np.maximum(pb, gb), np.minimum(pl, gl), np.maximum(pr, gr)
    if name == "giou":
        c = (cb - ct) * (cr - cl)
        dc = {"t": np.where(pt < gt, -(cr - cl), 0.0), "b": np.where(pb > gb, cr - cl, 0.0),
              "l": np.where(pl < gl, -(cb - ct), 0.0), "r": np.where(pr > gr, cb - ct, 0.0)}
        with np.errstate(divide="ignore", invalid="ignore"):
            pen = {k: np.where(c > 0, (c * du[k] - union * dc[k]) / c ** 2, 0.0) for k in dc}
        return xywh({k: np.where(overlap, diou_s[k] + pen[k], pen[k]) for k in dc})
    # DIoU / CIoU: the distance part in (x, y, w, h); columns dx, dy, dw, dh of each enclosing side
    side_t = np.where((pt < gt)[:, None], np.array([0, 1, 0, -0.5]), 0.0)
    side_b = np.where((pb > gb)[:, None], np.array([0, 1, 0, 0.5]), 0.0)
    side_l = np.where((pl < gl)[:, None], np.array([1, 0, -0.5, 0]), 0.0)
    side_r = np.where((pr > gr)[:, None], np.array([1, 0, 0.5, 0]), 0.0)
    cw_d = np.column_stack([side_r[:, 0] - side_l[:, 0], side_b[:, 1] - side_t[:, 1], side_r[:, 2] - side_l[:, 2],
                            side_b[:, 3] - side_t[:, 3]])
    ch_d = cw_d.copy()
    if "enclosing_terms" in fixes:
        # Cw = Cr - Cl depends on x and w only, Ch = Cb - Ct on y and h only
        cw_d[:, [1, 3]] = 0.0
        ch_d[:, [0, 2]] = 0.0
    else:
        cw_d[:, 2] = np.where((pl < gl) & (pr > gr), -1.0, cw_d[:, 2])
        ch_d[:, 3] = np.where((pt < gt) & (pb > gb), -1.0, ch_d[:, 3])
    ccw, cch = cr - cl, cb - ct
    c2 = ccw ** 2 + cch ** 2
    d = (a[:, 0] - g[:, 0]) ** 2 + (a[:, 1] - g[:, 1]) ** 2
    dc2 = 2 * ccw[:, None] * cw_d + 2 * cch[:, None] * ch_d
    # -d(rho^2 / c^2)/dx = (2 (gx - ax) c^2 + rho^2 dc^2/dx) / c^4; the paper's code subtracts the second term
    sign = 1.0 if "enclosing_sign" in fixes else -1.0
    s = np.column_stack([(2 * (g[:, 0] - a[:, 0]) * c2 + sign * dc2[:, 0] * d) / c2 ** 2,
                         (2 * (g[:, 1] - a[:, 1]) * c2 + sign * dc2[:, 1] * d) / c2 ** 2,
                         dc2[:, 2] * d / c2 ** 2, dc2[:, 3] * d / c2 ** 2])
    if name == "ciou":
        iou = np.where(ok, inter / np.where(union > 0, union, 1.0), 0.0)
        delta = np.arctan(g[:, 2] / g[:, 3]) - np.arctan(a[:, 2] / a[:, 3])
        v = 4 / np.pi ** 2 * delta ** 2
        alpha = v / (1 - iou + v + 1e-7)
        # the paper drops d v's 1 / (w^2 + h^2), which for unit-area boxes is a factor of 0.5 ... 0.24 (Sec. 4)
        den = a[:, 2] ** 2 + a[:, 3] ** 2 if "aspect_denominator" in fixes else 1.0
        s[:, 2] += alpha * 8 / np.pi ** 2 * delta * a[:, 3] / den
        s[:, 3] += alpha * -8 / np.pi ** 2 * delta * a[:, 2] / den
    return s + xywh(diou_s)


def descendable(catalog: Iterable[dict]) -> list[str]:
    """Losses the simulation can descend: box losses on [N,4] boxes, and regression losses (on x, y, w, h)."""
    names = [e["name"] for e in catalog
             if (e["kind"] == "box" and e["pred"].startswith("[N,4]")) or e["kind"] == "regression"]
    return [n for n in PAPER_LOSSES if n in names] + sorted(n for n in names if n not in PAPER_LOSSES)


# ------------------------------------------------------------------------------------------------- one loss
@dataclass
class LossRun:
    loss: str
    params: dict
    error: list[float]  # E(0) ... E(T)
    final_case_error: np.ndarray
    seconds: float
    clamped: int
    complete: bool
    iterations_done: int
    cpu_seconds: float = 0.0  # this process's CPU time (all its threads) during the run


def simulate_loss(name: str, cases: Cases, grad_fn: GradFn, *, iterations: int = 200, params: dict | None = None,
                  shards: int = 2, progress: Callable[[int], None] | None = None,
                  stop: threading.Event | None = None, checkpoint: Callable[[LossRun], None] | None = None,
                  checkpoint_seconds: float = 2.0) -> LossRun:
    """Descend every case for `iterations` steps with `name`'s gradients. The cases are split into `shards`
    independent groups, each stepped by its own thread, so one group's request is on the wire or in the server
    while another's step runs here. progress(k) is called as iterations finish for every shard (k = iterations in
    all). Setting `stop` ends the run after the current step (the result is then marked incomplete).
    checkpoint(partial) is called every checkpoint_seconds with the curve so far."""
    params = dict(params or {})
    n = len(cases)
    shards = max(1, min(shards, n))
    bounds = np.linspace(0, n, shards + 1).astype(int)
    state = cases.anchors.astype(np.float64, copy=True)
    target = cases.targets.astype(np.float64, copy=False)
    target32 = target.astype(np.float32)
    send = state.astype(np.float32)
    final = case_error(state, target)
    errors = np.zeros((shards, iterations + 1))
    clamped = np.zeros(shards, dtype=np.int64)
    done = np.zeros(shards, dtype=np.int64)
    for s in range(shards):
        errors[s, 0] = final[bounds[s]:bounds[s + 1]].sum()
    failures: list[BaseException] = []
    stop = stop or threading.Event()
    reported = [0]  # iterations every shard has finished, as told to progress()
    report_lock = threading.Lock()

    def run(s: int) -> None:
        lo, hi = bounds[s], bounds[s + 1]
        st, tg, tg32, sd, ce = state[lo:hi], target[lo:hi], target32[lo:hi], send[lo:hi], final[lo:hi]
        try:
            for t in range(1, iterations + 1):
                if stop.is_set():
                    return
                grad = grad_fn(name, sd, tg32, params)
                errors[s, t], c = descend_step(st, tg, grad, learning_rate(t, iterations), sd, ce)
                clamped[s] += c
                done[s] = t
                if progress is not None:
                    with report_lock:
                        step = int(done.min()) - reported[0]
                        if step > 0:
                            reported[0] += step
                            progress(step)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failures.append(exc)
            stop.set()

    t0, c0 = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in range(shards)]
    last = time.monotonic()
    try:
        for th in threads:
            th.start()
        for th in threads:
            while th.is_alive():
                th.join(0.2)
                if checkpoint is not None and time.monotonic() - last >= checkpoint_seconds:
                    checkpoint(_partial(name, params, errors, done, final, time.perf_counter() - t0, clamped))
                    last = time.monotonic()
    except KeyboardInterrupt:
        stop.set()
        for th in threads:
            if th.is_alive():
                th.join()
        raise _Interrupted(_partial(name, params, errors, done, final, time.perf_counter() - t0, clamped)) from None
    if failures:
        raise failures[0]
    seconds = time.perf_counter() - t0
    if stop.is_set() and done.min() < iterations:
        raise _Interrupted(_partial(name, params, errors, done, final, seconds, clamped))
    return LossRun(name, params, errors.sum(axis=0).tolist(), final, seconds, int(clamped.sum()), True, iterations,
                   time.process_time() - c0)


def _partial(name, params, errors, done, final, seconds, clamped) -> LossRun:
    reached = int(done.min())
    return LossRun(name, params, errors[:, :reached + 1].sum(axis=0).tolist(), final, seconds, int(clamped.sum()),
                   False, reached)


class _Interrupted(Exception):
    def __init__(self, run: LossRun) -> None:
        super().__init__(run.loss)
        self.run = run


# ------------------------------------------------------------------------------------------------- results
def iterations_to(error: list[float], fraction: float = 0.01) -> int | None:
    """First iteration whose total error is at most `fraction` of the initial error (None: never)."""
    goal = fraction * error[0]
    for t, e in enumerate(error):
        if e <= goal:
            return t
    return None


def summary_rows(runs: list[dict], iterations: int) -> list[dict]:
    drop = round(0.8 * iterations)
    rows = []
    for r in runs:
        err = r["error"]
        rows.append({"loss": r["loss"], "initial_error": err[0],
                     f"error_at_{drop}": err[drop] if len(err) > drop else None,
                     f"error_at_{iterations}": err[iterations] if len(err) > iterations else None,
                     "iterations_to_1pct": iterations_to(err), "seconds": r["seconds"],
                     "pairs_per_second": r["pairs_per_second"], "cpu_seconds": r.get("cpu_seconds"),
                     "clamped": r["clamped"],
                     "complete": r["complete"]})
    return rows


def _fmt(v) -> str:
    if v is None:
        return "not reached"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v)


def write_table(rows: list[dict], out: Path) -> None:
    import csv

    cols = list(rows[0]) if rows else ["loss"]
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot_curves(runs: list[dict], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        paper = r["loss"] in PAPER_LOSSES
        ax.plot(range(len(r["error"])), r["error"], label=r["loss"], lw=2.2 if paper else 1.0,
                ls="-" if paper else "--")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("total error  Σ |Δx|+|Δy|+|Δw|+|Δh|")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    paths = [out / "error_vs_iteration.png", out / "error_vs_iteration.svg"]
    for p in paths:
        fig.savefig(p, dpi=130)
    plt.close(fig)
    return paths


def plot_map(losses: list[str], out: Path, cases: Cases) -> Path | None:
    """The paper's Fig. 3(b): each anchor centre coloured by the final error summed over its 343 cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    per_point = {}
    for name in losses:
        rec = out / f"{name}.json"
        v = json.loads(rec.read_text()).get("final_error_per_point") if rec.exists() else None
        if v is None and (out / f"{name}.final.npy").exists():
            v = np.bincount(cases.point, weights=np.load(out / f"{name}.final.npy"), minlength=len(cases.points))
        if v is not None and len(v) == len(cases.points):
            per_point[name] = np.asarray(v, dtype=np.float64)
    if not per_point:
        return None
    vals = np.concatenate([v for v in per_point.values()])
    pos = vals[vals > 0]
    norm = LogNorm(vmin=max(pos.min(), pos.max() * 1e-6), vmax=pos.max()) if pos.size else None
    fig, axes = plt.subplots(1, len(per_point), figsize=(3.4 * len(per_point) + 1.4, 3.7), squeeze=False,
                             constrained_layout=True)
    for ax, (name, v) in zip(axes[0], per_point.items()):
        sc = ax.scatter(cases.points[:, 0], cases.points[:, 1], c=np.maximum(v, norm.vmin if norm else 0), s=5,
                        cmap="viridis", norm=norm, linewidths=0)
        ax.set_title(f"{name}: Σ final error {v.sum():,.0f}", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlabel("anchor centre x")
    axes[0][0].set_ylabel("anchor centre y")
    fig.colorbar(sc, ax=axes[0].tolist(), label="final error, sum of the 343 cases", shrink=0.9)
    path = out / "final_error_map.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    from PIL import Image  # matplotlib's own dependency

    # 5,000 coloured dots compress poorly as RGB: a 256-colour palette is a quarter of the size
    with Image.open(path) as im:
        im.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


# ------------------------------------------------------------------------------------------------- the command
def run(*, losses: list[str] | None, cases: int | None, iterations: int, seed: int, out: str | os.PathLike,
        server: str | None, api_key: str | None = None, device: str = "cpu", shards: int = 2,
        map_losses: list[str] | None = None, progress: bool = True, force: bool = False,
        paper_gradients: bool = False) -> dict:
    """Run the simulation for each loss (default: the paper's four, then every other descendable loss), writing
    <out>/<loss>.json and <loss>.final.npy as each finishes, then the table and the plots. A loss already done
    with the same cases, seed and iterations is read back instead of rerun (unless force). paper_gradients: use
    the paper code's hand-derived gradients (PaperGradients) instead of lossd's, for comparison."""
    try:
        import matplotlib  # noqa: F401  (checked first: the plots come after minutes of work)
    except ImportError:
        raise SystemExit("lossd simulate draws its plots with matplotlib: pip install -e '.[simulate]' (in the clone)") from None
    out = _make_out(out)
    if paper_gradients:
        grad_fn = PaperGradients()
    else:
        grad_fn = RemoteGradients(server, api_key) if server else LocalGradients(device)
    try:
        can = descendable(grad_fn.catalog())
        names = list(dict.fromkeys(losses or can))
        unknown = [n for n in names if n not in can]
        if unknown:  # before any work
            raise ValueError(f"cannot descend {', '.join(map(repr, unknown))}: not a box or regression loss "
                             f"{'of this server' if server and not paper_gradients else 'here'}; these can be: "
                             f"{', '.join(can)}")
        not_run = [n for n in map_losses or () if n not in names]
        if not_run:  # the map would silently leave them out
            raise ValueError(f"--map {','.join(not_run)}: not among the losses of this run ({', '.join(names)}); "
                             "the map draws losses that ran")
        cs = build_cases(cases, seed)
        config = {"cases": len(cs), "iterations": iterations, "seed": seed, "gradients": grad_fn.label.split(" (")[0]
                  if paper_gradients else "lossd"}
        runs: list[dict] = []
        interrupted = None
        for name in names:
            path = out / f"{name}.json"
            if not force and path.exists():
                prev = json.loads(path.read_text())
                if prev.get("complete") and all(prev.get(k) == v for k, v in config.items()):
                    npy = out / f"{name}.final.npy"
                    if "final_error_per_point" not in prev and npy.exists():
                        prev["final_error_per_point"] = np.round(np.bincount(
                            cs.point, weights=np.load(npy), minlength=len(cs.points)), 4).tolist()
                        path.write_text(json.dumps(prev) + "\n")
                    runs.append(prev)
                    continue
            bar = _bar(name, iterations, progress)
            try:
                r = simulate_loss(name, cs, grad_fn, iterations=iterations, shards=shards,
                                  progress=bar.update if bar else None,
                                  checkpoint=lambda part: _save(part, out, config, grad_fn.label, cs))
            except _Interrupted as exc:
                r, interrupted = exc.run, name
            finally:
                if bar:
                    bar.close()
            record = _save(r, out, config, grad_fn.label, cs)
            runs.append(record)
            if interrupted:
                break
        complete = [r for r in runs if r["complete"]]
        rows = summary_rows(runs, iterations)
        if rows:
            write_table(rows, out)
        # the runs' own backends (finished losses read back may have come from another one)
        backends = sorted({r["backend"] for r in runs}) or [grad_fn.label]
        title = f"{len(cs):,} cases x {iterations} iterations; gradients: " + (
            "; ".join(backends) if paper_gradients else f"lossd ({'; '.join(backends)})")
        plots = [str(p) for p in plot_curves(runs, out, title)] if runs else []
        mp = plot_map(map_losses or [n for n in PAPER_LOSSES if n in names], out, cs) if complete else None
        if mp:
            plots.append(str(mp))
        paper = [r for r in runs if r["loss"] in PAPER_LOSSES and r["complete"]]
        summary = {"cases": len(cs), "iterations": iterations, "backend": "; ".join(backends), "losses": rows,
                   "paper_losses_seconds": sum(r["seconds"] for r in paper) if len(paper) == 4 else None,
                   "plots": plots, "interrupted": interrupted}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        grad_fn.close()


def _make_out(out: str | os.PathLike) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the output folder: {exc.strerror or exc}") from None
    return out


def _save(r: LossRun, out: Path, config: dict, backend: str, cases: Cases) -> dict:
    n = len(cases)
    record = {"loss": r.loss, "params": r.params, **config, "backend": backend, "complete": r.complete,
              "iterations_done": r.iterations_done, "seconds": round(r.seconds, 3),
              "pairs_per_second": round(n * r.iterations_done / r.seconds) if r.seconds > 0 else None,
              "cpu_seconds": round(r.cpu_seconds, 3), "clamped": r.clamped, "error": r.error}
    if r.complete:
        # per anchor centre (the map) in the record; every case's final error beside it, in a .npy
        record["final_error_per_point"] = np.round(np.bincount(cases.point, weights=r.final_case_error,
                                                               minlength=len(cases.points)), 4).tolist()
        np.save(out / f"{r.loss}.final.npy", r.final_case_error.astype(np.float32))
    tmp = out / f".{r.loss}.json.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(out / f"{r.loss}.json")
    return record


def _bar(name: str, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{name:<12}", unit="iteration", leave=True, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------- the ablation
ABLATION = (("paper's code", ()), ("+ half_wh", ("half_wh",)), ("+ clamped_intersection", ("clamped_intersection",)),
            ("+ enclosing_sign", ("enclosing_sign",)), ("+ enclosing_terms", ("enclosing_terms",)),
            ("+ aspect_denominator", ("aspect_denominator",)),
            ("+ enclosing_sign, enclosing_terms", ("enclosing_sign", "enclosing_terms")),
            ("all fixed (exact)", PAPER_FIXES))


def ablation(*, cases: int = 34_300, iterations: int = 200, seed: int = 0, out: str | os.PathLike,
             progress: bool = True) -> list[dict]:
    """The paper's simulation on its own hand-derived gradients, then with one departure from the exact gradient
    fixed at a time, then all: which departure makes its figure differ from lossd's exact gradients. Writes
    <out>/ablation.json and ablation.md; the last row equals the exact gradients (checked by the tests)."""
    out = _make_out(out)
    cs = build_cases(cases, seed)
    rows = []
    for label, fixes in ABLATION:
        row: dict = {"variant": label}
        for name in PAPER_LOSSES:
            relevant = {"iou": {"half_wh"}, "giou": {"half_wh", "clamped_intersection"},
                        "diou": {"half_wh", "enclosing_sign", "enclosing_terms"},
                        "ciou": {"half_wh", "enclosing_sign", "enclosing_terms", "aspect_denominator"}}[name]
            if fixes and fixes != PAPER_FIXES and not set(fixes) & relevant:
                row[name] = None  # that departure does not occur in this loss's gradient
                continue
            bar = _bar(f"{name} {label}", iterations, progress)
            r = simulate_loss(name, cs, PaperGradients(frozenset(fixes)), iterations=iterations, shards=1,
                              progress=bar.update if bar else None)
            if bar:
                bar.close()
            row[name] = {"error_at_end": r.error[-1], f"error_at_{round(0.8 * iterations)}":
                         r.error[round(0.8 * iterations)], "iterations_to_1pct": iterations_to(r.error)}
        rows.append(row)
    (out / "ablation.json").write_text(json.dumps({"cases": len(cs), "iterations": iterations, "seed": seed,
                                                   "rows": rows}, indent=2) + "\n")
    drop = round(0.8 * iterations)
    lines = [f"| gradients ({len(cs):,} cases) | " + " | ".join(f"{n}: E({drop}) / E({iterations}) / 1% at"
                                                                for n in PAPER_LOSSES) + " |",
             "|---|" + "---|" * len(PAPER_LOSSES)]
    for row in rows:
        cells = []
        for n in PAPER_LOSSES:
            v = row[n]
            cells.append("(same as the paper's code)" if v is None else
                         f"{_fmt(v[f'error_at_{drop}'])} / {_fmt(v['error_at_end'])} / "
                         f"{_fmt(v['iterations_to_1pct'])}")
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    return rows
