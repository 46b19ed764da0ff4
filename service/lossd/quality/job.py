"""`lossd quality`: the batch job. Reads labels and a reference, calibrates thresholds, scores shard by shard,
writes the results.

Shards (contiguous runs of images) are written atomically (a temporary file, then a rename) under
``<out>/shards/``; a re-run with the same inputs and settings skips the shards already there, so a crashed job
resumes where it stopped. The shard results do not depend on where they were computed: in-process, on a server
(``--server URL``, over the streaming call), or on Ray workers (``--ray [ADDRESS]``), each with an engine of its
own or, with ``--server`` too, each calling the servers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .. import __version__
from .readers import BoxSet, InputError, read_any
from .score import (ISSUES, METRICS, SEVERITY, Calibration, Evaluator, Thresholds, calibrate_all, classify, gather,
                    group, match, pair_metrics)

REJECTED_WARN = 0.5  # warn (and exit non-zero from the CLI) when more than this share of a file's rows is unusable
UNMATCHED_WARN = 0.9  # ... or when more than this share of the labels has no reference on it at all
MISSING_IMAGES_WARN = 0.5  # ... or when --images has no file for more than this share of the images


@dataclass
class Inputs:
    labels: BoxSet
    reference: BoxSet
    fingerprint: str
    groups: tuple = ()
    notes: list = field(default_factory=list)  # what the job chose on the user's behalf (printed, in the summary)

    def __post_init__(self) -> None:
        n = len(self.labels.images)
        self.groups = (group(self.labels.image, n), group(self.reference.image, n))


def load(labels_path: str | Path, reference_path: str | Path, *, classes=None, sizes=None, th: Thresholds,
         shard_size: int) -> Inputs:
    labels = read_any(labels_path, classes=classes, sizes=sizes)
    ref_classes, ref_sizes, notes = _yolo_fallback(Path(labels_path), Path(reference_path), classes, sizes)
    reference = read_any(reference_path, classes=ref_classes, sizes=ref_sizes, like=labels)
    h = hashlib.sha256()
    for p in (Path(labels_path), Path(reference_path)):
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(json.dumps([th.as_dict(), shard_size, __version__], sort_keys=True).encode())
    return Inputs(labels, reference, h.hexdigest()[:16], notes=notes)


def _yolo_fallback(labels: Path, reference: Path, classes, sizes) -> tuple:
    """(classes, sizes, notes) for reading a YOLO reference folder: its own classes.txt / sizes.csv, else the
    labels folder's (a prediction folder rarely carries them), saying so."""
    notes = []
    if not reference.is_dir() or any(reference.glob("*.xml")) or not labels.is_dir():
        return classes, sizes, notes
    picked = {}
    for what, given, name in (("classes", classes, "classes.txt"), ("sizes", sizes, "sizes.csv")):
        picked[what] = given
        if given is None and not (reference / name).exists() and (labels / name).exists():
            picked[what] = labels / name
            notes.append(f"reference: {reference} has no {name}; using the labels folder's {labels / name}")
    return picked["classes"], picked["sizes"], notes


# ------------------------------------------------------------------------------------------------ evaluators
class EngineEvaluator:
    """Pair losses from the in-process engine, float64 (as the server path)."""

    def __init__(self, device: str = "auto") -> None:
        from ..engine import Engine

        self.engine = Engine(device=device, warm=False)

    def catalog(self) -> list[dict]:
        return self.engine.losses()

    def losses(self, pred: np.ndarray, target: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {n: self.engine.evaluate(n, pred, target, return_grad=False, dtype="float64").loss.numpy()
                for n in names}

    def close(self) -> None:
        pass


SHM_MIN_BYTES = 256 * 1024  # lossd_client's threshold for shared memory (inputs of a call)


class ServerEvaluator:
    """Pair losses from a running lossd. The URL goes to ``LossClient`` as given. On this host the client hands
    big calls (shards of a few thousand pairs or more) over in shared memory instead of the wire: then each chunk
    is one ``loss()`` call; otherwise one streaming call carries every chunk of every loss asked for (the requests
    stay in flight together, which is what a remote server wants). On the 5k-image benchmark set most calls are
    below the shared-memory threshold and both ways score in about the same time."""

    CHUNK = 50_000  # pairs per item, well inside the server's message cap

    def __init__(self, url: str, api_key: str | None = None) -> None:
        from lossd_client import LossClient

        self.client = LossClient(url, api_key=api_key)
        self.shared: bool | None = None  # whether loss() goes through shared memory (learnt on the first call)

    def catalog(self) -> list[dict]:
        return self.client.losses()

    def losses(self, pred: np.ndarray, target: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        spans = [(a, min(a + self.CHUNK, len(pred))) for a in range(0, len(pred), self.CHUNK)]
        out: dict[str, list] = {n: [] for n in names}
        todo = [(n, a, b) for n in names for a, b in spans]

        def one(n: str, a: int, b: int) -> None:
            out[n].append(self.client.loss(n, pred[a:b], target[a:b], return_grad=False).loss)

        if self.shared is None and todo and (todo[0][2] - todo[0][1]) * 32 >= SHM_MIN_BYTES:
            # a call big enough for shared memory tells whether this client uses it
            before = self.client.shared_memory_calls
            one(*todo.pop(0))
            self.shared = self.client.shared_memory_calls > before
        if self.shared:
            for call in todo:
                one(*call)
            todo = []
        if todo:
            results = iter(self.client.stream([dict(name=n, pred=pred[a:b], target=target[a:b], return_grad=False)
                                               for n, a, b in todo]))
            for n, _, _ in todo:
                out[n].append(next(results).loss)
        return {n: np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in out[n]]) if out[n]
                else np.zeros(0) for n in names}

    def close(self) -> None:
        self.client.close()


# ------------------------------------------------------------------------------------------------ shards
def _native(b: BoxSet, rows: np.ndarray, prefix: str = "") -> dict:
    """The boxes in the input's own format, beside x1..y2."""
    box = b.box[rows]
    if b.box_format == "coco":
        return {f"{prefix}coco_x": box[:, 0], f"{prefix}coco_y": box[:, 1], f"{prefix}coco_w": box[:, 2] - box[:, 0],
                f"{prefix}coco_h": box[:, 3] - box[:, 1]}
    if b.box_format == "yolo":
        w = np.array([b.images[i].width for i in b.image[rows]], dtype=np.float64)
        h = np.array([b.images[i].height for i in b.image[rows]], dtype=np.float64)
        w, h = np.where(w > 0, w, np.nan), np.where(h > 0, h, np.nan)
        return {f"{prefix}yolo_cx": (box[:, 0] + box[:, 2]) / 2 / w,
                f"{prefix}yolo_cy": (box[:, 1] + box[:, 3]) / 2 / h,
                f"{prefix}yolo_w": (box[:, 2] - box[:, 0]) / w, f"{prefix}yolo_h": (box[:, 3] - box[:, 1]) / h}
    return {}


def _ids(values: list, idx: np.ndarray) -> pa.Array:
    return pa.array([values[i] if i >= 0 else None for i in idx], pa.string())


def score_shard(inp: Inputs, images: np.ndarray, th: Thresholds, cal: Calibration,
                evaluator: Evaluator) -> tuple[pa.Table, pa.Table]:
    """(label rows, reference rows) of the given images."""
    lab, ref = inp.labels, inp.reference
    pairs = match(lab, ref, images, th, cal, evaluator, *inp.groups)
    cols = classify(lab, ref, pairs, th, cal)
    lc, rc = cols["labels"], cols["references"]
    rows, pp = pairs.lab_rows, lc["partner_pair"]
    has = pp >= 0
    partner = gather(pairs.pr, pp, -1)
    metrics = {m: np.full(len(rows), np.nan) for m in METRICS + ("loss",)}
    got = pair_metrics(evaluator, lab, ref, rows[has], partner[has], th.loss)
    for m in metrics:
        metrics[m][has] = got[m]
    keys = [im.key for im in lab.images]
    rbox = gather(ref.box, partner, np.nan)
    labels_t = pa.table({
        "image_id": _ids(keys, lab.image[rows]), "box_id": _ids(lab.box_id, rows),
        "category": _ids(lab.categories, lab.category[rows]),
        "x1": lab.box[rows, 0], "y1": lab.box[rows, 1], "x2": lab.box[rows, 2], "y2": lab.box[rows, 3],
        **_native(lab, rows),
        "issue": pa.array(list(lc["issue"]), pa.string()), "score": lc["score"],
        "score_badly_located": lc["score_badly_located"], "score_wrong_class": lc["score_wrong_class"],
        "score_spurious": lc["score_spurious"],
        "reference_id": _ids(ref.box_id, partner),
        "reference_category": pa.array([lab.categories[ref.category[k]] if k >= 0 else None for k in partner],
                                       pa.string()),
        "reference_score": gather(ref.score, partner, np.nan),
        "reference_x1": rbox[:, 0], "reference_y1": rbox[:, 1], "reference_x2": rbox[:, 2], "reference_y2": rbox[:, 3],
        **metrics,
    })
    rrows, lp = pairs.ref_rows, rc["label_pair"]
    lbl = gather(pairs.pl, lp, -1)
    refs_t = pa.table({
        "image_id": _ids(keys, ref.image[rrows]), "box_id": _ids(ref.box_id, rrows),
        "category": _ids(lab.categories, ref.category[rrows]), "confidence": ref.score[rrows],
        "x1": ref.box[rrows, 0], "y1": ref.box[rrows, 1], "x2": ref.box[rrows, 2], "y2": ref.box[rrows, 3],
        **_native(ref, rrows),
        "issue": pa.array(list(rc["issue"]), pa.string()), "score_missing": rc["score_missing"],
        "label_id": _ids(lab.box_id, lbl), "label_iou": rc["label_iou"],
    })
    return labels_t, refs_t


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_csv_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    pacsv.write_csv(table, tmp)
    os.replace(tmp, path)


def _write_shard(tables: tuple[pa.Table, pa.Table], path: Path) -> None:
    _write_atomic(tables[1], _refs_path(path))
    _write_atomic(tables[0], path)  # the labels file last: its presence marks the shard done


def _refs_path(path: Path) -> Path:
    return path.with_name(path.stem + "-references.parquet")


def _shards(n_images: int, shard_size: int) -> list[np.ndarray]:
    return [np.arange(s, min(s + shard_size, n_images)) for s in range(0, n_images, shard_size)]


def _progress(total: int, done: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, initial=done, desc=desc, unit="image", file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return None


def make_evaluator(server: str | None = None, api_key: str | None = None, device: str = "auto") -> Evaluator:
    return ServerEvaluator(server, api_key) if server else EngineEvaluator(device)


def check_loss(catalog: list[dict], name: str) -> None:
    """``name`` must be a loss that compares two boxes: a box loss on [N,4] or a regression loss."""
    usable = [e["name"] for e in catalog
              if (e["kind"] == "box" and str(e.get("pred", "")).startswith("[N,4]")) or e["kind"] == "regression"]
    if name not in usable:
        what = "unknown loss" if name not in {e["name"] for e in catalog} else "not a loss between two boxes"
        raise InputError(f"--loss {name[:60]!r}: {what}; one of: {', '.join(usable)}")


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").unlink(missing_ok=True)  # written last, once everything it lists is there
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create the output folder: {exc.strerror or exc}") from None


def run(labels_path: str | Path, reference_path: str | Path, out_dir: str | Path, *, th: Thresholds = Thresholds(),
        shard_size: int = 500, server: str | None = None, ray_address: str | None = None, use_ray: bool = False,
        image_dir: str | Path | None = None, classes=None, sizes=None, device: str = "auto", progress: bool = True,
        stop_after: int | None = None, api_key: str | None = None) -> dict:
    """Score a dataset; returns the summary. ``stop_after`` shards (tests) simulates a crash part-way."""
    if use_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise InputError('--ray needs Ray, which is not installed: pip install -e ".[ray]" (in the clone)') from None
    t0 = time.perf_counter()
    out = Path(out_dir)
    shard_dir = out / "shards"
    if image_dir is not None and not Path(image_dir).is_dir():
        raise InputError(f"--images {image_dir}: no such folder")
    # with --ray and --server the driver calibrates on the servers too: no process of the job loads an engine
    evaluator = make_evaluator(server, api_key, device)
    bar = None
    try:
        check_loss(evaluator.catalog(), th.loss)  # before any input is read or output written
        inp = load(labels_path, reference_path, classes=classes, sizes=sizes, th=th, shard_size=shard_size)
        _make_out(out)
        t_cal = time.perf_counter()
        cal = calibrate_all(inp.labels, inp.reference, th, evaluator, inp.groups)
        cal_s = time.perf_counter() - t_cal
        manifest = shard_dir / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") != inp.fingerprint:
            shutil.rmtree(shard_dir)  # inputs or settings changed: earlier shards do not belong to this run
        shard_dir.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"fingerprint": inp.fingerprint, "shard_size": shard_size,
                                        "thresholds": th.as_dict()}))
        shards = _shards(len(inp.labels.images), shard_size)
        paths = [shard_dir / f"shard-{i:05d}.parquet" for i in range(len(shards))]
        todo = [i for i, p in enumerate(paths) if not (p.exists() and _refs_path(p).exists())]
        if stop_after is not None:
            todo = todo[:stop_after]
        n_done = len(inp.labels.images) - sum(len(shards[i]) for i in todo)
        bar = _progress(len(inp.labels.images), n_done, "scoring") if progress else None
        mode = ("ray+server" if server else "ray") if use_ray else ("server" if server else "in-process")
        t_score = time.perf_counter()
        if use_ray:
            _run_ray(inp, shards, paths, todo, th, cal, ray_address, Scorer(server, api_key, device), bar)
        else:
            for i in todo:
                _write_shard(score_shard(inp, shards[i], th, cal, evaluator), paths[i])
                if bar is not None:
                    bar.update(len(shards[i]))
        scored_s = time.perf_counter() - t_score
    finally:
        if bar is not None:
            bar.close()  # also when interrupted: what follows starts on a line of its own
        evaluator.close()
    if stop_after is not None and any(not p.exists() for p in paths):
        return {"complete": False, "shards_done": sum(p.exists() for p in paths), "shards": len(paths)}
    return finish(inp, paths, out, th, cal, mode=mode, image_dir=image_dir, seconds=time.perf_counter() - t0,
                  scoring_seconds=scored_s + cal_s)


# ------------------------------------------------------------------------------------------------ ray
@dataclass(frozen=True)
class Scorer:
    """What a Ray task scores its shard with: the servers (``--server``, with their API key) when given, else an
    engine of the worker's own on ``device``."""
    server: str | None
    api_key: str | None = field(repr=False)  # travels to the workers inside the task, never in a log line
    device: str = "auto"


_worker_evaluator: tuple[Scorer, Evaluator] | None = None


def _evaluator_for(scorer: Scorer) -> Evaluator:
    """The worker process's evaluator, kept for its later tasks: a client keeps its connections and what it
    learnt about replicas that went away; an engine is built once."""
    global _worker_evaluator
    if _worker_evaluator is None or _worker_evaluator[0] != scorer:
        if _worker_evaluator is not None:
            _worker_evaluator[1].close()
        _worker_evaluator = (scorer, make_evaluator(scorer.server, scorer.api_key, scorer.device))
    return _worker_evaluator[1]


def _ray_shard(inp: Inputs, images: np.ndarray, th: Thresholds, cal: Calibration,
               scorer: Scorer) -> tuple[bytes, bytes]:
    out = []
    for table in score_shard(inp, images, th, cal, _evaluator_for(scorer)):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        out.append(sink.getvalue().to_pybytes())
    return out[0], out[1]


RAY_START_TRIES = 3


def _start_ray(ray, address: str | None) -> None:
    """ray.init, tried again when a local Ray fails to start its node: on a busy machine its raylet can miss
    Ray's own start-up deadline ("Failed to get node info ... GCS cannot find the node"), and a second try
    usually succeeds. A cluster address that does not answer is the user's to fix: no retry."""
    for attempt in range(1, RAY_START_TRIES + 1):
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({} if address else {"num_cpus": os.cpu_count() or 2}))
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises several types for a node that did not come up
            ray.shutdown()
            if address or attempt == RAY_START_TRIES:
                raise InputError(f"--ray: Ray did not start{f' at {address}' if address else ''}: "
                                 f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from None
            print(f"lossd quality: Ray did not start ({type(exc).__name__}); trying again ({attempt + 1} of "
                  f"{RAY_START_TRIES})", file=sys.stderr, flush=True)
            time.sleep(2.0 * attempt)


def _run_ray(inp: Inputs, shards, paths, todo, th, cal, address, scorer: Scorer, bar) -> None:
    import ray
    from ray.exceptions import RayTaskError

    started = not ray.is_initialized()
    if started:
        _start_ray(ray, address)
    try:
        remote = ray.remote(_ray_shard)
        inp_ref, scorer_ref = ray.put(inp), ray.put(scorer)
        pending = {remote.remote(inp_ref, shards[i], th, cal, scorer_ref): i for i in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    lab_bytes, ref_bytes = ray.get(ref)
                except RayTaskError as exc:
                    # the worker's own error (a server that refused the key, every replica gone), not Ray's
                    # wrapper with the worker's traceback: the CLI prints it on one line
                    for other in pending:
                        ray.cancel(other)
                    if isinstance(exc.cause, Exception):
                        raise exc.cause from None
                    raise
                for data, path in ((ref_bytes, _refs_path(paths[i])), (lab_bytes, paths[i])):
                    tmp = path.with_suffix(".tmp")
                    tmp.write_bytes(data)
                    os.replace(tmp, path)
                if bar is not None:
                    bar.update(len(shards[i]))
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ images
# How often a flag of each type is right. A flag backed by a reference box that contradicts the label (a confident
# same-class box offset from it, a confident other-class box on it) is rarely wrong; a flag that rests on an absence
# (no reference on the label; no label on a confident reference) is as often the reference model's own miss or
# false positive, which box data cannot tell apart. Chosen on the benchmark's synthetic seed 0, confirmed on seed 1
# and on the real COCO boxes; the image AUROC over a grid of these values: bench/label_quality/results/results.md.
FLAG_RELIABILITY = {"badly_located": 0.9, "wrong_class": 0.9, "spurious": 0.5, "missing": 0.5}
FLAG_SHARE = 0.9  # of a box's chance: its flag; the rest comes from its score's rank, so doubtful boxes count too
IMAGE_POWER = 10  # the rank term (1 - r) ** IMAGE_POWER: only the lowest-ranked boxes of a type weigh on their image
PER_TYPE = (("boxes", "score_badly_located", "badly_located"), ("boxes", "score_wrong_class", "wrong_class"),
            ("boxes", "score_spurious", "spurious"), ("references", "score_missing", "missing"))


def box_issue_chance(score: np.ndarray, flagged: np.ndarray, issue: str) -> np.ndarray:
    """The chance that each box has ``issue``: FLAG_RELIABILITY[issue] * (FLAG_SHARE * flagged + (1 - FLAG_SHARE)
    * (1 - r) ** IMAGE_POWER), with r the rank of the box's score for that issue among all boxes (the fraction
    scoring lower, ties averaged; a lower score is more doubtful)."""
    from scipy.stats import rankdata

    if len(score) == 0:
        return np.zeros(0)
    r = (rankdata(score, method="average") - 0.5) / len(score)
    return FLAG_RELIABILITY[issue] * (FLAG_SHARE * flagged + (1.0 - FLAG_SHARE) * (1.0 - r) ** IMAGE_POWER)


def image_table(image_ids: list[str], files: list[str], boxes: pa.Table, refs: pa.Table) -> pa.Table:
    """One row per image, worst first.

    Every label gets a chance of being badly located, of the wrong class and spurious, every reference a chance of
    being an object nobody labelled (``box_issue_chance``: mostly from the box's flag, weighed by how often a flag
    of that type is right, and a little from how low its score ranks). The image score is the chance that none of
    its boxes has any issue, prod(1 - p) over its boxes and types: every doubtful box lowers it, not only the
    worst. Ties are broken by the number of flagged boxes, then the worst issue's severity, then the image id."""
    index = {k: i for i, k in enumerate(image_ids)}
    n = len(image_ids)
    log_clean = np.zeros(n)
    counts = {i: np.zeros(n, dtype=np.int64) for i in ISSUES}
    worst = np.zeros(n, dtype=np.int64)
    tables = {"boxes": boxes, "references": refs}
    img_of = {name: np.fromiter((index[k] for k in t.column("image_id").to_pylist()), dtype=np.int64,
                                count=t.num_rows) for name, t in tables.items()}
    issues = {name: np.asarray(t.column("issue").to_pylist(), dtype=object) for name, t in tables.items()}
    for name, col, issue in PER_TYPE:
        t = tables[name]
        if t.num_rows == 0:
            continue
        p = box_issue_chance(t.column(col).to_numpy(zero_copy_only=False), issues[name] == issue, issue)
        np.add.at(log_clean, img_of[name], np.log1p(-p))
    for name, t in tables.items():
        if t.num_rows == 0:
            continue
        for i in ISSUES:
            hit = issues[name] == i
            counts[i] += np.bincount(img_of[name][hit], minlength=n)
            np.maximum.at(worst, img_of[name][hit], SEVERITY[i])
    score = np.exp(log_clean)
    flagged = sum(counts[i] for i in ISSUES if i not in ("ok", "unconfirmed"))
    order = sorted(range(n), key=lambda i: (float(score[i]), -int(flagged[i]), -int(worst[i]), image_ids[i]))
    sev_name = {v: k for k, v in SEVERITY.items()}
    return pa.table({
        "rank": np.arange(1, n + 1), "image_id": [image_ids[i] for i in order], "file": [files[i] for i in order],
        "score": score[order], "n_flagged": flagged[order], "worst_issue": [sev_name[int(worst[i])] for i in order],
        **{f"n_{i}": counts[i][order] for i in ISSUES},
    })


# ------------------------------------------------------------------------------------------------ outputs
def _problem_kind(problem: str) -> str:
    """A problem without the row's own values ("expected 'class cx cy w h [confidence]', got '1 2'" -> "expected
    …, got …"), so that rows with the same fault count together in the warning."""
    kind = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)|-?\b\d[\w.+-]*|\bnan\b|-?\binf\b", "…", problem)
    return re.sub(r"…(\s*…)+", "…", kind).strip()[:80]


def _check_inputs(inp: Inputs, boxes: pa.Table) -> list[str]:
    """Warnings for inputs that do not fit each other (most rows rejected, or no reference near most labels)."""
    warnings = []
    for name, b in (("labels", inp.labels), ("reference", inp.reference)):
        bad = sum(1 for p in b.problems if p.get("source") != "images")
        total = bad + len(b)
        if total and bad / total > REJECTED_WARN:
            reasons = {}
            for p in b.problems:
                key = _problem_kind(p["problem"])
                reasons[key] = reasons.get(key, 0) + 1
            top = max(reasons, key=reasons.get) if reasons else ""
            warnings.append(f"{name}: {bad} of {total} rows rejected (most: {top!r}); do the labels and the "
                            "reference describe the same images, with the same image ids and class names?")
    if len(inp.labels) and not len(inp.reference):
        # every label would be "spurious" against nothing: a reference that is empty (or wholly rejected) is far
        # more likely the wrong file than a dataset whose every box is wrong
        warnings.append(f"the reference has no usable boxes, so all {len(inp.labels)} labels have no reference box "
                        "on them; is it the right file (predictions of these images, not an empty list)?")
    elif len(inp.labels) and boxes.num_rows:
        nothing = sum(1 for r in boxes.column("reference_id").to_pylist() if r is None)
        if nothing / boxes.num_rows > UNMATCHED_WARN:
            warnings.append(f"{nothing} of {boxes.num_rows} labels have no reference box on them; do the labels and "
                            "the reference describe the same images (ids, sizes, box format)?")
    return warnings


def finish(inp: Inputs, paths: Iterable[Path], out: Path, th: Thresholds, cal: Calibration, *, mode: str,
           image_dir=None, seconds: float, scoring_seconds: float) -> dict:
    from .report import confine_images, missing_images, write_report

    paths = list(paths)
    if paths:
        boxes = pa.concat_tables([pq.read_table(p) for p in paths])
        refs = pa.concat_tables([pq.read_table(_refs_path(p)) for p in paths])
    else:
        boxes, refs = score_shard(inp, np.arange(0), th, cal, _NoPairs())
    image_ids = [im.key for im in inp.labels.images]
    images = image_table(image_ids, [im.file for im in inp.labels.images], boxes, refs)
    not_found = missing_images(inp.labels.images, image_dir)
    image_problems = confine_images(inp.labels.images, image_dir) + not_found
    problems = inp.labels.problems + inp.reference.problems + image_problems
    for name, t in (("boxes", boxes), ("references", refs), ("images", images)):
        _write_atomic(t, out / f"{name}.parquet")
        _write_csv_atomic(t, out / f"{name}.csv")
    _write_csv_atomic(pa.table({k: [str(p[k]) for p in problems] for k in ("source", "location", "problem")}),
                      out / "problems.csv")
    by_issue = {i: 0 for i in ISSUES}
    by_class: dict[str, dict] = {c: {"labels": 0, "references": 0, **{i: 0 for i in ISSUES}}
                                 for c in inp.labels.categories}
    for cat, issue in zip(boxes.column("category").to_pylist(), boxes.column("issue").to_pylist()):
        by_issue[issue] += 1
        by_class[cat][issue] += 1
        by_class[cat]["labels"] += 1
    for cat, issue in zip(refs.column("category").to_pylist(), refs.column("issue").to_pylist()):
        by_class[cat]["references"] += 1
        if issue == "missing":
            by_issue["missing"] += 1
            by_class[cat]["missing"] += 1
    calibration = cal.as_dict(inp.labels.categories)
    for c, row in by_class.items():
        row["thresholds"] = calibration["per_class"][c]
    by_class = {c: r for c, r in by_class.items() if r["labels"] or r["references"]}
    warnings = _check_inputs(inp, boxes)
    n_images = len(inp.labels.images)
    if n_images and len(not_found) / n_images > MISSING_IMAGES_WARN:
        warnings.append(f"--images {image_dir}: no file for {len(not_found)} of {n_images} images (problems.csv "
                        "lists them); is it the folder of these labels' images?")
    summary = {
        "lossd_version": __version__, "mode": mode, "complete": True,
        "images": len(inp.labels.images), "labels": len(inp.labels), "references": len(inp.reference),
        "by_issue": by_issue, "by_class": by_class, "warnings": warnings,
        "problems": {"count": len(problems), "rows": problems[:1000]},
        "ignored": {"labels": inp.labels.ignored, "references": inp.reference.ignored},
        "thresholds": {**th.as_dict(), "calibration": {k: v for k, v in calibration.items() if k != "per_class"}},
        "seconds": round(seconds, 3), "scoring_seconds": round(scoring_seconds, 3),
        "notes": inp.notes,
        "outputs": ["boxes.parquet", "boxes.csv", "references.parquet", "references.csv", "images.parquet",
                    "images.csv", "problems.csv", "summary.json", "report.html"],
    }
    write_report(out / "report.html", summary, boxes, refs, images, inp.labels.images, image_dir)
    # last: a summary.json on disk says every output it lists is complete (an interrupted run leaves none)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "summary.json")
    return summary


class _NoPairs:
    def losses(self, pred, target, names):
        return {n: np.zeros(0) for n in names}

    def close(self) -> None:
        pass
