"""`lossd quality`: the batch job. Reads labels and a reference, scores them shard by shard, writes the results.

Shards (contiguous runs of images) are written atomically (a temporary file, then a rename) under
``<out>/shards/``; a re-run with the same inputs and settings skips the shards already there, so a crashed job
resumes where it stopped. The shard results do not depend on where they were computed: in-process, on a server
(``--server grpc://host:port``, over the streaming call), or on Ray workers (``--ray [ADDRESS]``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .. import __version__
from .readers import BoxSet, read_any
from .score import ISSUES, METRICS, Thresholds, group, score_images

LOSSES = ("iou", "giou", "diou", "ciou")


@dataclass
class Inputs:
    labels: BoxSet
    reference: BoxSet
    fingerprint: str


def load(labels_path: str | Path, reference_path: str | Path, *, classes=None, sizes=None, th: Thresholds,
         shard_size: int) -> Inputs:
    labels = read_any(labels_path, classes=classes, sizes=sizes)
    reference = read_any(reference_path, classes=classes, sizes=sizes, like=labels)
    h = hashlib.sha256()
    for p in (Path(labels_path), Path(reference_path)):
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(json.dumps([th.as_dict(), shard_size, __version__], sort_keys=True).encode())
    return Inputs(labels, reference, h.hexdigest()[:16])


# ------------------------------------------------------------------------------------------------ evaluators
def engine_evaluator(device: str = "auto") -> Callable:
    """Pair metrics from the in-process engine: each metric as 1 - its loss, float64 (as the server path)."""
    from ..engine import Engine

    engine = Engine(device=device, warm=False)

    def evaluate(pred: np.ndarray, target: np.ndarray, loss: str) -> dict:
        out = {m: 1.0 - engine.evaluate(m, pred, target, return_grad=False, dtype="float64").loss.numpy()
               for m in LOSSES}
        out["loss"] = engine.evaluate(loss, pred, target, return_grad=False, dtype="float64").loss.numpy()
        return out

    return evaluate


def server_evaluator(url: str, api_key: str | None = None) -> Callable:
    """Pair metrics from a running lossd: one EvaluateStream call per shard carries all five losses."""
    from lossd_client import LossClient

    client = LossClient(url, api_key=api_key)

    def evaluate(pred: np.ndarray, target: np.ndarray, loss: str) -> dict:
        names = list(LOSSES) + [loss]
        results = client.stream([dict(name=n, pred=pred, target=target, return_grad=False) for n in names])
        out = {m: 1.0 - np.asarray(r.loss, dtype=np.float64) for m, r in zip(LOSSES, results[:4])}
        out["loss"] = np.asarray(results[4].loss, dtype=np.float64)
        return out

    evaluate.close = client.close
    return evaluate


# ------------------------------------------------------------------------------------------------ shards
def shard_table(inp: Inputs, images: np.ndarray, th: Thresholds, evaluate: Callable, groups: tuple) -> pa.Table:
    lab, ref = inp.labels, inp.reference
    cols = score_images(lab, ref, images, th, evaluate, *groups)
    kind, row, partner = cols["kind"], cols["row"], cols["partner"]
    is_label = kind == 0

    def pick(of_label: np.ndarray, of_ref: np.ndarray, fill=0) -> np.ndarray:
        out = np.full((len(row),) + of_label.shape[1:], fill, dtype=of_label.dtype)
        out[is_label] = of_label[row[is_label]]
        out[~is_label] = of_ref[row[~is_label]]
        return out

    src_image = pick(lab.image, ref.image)
    src_cat = pick(lab.category, ref.category)
    box = pick(lab.box, ref.box)
    ref_score = pick(np.zeros(len(lab)), ref.score)
    ref_score[is_label] = cols["partner_score"][is_label]
    box_ids = [lab.box_id[r] if k == 0 else ref.box_id[r] for k, r in zip(kind, row)]
    partner_ids = [ref.box_id[p] if p >= 0 else None for p in partner]
    table = {
        "image_id": [lab.images[i].key for i in src_image],
        "kind": ["label" if k == 0 else "reference" for k in kind],
        "box_id": box_ids,
        "category": [lab.categories[c] for c in src_cat],
        "x1": box[:, 0], "y1": box[:, 1], "x2": box[:, 2], "y2": box[:, 3],
        "reference_id": partner_ids,
        "reference_score": ref_score,
        **{m: cols[m] for m in METRICS},
        "loss": cols["loss"],
        "score": cols["score"],
        "issue": list(cols["issue"]),
    }
    return pa.table(table)


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _shards(n_images: int, shard_size: int) -> list[np.ndarray]:
    return [np.arange(s, min(s + shard_size, n_images)) for s in range(0, n_images, shard_size)]


def _progress(total: int, done: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, initial=done, desc=desc, unit="shard", file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return None


def run(labels_path: str | Path, reference_path: str | Path, out_dir: str | Path, *, th: Thresholds = Thresholds(),
        shard_size: int = 500, server: str | None = None, ray_address: str | None = None, use_ray: bool = False,
        image_dir: str | Path | None = None, classes=None, sizes=None, device: str = "auto", progress: bool = True,
        stop_after: int | None = None, api_key: str | None = None) -> dict:
    """Score a dataset; returns the summary. ``stop_after`` shards (tests) simulates a crash part-way."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    shard_dir = out / "shards"
    inp = load(labels_path, reference_path, classes=classes, sizes=sizes, th=th, shard_size=shard_size)
    manifest = shard_dir / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") != inp.fingerprint:
        shutil.rmtree(shard_dir)  # inputs or settings changed: earlier shards do not belong to this run
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"fingerprint": inp.fingerprint, "shard_size": shard_size,
                                    "thresholds": th.as_dict()}))
    shards = _shards(len(inp.labels.images), shard_size)
    paths = [shard_dir / f"shard-{i:05d}.parquet" for i in range(len(shards))]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if stop_after is not None:
        todo = todo[:stop_after]
    bar = _progress(len(shards), len(shards) - len(todo), "scoring") if progress else None
    mode = "ray" if use_ray else ("server" if server else "in-process")
    t_score = time.perf_counter()
    if use_ray:
        _run_ray(inp, shards, paths, todo, th, ray_address, device, bar)
    else:
        evaluate = server_evaluator(server, api_key) if server else engine_evaluator(device)
        groups = (group(inp.labels.image, len(inp.labels.images)), group(inp.reference.image,
                                                                        len(inp.labels.images)))
        try:
            for i in todo:
                _write_atomic(shard_table(inp, shards[i], th, evaluate, groups), paths[i])
                if bar is not None:
                    bar.update(1)
        finally:
            getattr(evaluate, "close", lambda: None)()
    if bar is not None:
        bar.close()
    scored_s = time.perf_counter() - t_score
    if stop_after is not None and any(not p.exists() for p in paths):
        return {"complete": False, "shards_done": sum(p.exists() for p in paths), "shards": len(paths)}
    return finish(inp, paths, out, th, mode=mode, image_dir=image_dir, seconds=time.perf_counter() - t0,
                  scoring_seconds=scored_s)


# ------------------------------------------------------------------------------------------------ ray
def _ray_shard(inp_ref, images: np.ndarray, th: Thresholds, device: str) -> bytes:
    inp = inp_ref
    evaluate = engine_evaluator(device)
    groups = (group(inp.labels.image, len(inp.labels.images)), group(inp.reference.image, len(inp.labels.images)))
    table = shard_table(inp, images, th, evaluate, groups)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _run_ray(inp: Inputs, shards, paths, todo, th, address, device, bar) -> None:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": os.cpu_count() or 2}))
    try:
        remote = ray.remote(_ray_shard)
        inp_ref = ray.put(inp)
        pending = {remote.remote(inp_ref, shards[i], th, device): i for i in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                tmp = paths[i].with_suffix(".tmp")
                tmp.write_bytes(ray.get(ref))
                os.replace(tmp, paths[i])
                if bar is not None:
                    bar.update(1)
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ outputs
def finish(inp: Inputs, paths: Iterable[Path], out: Path, th: Thresholds, *, mode: str, image_dir=None,
           seconds: float, scoring_seconds: float) -> dict:
    tables = [pq.read_table(p) for p in paths]
    boxes = pa.concat_tables(tables) if tables else shard_table(inp, np.arange(0), th, lambda *a: {}, (
        group(inp.labels.image, 0), group(inp.reference.image, 0)))
    pq.write_table(boxes, out / "boxes.parquet")
    pacsv.write_csv(boxes, out / "boxes.csv")
    cols = boxes.to_pydict()
    images = _image_rows(inp, cols)
    with open(out / "images.csv", "w") as f:
        f.write("image_id,file,score," + ",".join(f"n_{i}" for i in ISSUES) + "\n")
        for r in images:
            f.write(f"{_csv(r['image_id'])},{_csv(r['file'])},{r['score']:.6g},"
                    + ",".join(str(r["counts"][i]) for i in ISSUES) + "\n")
    problems = inp.labels.problems + inp.reference.problems
    with open(out / "problems.csv", "w") as f:
        f.write("source,location,problem\n")
        for p in problems:
            f.write(f"{_csv(p['source'])},{_csv(p['location'])},{_csv(p['problem'])}\n")
    by_issue = {i: 0 for i in ISSUES}
    by_class: dict[str, dict[str, int]] = {}
    for cat, issue in zip(cols["category"], cols["issue"]):
        by_issue[issue] += 1
        by_class.setdefault(cat, {i: 0 for i in ISSUES})[issue] += 1
    summary = {
        "lossd_version": __version__, "mode": mode, "complete": True,
        "images": len(inp.labels.images), "labels": len(inp.labels), "references": len(inp.reference),
        "rows": len(cols["issue"]), "by_issue": by_issue, "by_class": by_class,
        "problems": {"count": len(problems), "rows": problems[:1000]},
        "ignored": {"labels": inp.labels.ignored, "references": inp.reference.ignored},
        "thresholds": th.as_dict(), "seconds": round(seconds, 3), "scoring_seconds": round(scoring_seconds, 3),
        "outputs": ["boxes.parquet", "boxes.csv", "images.csv", "problems.csv", "summary.json", "report.html"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from .report import write_report

    write_report(out / "report.html", summary, cols, images, inp.labels.images, image_dir)
    return summary


def _image_rows(inp: Inputs, cols: dict) -> list[dict]:
    rows = {im.key: {"image_id": im.key, "file": im.file, "score": 1.0, "counts": {i: 0 for i in ISSUES}}
            for im in inp.labels.images}
    for img, score, issue in zip(cols["image_id"], cols["score"], cols["issue"]):
        r = rows[img]
        r["score"] = min(r["score"], score)
        r["counts"][issue] += 1
    return sorted(rows.values(), key=lambda r: (r["score"], r["image_id"]))


def _csv(v) -> str:
    s = "" if v is None else str(v)
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n') else s
