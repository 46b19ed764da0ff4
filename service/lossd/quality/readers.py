"""Readers for labels and reference boxes: COCO JSON (instances or results), YOLO txt folders, Pascal VOC XML.

Every reader returns a ``BoxSet``: flat arrays over the whole dataset, boxes in xyxy pixels. A row that cannot be
used (negative size, unknown image or class, a malformed line or file) is never dropped silently: it goes into
``problems`` with its location, and the job reports it.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class InputError(Exception):
    """An input file that cannot be read as what it should be; the message names the file and what was expected."""


@dataclass
class Image:
    key: str  # the image's id as the dataset names it (COCO id, file stem)
    width: float
    height: float
    file: str = ""


@dataclass
class BoxSet:
    images: list[Image]
    categories: list[str]
    image: np.ndarray  # [N] index into images
    category: np.ndarray  # [N] index into categories
    box: np.ndarray  # [N, 4] xyxy
    score: np.ndarray  # [N] confidence (1 for human labels)
    box_id: list[str]  # annotation id, or file:line
    problems: list[dict] = field(default_factory=list)
    ignored: dict = field(default_factory=dict)  # counts of rows deliberately left out (e.g. COCO crowd boxes)
    coco_categories: dict = field(default_factory=dict)  # COCO category id -> name, when read from COCO
    box_format: str = "xyxy"  # the input's own box format: coco (xywh pixels), yolo (cxcywh normalised), xyxy

    def __len__(self) -> int:
        return len(self.box_id)


class _Builder:
    def __init__(self, images: list[Image], categories: list[str], source: str) -> None:
        self.images, self.categories, self.source = images, categories, source
        self.image_index = {im.key: i for i, im in enumerate(images)}
        self.category_index = {c: i for i, c in enumerate(categories)}
        self.rows: list[tuple] = []
        self.problems: list[dict] = []
        self.ignored: dict = {}

    def problem(self, location: str, message: str) -> None:
        self.problems.append({"source": self.source, "location": location, "problem": message})

    def add(self, location: str, box_id: str, image_key: str, category: str, xyxy, score: float = 1.0) -> None:
        img = self.image_index.get(image_key)
        if img is None:
            return self.problem(location, f"unknown image {image_key!r}")
        cat = self.category_index.get(category)
        if cat is None:
            return self.problem(location, f"unknown category {category!r}")
        try:
            x1, y1, x2, y2 = (float(v) for v in xyxy)
        except (TypeError, ValueError):
            return self.problem(location, f"box {xyxy!r} is not four numbers")
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            return self.problem(location, f"box {xyxy!r} is not finite")
        try:
            score = float(score)
        except (TypeError, ValueError):
            score = math.nan
        if not 0.0 <= score <= 1.0:  # NaN too
            return self.problem(location, f"confidence {score!r} is not a number in [0, 1]")
        if x2 < x1 or y2 < y1:
            return self.problem(location, f"negative width or height: {xyxy!r} (x1, y1, x2, y2)")
        self.rows.append((img, cat, x1, y1, x2, y2, score, box_id))

    def build(self) -> BoxSet:
        n = len(self.rows)
        arr = np.array([r[:7] for r in self.rows], dtype=np.float64).reshape(n, 7)
        return BoxSet(self.images, self.categories, arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64),
                      np.ascontiguousarray(arr[:, 2:6]), arr[:, 6].copy(), [r[7] for r in self.rows], self.problems,
                      self.ignored)


# ---------------------------------------------------------------------------------------------------------- COCO
def read_coco(path: str | Path) -> BoxSet:
    """COCO instances JSON: images, categories, annotations (bbox = left, top, width, height)."""
    path = Path(path)
    data = _json(path, "labels")
    if isinstance(data, list):
        raise InputError(f"labels: {path} is a list of detections (COCO results); expected a COCO instances file "
                         "(an object with images, annotations, categories). Are labels and reference swapped?")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"labels: {path} has no 'images' list; expected a COCO instances file")
    images = [Image(str(im["id"]), float(im.get("width", 0)), float(im.get("height", 0)), im.get("file_name", ""))
              for im in data.get("images", [])]
    cats = {c["id"]: c["name"] for c in data.get("categories", [])}
    b = _Builder(images, list(cats.values()), path.name)
    for i, ann in enumerate(data.get("annotations", [])):
        loc = f"annotations[{i}] (id {ann.get('id')})"
        if not isinstance(ann, dict):
            b.problem(loc, "not an object")
            continue
        if ann.get("iscrowd"):
            b.ignored["crowd"] = b.ignored.get("crowd", 0) + 1
            continue
        _coco_row(b, loc, str(ann.get("id", i)), ann, cats)
    out = b.build()
    out.coco_categories = cats
    out.box_format = "coco"
    return out


def _coco_row(b: _Builder, loc: str, box_id: str, row: dict, cats: dict, score: float = 1.0) -> None:
    bbox = row.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        return b.problem(loc, f"bbox {bbox!r} is not [left, top, width, height]")
    if row.get("category_id") not in cats:
        return b.problem(loc, f"unknown category id {row.get('category_id')!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):  # JSON numbers, not "3"
        return b.problem(loc, f"bbox {bbox!r} is not four numbers")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        return b.problem(loc, f"negative width or height in bbox {bbox!r}")
    b.add(loc, box_id, str(row.get("image_id")), cats[row["category_id"]], (x, y, x + w, y + h), score)


def read_coco_reference(path: str | Path, labels: BoxSet, categories_from: str | Path | None = None) -> BoxSet:
    """A reference against the labels' images: COCO results JSON (a list with scores) or another instances JSON
    (a second annotator: score 1). Category ids are the labels' COCO ids (read from ``categories_from``)."""
    path = Path(path)
    data = _json(path, "reference")
    if isinstance(data, dict):  # a second annotator's instances file
        ref = _align(read_coco(path), labels)
        ref.box_format = "coco"
        return ref
    if not isinstance(data, list):
        raise InputError(f"reference: {path} is neither a COCO results list nor a COCO instances file")
    if categories_from:
        cats = _coco_categories(categories_from)
    elif labels.coco_categories:
        cats = labels.coco_categories
    else:  # labels from YOLO/VOC: ids are 0-based class indices
        cats = dict(enumerate(labels.categories))
    b = _Builder(labels.images, labels.categories, path.name)
    # a results list where no row has a score is a second annotator's boxes (confidence 1); where some have one,
    # a row without one is a problem like any other bad row
    scored = any(isinstance(row, dict) and "score" in row for row in data)
    for i, row in enumerate(data):
        loc = f"results[{i}]"
        if not isinstance(row, dict):
            b.problem(loc, "not an object")
            continue
        if scored and "score" not in row:
            b.problem(loc, "no score (other rows have one)")
            continue
        score = row.get("score", 1.0)
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            b.problem(loc, f"score {str(score)[:40]!r} is not a number")
            continue
        _coco_row(b, loc, f"r{i}", row, cats, score)
    out = b.build()
    out.box_format = "coco"
    return out


def _json(path: Path, role: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{role}: {path} not found") from None
    except (OSError, UnicodeError) as exc:
        raise InputError(f"{role}: cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{role}: {path} is not valid JSON ({exc}); expected COCO JSON") from None


def _coco_categories(path: str | Path) -> dict:
    data = _json(Path(path), "categories")
    return {c["id"]: c["name"] for c in data.get("categories", [])}


def _align(ref: BoxSet, labels: BoxSet) -> BoxSet:
    """Re-index a reference read on its own onto the labels' images and categories; the rest become problems."""
    b = _Builder(labels.images, labels.categories, "reference")
    for j in range(len(ref)):
        b.add(f"reference box {ref.box_id[j]}", ref.box_id[j], ref.images[ref.image[j]].key,
              ref.categories[ref.category[j]], ref.box[j], ref.score[j])
    b.problems = ref.problems + b.problems
    return b.build()


# ---------------------------------------------------------------------------------------------------------- YOLO
def read_yolo(folder: str | Path, classes: list[str] | str | Path, sizes: dict[str, tuple[float, float]] | str | Path,
              images: list[Image] | None = None, categories: list[str] | None = None) -> BoxSet:
    """A folder of ``<image>.txt`` files, one box a line: ``class cx cy w h [confidence]``, normalised to [0, 1].
    ``classes``: the class names (a list or a file with one per line); ``sizes``: image sizes in pixels (a dict
    stem -> (width, height), or a CSV file ``image,width,height``)."""
    folder = Path(folder)
    names = _lines(classes) if not isinstance(classes, list) else classes
    size_map = _sizes(sizes) if not isinstance(sizes, dict) else sizes
    if images is None:
        images = [Image(k, float(w), float(h), k) for k, (w, h) in sorted(size_map.items())]
    b = _Builder(images, categories or names, folder.name)
    for txt in sorted(folder.glob("*.txt")):
        if txt.name == "classes.txt":
            continue
        key = txt.stem
        if key not in size_map:
            b.problem(str(txt.name), f"no image size for {key!r}")
            continue
        w_img, h_img = size_map[key]
        for ln, line in enumerate(txt.read_text().splitlines(), 1):
            if not line.strip():
                continue
            loc = f"{txt.name}:{ln}"
            parts = line.split()
            if len(parts) not in (5, 6):
                b.problem(loc, f"expected 'class cx cy w h [confidence]', got {line!r}")
                continue
            try:
                cls = int(parts[0])
                cx, cy, w, h = (float(v) for v in parts[1:5])
                conf = float(parts[5]) if len(parts) == 6 else 1.0
            except ValueError:
                b.problem(loc, f"not numbers: {line!r}")
                continue
            if not 0 <= cls < len(names):
                b.problem(loc, f"unknown class id {cls} ({len(names)} classes)")
                continue
            if w < 0 or h < 0:
                b.problem(loc, f"negative width or height in {line!r}")
                continue
            box = ((cx - w / 2) * w_img, (cy - h / 2) * h_img, (cx + w / 2) * w_img, (cy + h / 2) * h_img)
            b.add(loc, loc, key, names[cls], box, conf)
    out = b.build()
    out.box_format = "yolo"
    return out


def _lines(path: str | Path) -> list[str]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InputError(f"{path} not found (YOLO needs the class names, one per line: --classes; and the image "
                         "sizes as CSV image,width,height: --sizes)") from None
    except (OSError, UnicodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _sizes(path: str | Path) -> dict[str, tuple[float, float]]:
    out = {}
    for ln in _lines(path):
        parts = [p.strip() for p in ln.split(",")]
        if len(parts) == 3 and parts[1].replace(".", "", 1).isdigit():
            out[Path(parts[0]).stem] = (float(parts[1]), float(parts[2]))
    return out


# ---------------------------------------------------------------------------------------------------------- VOC
def read_voc(folder: str | Path, images: list[Image] | None = None, categories: list[str] | None = None) -> BoxSet:
    """A folder of Pascal VOC XML files (one per image: filename, size, objects with name and bndbox)."""
    folder = Path(folder)
    parsed = []
    problems = []
    for xml in sorted(folder.glob("*.xml")):
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as exc:
            problems.append({"source": folder.name, "location": xml.name, "problem": f"malformed XML: {exc}"})
            continue
        size = root.find("size")
        try:
            w = float(size.findtext("width")) if size is not None else 0.0
            h = float(size.findtext("height")) if size is not None else 0.0
        except (TypeError, ValueError):
            w = h = 0.0
        parsed.append((xml, root, Image(xml.stem, w, h, root.findtext("filename") or "")))
    if images is None:
        images = [p[2] for p in parsed]
    if categories is None:
        categories = sorted({(o.findtext("name") or "").strip() for _, root, _ in parsed for o in root.iter("object")})
    b = _Builder(images, categories, folder.name)
    b.problems.extend(problems)
    for xml, root, im in parsed:
        for k, obj in enumerate(root.iter("object")):
            loc = f"{xml.name}: object {k}"
            bb = obj.find("bndbox")
            vals = [bb.findtext(t) if bb is not None else None for t in ("xmin", "ymin", "xmax", "ymax")]
            conf = obj.findtext("score") or obj.findtext("confidence") or 1.0
            b.add(loc, f"{xml.stem}#{k}", im.key, (obj.findtext("name") or "").strip(), vals, conf)
    return b.build()


def read_any(path: str | Path, *, classes=None, sizes=None, like: BoxSet | None = None,
             categories_from: str | Path | None = None) -> BoxSet:
    """Pick the reader by what ``path`` is: a .json file (COCO), or a folder of .xml (VOC) or .txt (YOLO)."""
    path = Path(path)
    role = "reference" if like is not None else "labels"
    if not path.exists():
        raise InputError(f"{role}: {path} not found")
    if path.is_file() and path.suffix == ".json":
        if like is None:
            return read_coco(path)
        return read_coco_reference(path, like, categories_from)
    if path.is_dir() and any(path.glob("*.xml")):
        ref = read_voc(path, like.images if like else None, like.categories if like else None)
        return ref
    if path.is_dir():
        if classes is None:
            classes = path / "classes.txt"
        if sizes is None:
            sizes = path / "sizes.csv"
        return read_yolo(path, classes, sizes, like.images if like else None, like.categories if like else None)
    raise InputError(f"{role}: {path} is not a COCO .json file or a folder of VOC .xml / YOLO .txt files")


# ---------------------------------------------------------------------------------------------------------- cleanlab
def from_cleanlab(labels: list, predictions: list | None = None, class_names: list[str] | dict | None = None,
                  image_sizes: list | None = None) -> tuple[BoxSet, BoxSet | None]:
    """cleanlab ObjectLab's inputs as they are: ``labels`` a list with one dict per image (``bboxes`` [L, 4] xyxy,
    ``labels`` [L] class ids, optionally ``image_name``), ``predictions`` a list with one entry per image holding
    one [M_k, 5] array (x1, y1, x2, y2, probability) per class. Returns (labels, reference)."""
    if not isinstance(labels, (list, tuple)):
        raise InputError(f"labels: expected cleanlab's list of per-image dicts, got {type(labels).__name__}")
    if predictions is not None and len(predictions) != len(labels):
        raise InputError(f"predictions: {len(predictions)} images, but labels has {len(labels)}; cleanlab's "
                         "inputs pair image i of labels with image i of predictions")
    n_cls = 0
    for i, d in enumerate(labels):
        if not isinstance(d, dict) or "bboxes" not in d or "labels" not in d:
            raise InputError(f"labels[{i}]: expected a dict with 'bboxes' and 'labels'")
        ids = np.asarray(d["labels"]).reshape(-1)
        if len(ids):
            n_cls = max(n_cls, int(ids.max()) + 1)
    if predictions is not None:
        for p in predictions:
            n_cls = max(n_cls, len(p))
    if isinstance(class_names, dict):
        names = [str(class_names.get(c, c)) for c in range(n_cls)]
    elif class_names is not None:
        names = [str(c) for c in class_names] + [str(c) for c in range(len(class_names), n_cls)]
    else:
        names = [str(c) for c in range(n_cls)]
    images = []
    for i, d in enumerate(labels):
        w, h = image_sizes[i] if image_sizes is not None else (0.0, 0.0)
        name = str(d.get("image_name", i))
        images.append(Image(str(i), float(w), float(h), name if "image_name" in d else ""))
    lb = _Builder(images, names, "labels")
    for i, d in enumerate(labels):
        boxes = np.asarray(d["bboxes"], dtype=np.float64) if len(d["bboxes"]) else np.zeros((0, 4))
        if boxes.ndim != 2 or boxes.shape[1] != 4:  # an array of the wrong shape is the caller's bug: raise
            raise InputError(f"labels[{i}]['bboxes']: shape {list(boxes.shape)}, expected [L, 4] (x1, y1, x2, y2)")
        ids = np.asarray(d["labels"]).reshape(-1)
        if len(ids) != len(boxes):
            lb.problem(f"labels[{i}]", f"{len(boxes)} bboxes but {len(ids)} labels")
            continue
        for k, (box, c) in enumerate(zip(boxes, ids)):
            lb.add(f"labels[{i}].bboxes[{k}]", f"{i}:{k}", str(i), names[int(c)] if 0 <= int(c) < n_cls else str(c),
                   box)
    lab = lb.build()
    if predictions is None:
        return lab, None
    rb = _Builder(images, names, "predictions")
    for i, per_class in enumerate(predictions):
        for c, arr in enumerate(per_class):
            arr = np.asarray(arr, dtype=np.float64)
            if arr.size == 0:
                continue
            if arr.ndim != 2 or arr.shape[1] != 5:
                raise InputError(f"predictions[{i}][{c}]: shape {list(arr.shape)}, expected [M, 5] (x1, y1, x2, y2, "
                                 "probability)")
            for k, row in enumerate(arr):
                rb.add(f"predictions[{i}][{c}][{k}]", f"{i}:{c}:{k}", str(i), names[c], row[:4], row[4])
    return lab, rb.build()
