"""report.html: one self-contained page (inline SVG, no scripts, no network) a person reads."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from .score import ISSUES

COLOURS = {"ok": "#2e7d32", "badly_located": "#ef6c00", "spurious": "#c62828", "wrong_class": "#6a1b9a",
           "missing": "#1565c0"}
WORST = 24
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
        ".webp": "image/webp"}


def _e(v) -> str:
    return html.escape(str(v))


def _histogram(values: np.ndarray, title: str, lo: float = 0.0, hi: float = 1.0, bins: int = 20) -> str:
    values = values[np.isfinite(values)]
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    w, h, pad = 420, 180, 30
    top = max(int(counts.max()) if len(counts) else 0, 1)
    bw = (w - 2 * pad) / bins
    bars = "".join(
        f'<rect x="{pad + i * bw:.1f}" y="{h - pad - c / top * (h - 2 * pad):.1f}" width="{bw - 1:.1f}" '
        f'height="{c / top * (h - 2 * pad):.1f}" fill="#5c6bc0"><title>{edges[i]:.2f}-{edges[i + 1]:.2f}: {c}'
        f'</title></rect>' for i, c in enumerate(counts))
    axis = (f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>'
            f'<text x="{pad}" y="{h - 10}" font-size="11">{lo:g}</text>'
            f'<text x="{w - pad - 10}" y="{h - 10}" font-size="11">{hi:g}</text>'
            f'<text x="{pad}" y="16" font-size="12">max bin {top}, n = {len(values)}</text>')
    return (f'<figure class="hist"><svg width="{w}" height="{h}" role="img" aria-label="{_e(title)}">{bars}{axis}'
            f'</svg><figcaption>{_e(title)}</figcaption></figure>')


def _image_href(image_dir: Path | None, file: str, key: str) -> str | None:
    """The image as a data: URL: its file name, or any browser-readable file named after the image (VOC files
    often name a .tif where a .png/.jpg copy sits)."""
    if image_dir is None:
        return None
    cands = [image_dir / file, image_dir / Path(file).name] if file else []
    cands += [image_dir / f"{stem}{ext}" for stem in (Path(file).stem, key) if stem for ext in MIME]
    for cand in cands:
        if cand.is_file() and cand.suffix.lower() in MIME:
            data = base64.b64encode(cand.read_bytes()).decode()
            return f"data:{MIME[cand.suffix.lower()]};base64,{data}"
    return None


def _drawing(img, rows: list[dict], image_dir: Path | None) -> str:
    w = img.width or max([r["x2"] for r in rows] + [1])
    h = img.height or max([r["y2"] for r in rows] + [1])
    scale = 360 / max(w, h, 1)
    href = _image_href(image_dir, img.file, img.key)
    bg = (f'<image href="{href}" x="0" y="0" width="{w}" height="{h}" preserveAspectRatio="none"/>' if href
          else f'<rect x="0" y="0" width="{w}" height="{h}" fill="#f4f4f4" stroke="#bbb"/>')
    shapes = []
    for r in rows:
        colour = COLOURS[r["issue"]]
        dash = ' stroke-dasharray="6 4"' if r["kind"] == "reference" else ""
        sw = max(1.5 / scale, 0.5)
        label = f'{r["category"]}: {r["issue"]} (score {r["score"]:.2f})'
        shapes.append(f'<rect class="box {r["issue"]}" x="{r["x1"]:.1f}" y="{r["y1"]:.1f}" '
                      f'width="{r["x2"] - r["x1"]:.1f}" height="{r["y2"] - r["y1"]:.1f}" fill="none" '
                      f'stroke="{colour}" stroke-width="{sw:.2f}"{dash}><title>{_e(label)}</title></rect>')
    return (f'<svg class="drawing" width="{w * scale:.0f}" height="{h * scale:.0f}" viewBox="0 0 {w} {h}">'
            f'{bg}{"".join(shapes)}</svg>')


def write_report(path: Path, summary: dict, cols: dict, images: list[dict], image_info: list,
                 image_dir: str | Path | None) -> None:
    image_dir = Path(image_dir) if image_dir else None
    info = {im.key: im for im in image_info}
    n = len(cols["issue"])
    rows_by_image: dict[str, list[dict]] = {}
    worst = {r["image_id"] for r in images[:WORST]}
    for i in range(n):
        img = cols["image_id"][i]
        if img in worst:
            rows_by_image.setdefault(img, []).append({k: cols[k][i] for k in ("kind", "category", "x1", "y1", "x2",
                                                                                "y2", "issue", "score")})
    issue_rows = "".join(f'<tr><td><span class="sw" style="background:{COLOURS[i]}"></span>{i}</td>'
                         f'<td class="num">{summary["by_issue"][i]}</td></tr>' for i in ISSUES)
    classes = sorted(summary["by_class"].items(), key=lambda kv: -sum(v for k, v in kv[1].items() if k != "ok"))
    class_rows = "".join("<tr><td>" + _e(c) + "</td>" + "".join(f'<td class="num">{v[i]}</td>' for i in ISSUES)
                         + "</tr>" for c, v in classes[:20])
    cards = []
    for r in images[:WORST]:
        im = info[r["image_id"]]
        counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items() if v)
        cards.append(f'<div class="card"><h3>image {_e(r["image_id"])} <small>score {r["score"]:.2f}</small></h3>'
                     f'{_drawing(im, rows_by_image.get(r["image_id"], []), image_dir)}'
                     f'<p>{_e(counts) or "no boxes"}</p></div>')
    problems = summary["problems"]
    prob_rows = "".join(f"<tr><td>{_e(p['source'])}</td><td>{_e(p['location'])}</td><td>{_e(p['problem'])}</td>"
                        f"</tr>" for p in problems["rows"][:200])
    ious = np.asarray([v for v, k in zip(cols["iou"], cols["kind"]) if k == "label"], dtype=float)
    scores = np.asarray(cols["score"], dtype=float)
    legend = "".join(f'<span class="sw" style="background:{c}"></span>{i} ' for i, c in COLOURS.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lossd label-quality report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ margin-bottom: 4px; }} .sub {{ color: #666; margin-top: 0; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }} td, th {{ border: 1px solid #ddd; padding: 3px 8px; }}
th {{ background: #f0f0f0; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.sw {{ display: inline-block; width: 10px; height: 10px; margin-right: 6px; border-radius: 2px; }}
.row {{ display: flex; flex-wrap: wrap; gap: 16px; }} figure {{ margin: 0; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 16px; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 8px; }} .card h3 {{ margin: 0 0 6px; font-size: 15px; }}
</style></head><body>
<h1>Label-quality report</h1>
<p class="sub">{summary['images']} images, {summary['labels']} label boxes, {summary['references']} reference boxes;
{problems['count']} bad input rows; computed {_e(summary['mode'])} in {summary['seconds']:.1f} s
(lossd {_e(summary['lossd_version'])}).</p>
<h2>Boxes by issue</h2><table id="by-issue"><tr><th>issue</th><th>boxes</th></tr>{issue_rows}</table>
<h2>Distributions</h2><div class="row">{_histogram(ious, "IoU of each label box with its reference")}
{_histogram(scores, "quality score of every row (lower = more likely wrong)")}</div>
<h2>Worst images</h2><p>{legend} — solid: label boxes; dashed: reference boxes with no label (missing).</p>
<div class="cards" id="worst">{''.join(cards)}</div>
<h2>By class (the 20 with most issues)</h2><table id="by-class"><tr><th>class</th>{''.join(f'<th>{i}</th>' for i in ISSUES)}</tr>
{class_rows}</table>
<h2>Bad input rows</h2><table id="problems"><tr><th>source</th><th>location</th><th>problem</th></tr>{prob_rows}
</table>
<h2>Settings</h2><pre>{_e(summary['thresholds'])}</pre>
</body></html>
"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page)
    tmp.replace(path)


