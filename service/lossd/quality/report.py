"""report.html: one self-contained page a person reads (inline SVG, a few lines of plain JavaScript for the issue
filter, no network). The page is a Jinja2 template (templates/report.html.j2); this module prepares its data."""

from __future__ import annotations

import base64
from pathlib import Path

import jinja2
import numpy as np
import pyarrow as pa

from .score import ISSUES

COLOURS = {"ok": "#2e7d32", "badly_located": "#ef6c00", "wrong_class": "#6a1b9a", "spurious": "#c62828",
           "unconfirmed": "#757575", "missing": "#1565c0"}
WORST = 24
FLAGGED_ROWS = 300
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
        ".webp": "image/webp"}

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                          autoescape=True, trim_blocks=True, lstrip_blocks=True)


# ------------------------------------------------------------------------------------------------ images folder
def _inside(image_dir: Path, name: str) -> Path | None:
    """``name`` inside ``image_dir`` (resolved, links followed), or None when it is absolute, climbs out with
    ``..`` or resolves outside the folder."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return None
    root = image_dir.resolve()
    cand = (root / name).resolve()
    return cand if cand.is_relative_to(root) else None


def confine_images(images: list, image_dir: str | Path | None) -> list[dict]:
    """A problem row for each image whose file name points outside ``--images``; such files are never read."""
    if image_dir is None:
        return []
    root = Path(image_dir)
    return [{"source": "images", "location": f"image {im.key}",
             "problem": f"file name {im.file[:100]!r} points outside the --images folder; not read"}
            for im in images if im.file and _inside(root, im.file) is None]


def find_image(image_dir: Path, file: str, key: str) -> Path | None:
    """The image's file inside ``image_dir``: its file name, or a browser-readable file named after the image (VOC
    files often name a .tif where a .png/.jpg copy sits); None when there is none or the name points outside."""
    if file and _inside(image_dir, file) is None:
        return None
    names = [file, Path(file).name] if file else []
    names += [f"{stem}{ext}" for stem in (Path(file).stem, key) if stem for ext in MIME]
    for name in names:
        cand = _inside(image_dir, name)
        if cand is not None and cand.is_file() and cand.suffix.lower() in MIME:
            return cand
    return None


def missing_images(images: list, image_dir: str | Path | None) -> list[dict]:
    """A problem row for each image (whose name stays inside ``--images``) with no readable file there."""
    if image_dir is None:
        return []
    root = Path(image_dir)
    return [{"source": "images", "location": f"image {im.key}",
             "problem": f"no image file for it in the --images folder (looked for {im.file[:100]!r} and "
                        f"{im.key[:100]}.png/.jpg/...)"}
            for im in images if not (im.file and _inside(root, im.file) is None) and find_image(root, im.file, im.key)
            is None]


def _image_href(image_dir: Path | None, file: str, key: str) -> str | None:
    """The image as a data: URL (``find_image``). Only files inside ``image_dir`` are read."""
    if image_dir is None:
        return None
    cand = find_image(image_dir, file, key)
    if cand is None:
        return None
    return f"data:{MIME[cand.suffix.lower()]};base64,{base64.b64encode(cand.read_bytes()).decode()}"


# ------------------------------------------------------------------------------------------------ page data
def _histogram(values: np.ndarray, title: str, bins: int = 20) -> dict:
    values = values[np.isfinite(values)]
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    w, h, pad = 420, 180, 30
    top = max(int(counts.max()) if len(counts) else 0, 1)
    bw = (w - 2 * pad) / bins
    bars = [{"x": pad + i * bw, "y": h - pad - c / top * (h - 2 * pad), "w": bw - 1, "h": c / top * (h - 2 * pad),
             "title": f"{edges[i]:.2f}-{edges[i + 1]:.2f}: {c}"} for i, c in enumerate(counts)]
    return {"title": title, "w": w, "h": h, "pad": pad, "bars": bars, "top": top, "n": int(len(values))}


def _card(img, image_row: dict, lab_rows: list[dict], ref_rows: list[dict], image_dir: Path | None) -> dict:
    xs = [r["x2"] for r in lab_rows + ref_rows] + [1]
    ys = [r["y2"] for r in lab_rows + ref_rows] + [1]
    w = img.width or max(xs)
    h = img.height or max(ys)
    scale = 360 / max(w, h, 1)
    shapes = []
    sw = max(1.5 / scale, 0.5)
    for r in lab_rows:
        shapes.append({"cls": f"box label {r['issue']}", "x": r["x1"], "y": r["y1"], "w": r["x2"] - r["x1"],
                       "h": r["y2"] - r["y1"], "colour": COLOURS[r["issue"]], "dash": False, "sw": sw,
                       "title": f"label {r['box_id']} {r['category']}: {r['issue']} (score {r['score']:.2f})"})
        if r["issue"] != "ok" and r["reference_id"] is not None:
            shapes.append({"cls": f"box partner {r['issue']}", "x": r["reference_x1"], "y": r["reference_y1"],
                           "w": r["reference_x2"] - r["reference_x1"], "h": r["reference_y2"] - r["reference_y1"],
                           "colour": COLOURS[r["issue"]], "dash": True, "sw": sw,
                           "title": f"reference {r['reference_id']} {r['reference_category']} (confidence "
                                    f"{r['reference_score']:.2f}, IoU {r['iou']:.2f}) compared with label "
                                    f"{r['box_id']}"})
    for r in ref_rows:
        if r["issue"] == "missing":
            shapes.append({"cls": "box missing", "x": r["x1"], "y": r["y1"], "w": r["x2"] - r["x1"],
                           "h": r["y2"] - r["y1"], "colour": COLOURS["missing"], "dash": True, "sw": sw,
                           "title": f"reference {r['box_id']} {r['category']}: missing (confidence "
                                    f"{r['confidence']:.2f}, score {r['score_missing']:.2f})"})
    issues = sorted({s["cls"].split()[-1] for s in shapes if s["cls"].split()[-1] != "ok"})
    return {"key": img.key, "file": img.file, "rank": image_row["rank"], "score": image_row["score"],
            "n_flagged": image_row["n_flagged"], "issues": issues, "width": w * scale, "height": h * scale,
            "vw": w, "vh": h, "href": _image_href(image_dir, img.file, img.key), "shapes": shapes}


def write_report(path: Path, summary: dict, boxes: pa.Table, refs: pa.Table, images: pa.Table, image_info: list,
                 image_dir: str | Path | None) -> None:
    image_dir = Path(image_dir) if image_dir else None
    info = {im.key: im for im in image_info}
    worst = images.slice(0, WORST).to_pylist()
    wanted = {r["image_id"] for r in worst}
    lab_by, ref_by = {}, {}
    for t, by in ((boxes, lab_by), (refs, ref_by)):
        keep = [i for i, k in enumerate(t.column("image_id").to_pylist()) if k in wanted]
        for r in t.take(pa.array(keep, pa.int64())).to_pylist():
            by.setdefault(r["image_id"], []).append(r)
    cards = [_card(info[r["image_id"]], r, lab_by.get(r["image_id"], []), ref_by.get(r["image_id"], []), image_dir)
             for r in worst]
    flagged = [r for r in boxes.to_pylist() if r["issue"] not in ("ok",)]
    flagged += [r | {"score": r["score_missing"], "reference_id": None} for r in refs.to_pylist()
                if r["issue"] == "missing"]
    flagged.sort(key=lambda r: (r["score"], r["image_id"], r["box_id"]))
    classes = sorted(summary["by_class"].items(),
                     key=lambda kv: (-sum(kv[1][i] for i in ISSUES if i != "ok"), kv[0]))
    score = boxes.column("score").to_numpy(zero_copy_only=False) if boxes.num_rows else np.zeros(0)
    iou = boxes.column("iou").to_numpy(zero_copy_only=False) if boxes.num_rows else np.zeros(0)
    page = _env.get_template("report.html.j2").render(
        summary=summary, issues=ISSUES, colours=COLOURS, cards=cards, flagged=flagged[:FLAGGED_ROWS],
        n_flagged=len(flagged), classes=classes,
        histograms=[_histogram(iou, "IoU of each label box with the reference box it was compared with"),
                    _histogram(score, "score of every label box (lower = more likely wrong)")],
        problems=summary["problems"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page)
    tmp.replace(path)
