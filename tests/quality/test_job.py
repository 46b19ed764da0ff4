"""The batch job end to end: outputs, resumption after a crash, the same results in every mode and through the
Python API, the CLI's errors and exit codes, image paths confined to --images, the report in a real headless
browser."""

import base64
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from lossd.cli import main
from lossd.quality import evaluate, evaluate_all, read_coco, run
from lossd.quality.job import image_table
from lossd.quality.readers import read_coco_reference
from lossd.quality.score import ISSUES, SEVERITY, Thresholds

from .conftest import write_json
from .ray_workers import ray_workers


@pytest.fixture(scope="module")
def coco(coco_dir):
    return coco_dir / "instances_val2014_100.json", coco_dir / "fakebbox100_results.json"


@pytest.fixture(scope="module")
def reference_run(coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    summary = run(*coco, out, shard_size=30, progress=False)
    return out, summary


def test_outputs(coco, reference_run):
    out, summary = reference_run
    for name in summary["outputs"]:
        assert (out / name).exists(), name
    boxes = pq.read_table(out / "boxes.parquet").to_pydict()
    refs = pq.read_table(out / "references.parquet").to_pydict()
    assert summary["labels"] == 830 and summary["references"] == 734 and summary["images"] == 100
    assert len(boxes["box_id"]) == 830 and len(set(boxes["box_id"])) == 830  # one row per label box
    assert len(refs["box_id"]) == 734 and len(set(refs["box_id"])) == 734  # one row per reference box
    assert set(boxes["issue"]) <= set(ISSUES) - {"missing"}
    assert set(refs["issue"]) <= {"matched", "unmatched", "missing"}
    for col in ("score", "score_badly_located", "score_wrong_class", "score_spurious"):
        assert all(0 <= s <= 1 for s in boxes[col]), col
    assert all(0 <= s <= 1 for s in refs["score_missing"])
    assert sum(summary["by_issue"].values()) == 830 + refs["issue"].count("missing")
    # boxes in the input's own format (COCO: left, top, width, height) beside x1..y2
    raw = {str(a["id"]): a["bbox"] for a in json.loads(coco[0].read_text())["annotations"]}
    i = 5
    np.testing.assert_allclose([boxes[c][i] for c in ("coco_x", "coco_y", "coco_w", "coco_h")], raw[boxes["box_id"][i]])
    # a flagged label carries the reference box it was compared with
    j = boxes["issue"].index("wrong_class")
    k = refs["box_id"].index(boxes["reference_id"][j])
    xyxy = ("x1", "y1", "x2", "y2")
    assert [boxes[f"reference_{c}"][j] for c in xyxy] == [refs[c][k] for c in xyxy]
    assert refs["category"][k] != boxes["category"][j] == boxes["category"][j]
    cal = summary["thresholds"]["calibration"]
    assert set(cal["pooled"]) == {"conf", "ok_iou", "missing_conf"} and "Youden" in cal["rule"]
    assert all("thresholds" in row for row in summary["by_class"].values())
    assert json.loads((out / "summary.json").read_text())["ignored"]["labels"] == {"crowd": 9}
    # images: every image once, worst first, ties broken by flagged count then severity
    images = pacsv.read_csv(out / "images.csv").to_pydict()
    assert len(images["image_id"]) == 100 and len(set(images["image_id"])) == 100
    keys = [(s, -f, -SEVERITY[w]) for s, f, w in zip(images["score"], images["n_flagged"], images["worst_issue"])]
    assert keys == sorted(keys) and images["rank"] == list(range(1, 101))


def test_image_score_counts_every_box(tmp_path):
    """Two images alike but for a second spurious box: the one with two ranks lower (the minimum would tie)."""
    def img(i):
        return {"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"}
    cats = [{"id": 1, "name": "cat"}]
    anns, preds = [], []
    for i in range(40):  # enough clean boxes for the ranks to mean something
        anns.append({"id": 100 + i, "image_id": 10 + i, "category_id": 1, "bbox": [10, 10, 30, 30]})
        preds.append({"image_id": 10 + i, "category_id": 1, "bbox": [10, 10, 30, 31], "score": 0.9})
    anns += [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [60, 60, 10, 10]},
             {"id": 2, "image_id": 2, "category_id": 1, "bbox": [60, 60, 10, 10]},
             {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10]}]
    labels = write_json(tmp_path / "l.json", {"images": [img(1), img(2)] + [img(10 + i) for i in range(40)],
                                               "categories": cats, "annotations": anns})
    s = evaluate_all(labels, write_json(tmp_path / "p.json", preds))
    images = s.images.to_pydict()
    assert images["image_id"][:2] == ["2", "1"] and images["n_flagged"][:2] == [2, 1]
    assert images["score"][0] < images["score"][1]


def test_image_score_by_hand():
    """The image score on hand-made tables, each chance written out: p = reliability * (0.9 * flagged + 0.1 *
    (1 - r) ** 10), r the rank of the box's score among that type's scores; image score = prod(1 - p)."""
    boxes = pa.table({"image_id": ["wc", "sp", "ok"], "issue": ["wrong_class", "spurious", "ok"],
                      "score_badly_located": [0.7, 0.7, 0.9], "score_wrong_class": [0.1, 0.5, 0.9],
                      "score_spurious": [0.9, 0.0, 0.9]})
    refs = pa.table({"image_id": ["mi", "ok"], "issue": ["missing", "matched"], "score_missing": [0.2, 1.0]})
    got = image_table(["ok", "mi", "sp", "wc"], ["o.png", "m.png", "s.png", "w.png"], boxes, refs).to_pydict()
    # ranks among three: 1/6 (lowest), 1/2, 5/6 (highest); two tied lowest 1/3, two tied highest 2/3
    low, mid, top, tie_low, tie_top = (5 / 6) ** 10, (1 / 2) ** 10, (1 / 6) ** 10, (2 / 3) ** 10, (1 / 3) ** 10
    expected = {
        # the wrong-class flag (reliability 0.9), its tied badly-located and spurious ranks
        "wc": (1 - 0.9 * (0.9 + 0.1 * low)) * (1 - 0.9 * 0.1 * tie_low) * (1 - 0.5 * 0.1 * tie_top),
        # the spurious flag weighs only 0.5: no reference on a box is as often the model's own miss
        "sp": (1 - 0.5 * (0.9 + 0.1 * low)) * (1 - 0.9 * 0.1 * tie_low) * (1 - 0.9 * 0.1 * mid),
        "mi": 1 - 0.5 * (0.9 + 0.1 * (3 / 4) ** 10),  # a flagged missing reference, ranked 1/4 of two
        "ok": (1 - 0.9 * 0.1 * top) ** 2 * (1 - 0.5 * 0.1 * tie_top) * (1 - 0.5 * 0.1 * (1 / 4) ** 10),
    }
    assert got["image_id"] == ["wc", "sp", "mi", "ok"] and got["rank"] == [1, 2, 3, 4]
    np.testing.assert_allclose(got["score"], [expected[k] for k in got["image_id"]], rtol=1e-12)
    assert got["file"] == ["w.png", "s.png", "m.png", "o.png"] and got["n_flagged"] == [1, 1, 1, 0]
    assert got["worst_issue"] == ["wrong_class", "spurious", "missing", "ok"]


def test_images_alike_are_ordered_without_ties():
    """Images with the same score are ordered by the worst issue's severity, then by image id."""
    boxes = pa.table({"image_id": ["e", "b", "a", "c"], "issue": ["ok", "unconfirmed", "badly_located", "ok"],
                      "score_badly_located": [0.9] * 4, "score_wrong_class": [0.9] * 4, "score_spurious": [0.9] * 4})
    refs = pa.table({"image_id": pa.array([], pa.string()), "issue": pa.array([], pa.string()),
                     "score_missing": pa.array([], pa.float64())})
    got = image_table(["e", "c", "b", "a"], ["e", "c", "b", "a"], boxes, refs).to_pydict()
    # a's flag lowers its score; b, c and e score alike (an unconfirmed label is not an error), b's issue is worse
    assert got["image_id"] == ["a", "b", "c", "e"] and got["rank"] == [1, 2, 3, 4]
    assert got["score"][0] < got["score"][1] == got["score"][2] == got["score"][3]
    assert got["worst_issue"] == ["badly_located", "unconfirmed", "ok", "ok"]


def test_resume_after_a_crash_equals_an_uninterrupted_run(coco, reference_run, tmp_path):
    partial = run(*coco, tmp_path, shard_size=30, progress=False, stop_after=2)
    assert partial == {"complete": False, "shards_done": 2, "shards": 4}
    (tmp_path / "shards" / "shard-00002.tmp").write_bytes(b"half-written")  # a write the crash interrupted
    run(*coco, tmp_path, shard_size=30, progress=False)
    ref_out, _ = reference_run
    for name in ("boxes.csv", "references.csv", "images.csv"):
        assert (tmp_path / name).read_bytes() == (ref_out / name).read_bytes(), name


def test_changed_settings_do_not_reuse_old_shards(coco, tmp_path):
    run(*coco, tmp_path, shard_size=30, progress=False)
    strict = run(*coco, tmp_path, shard_size=30, progress=False, th=Thresholds(ok_iou=0.95))
    fresh = run(*coco, tmp_path / "fresh", shard_size=30, progress=False, th=Thresholds(ok_iou=0.95))
    assert strict["by_issue"] == fresh["by_issue"]
    assert strict["thresholds"]["calibration"]["source"]["ok_iou"] == "given"


def test_python_api_equals_the_job_and_reads_cleanlab_inputs(coco, reference_run):
    ref_out, _ = reference_run
    job = pq.read_table(ref_out / "boxes.parquet").sort_by("box_id")
    api = evaluate(*coco).sort_by("box_id")
    assert api.column_names == job.column_names
    for col in ("issue", "score", "score_badly_located", "score_wrong_class", "score_spurious", "reference_id"):
        assert api.column(col).to_pylist() == job.column(col).to_pylist(), col
    # the same boxes as cleanlab ObjectLab's inputs: the same scores, box for box
    lab = read_coco(coco[0])
    ref = read_coco_reference(coco[1], lab)
    labels, predictions, names, pnames = [], [], [], []
    for i in range(len(lab.images)):
        rows = np.flatnonzero(lab.image == i)
        labels.append({"bboxes": lab.box[rows], "labels": lab.category[rows]})
        names += [lab.box_id[r] for r in rows]
        per_class = []
        for c in range(len(lab.categories)):
            rr = np.flatnonzero((ref.image == i) & (ref.category == c))
            per_class.append(np.c_[ref.box[rr], ref.score[rr]] if len(rr) else np.zeros((0, 5)))
            pnames += [ref.box_id[r] for r in rr]
        predictions.append(per_class)
    cl = evaluate_all(labels, predictions, class_names=lab.categories)
    by_name = dict(zip([f"{i}:{k}" for i, d in enumerate(labels) for k in range(len(d["labels"]))], names))
    got = {by_name[b]: s for b, s in zip(cl.boxes.column("box_id").to_pylist(), cl.boxes.column("score").to_pylist())}
    want = dict(zip(job.column("box_id").to_pylist(), job.column("score").to_pylist()))
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) < 1e-9
    with pytest.raises(TypeError, match="unknown threshold"):
        evaluate(*coco, ok=0.5)


def test_ray_mode_gives_identical_results(coco, reference_run, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray comes with the test extra")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # run() uses it, and leaves it running
    try:
        summary = run(*coco, tmp_path, shard_size=30, progress=False, use_ray=True)
        workers = ray_workers(os.getpid())
    finally:
        ray.shutdown()
    # each worker loaded an engine of its own (with --server too, none does: test_ray_server.py)
    assert summary["mode"] == "ray" and workers and all(w["torch"] for w in workers.values()), workers
    ref_out, _ = reference_run
    assert (tmp_path / "boxes.csv").read_bytes() == (ref_out / "boxes.csv").read_bytes()


def test_yolo_boxes_also_in_yolo_format(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\n")
    (tmp_path / "sizes.csv").write_text("image,width,height\nimg1,200,100\n")
    (tmp_path / "img1.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    boxes = evaluate(tmp_path, tmp_path).to_pydict()
    assert [boxes[c][0] for c in ("yolo_cx", "yolo_cy", "yolo_w", "yolo_h")] == pytest.approx([0.5, 0.5, 0.2, 0.4])
    assert [boxes[c][0] for c in ("x1", "y1", "x2", "y2")] == pytest.approx([80, 30, 120, 70])
    assert boxes["issue"] == ["ok"]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_errors_are_one_line_with_an_exit_code(coco, voc_dir, tmp_path, capsys, monkeypatch):
    labels, results = map(str, coco)
    assert main(["quality", str(tmp_path / "nope.json"), results, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lossd quality: error: labels: {tmp_path / 'nope.json'} not found"]
    assert main(["quality", results, labels, "--out", str(tmp_path / "o")]) == 2  # swapped
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "swapped" in err[0] and "fakebbox100_results.json" in err[0]
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["quality", labels, results, "--out", str(tmp_path / "o"), "--ray"]) == 2
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err
    # VOC labels against COCO predictions: nothing lines up; outputs are written, but it warns and exits 3
    assert main(["quality", str(voc_dir), results, "--out", str(tmp_path / "voc"), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "warning: reference: 734 of 734 rows rejected (most: 'unknown category id …')" in err
    assert (tmp_path / "voc" / "boxes.csv").exists()


def test_cli_bad_rows_and_a_progress_bar_in_images(coco_dir, tmp_path, capsys):
    data = json.loads((coco_dir / "instances_val2014_100.json").read_text())
    data["annotations"][0]["bbox"][2] = -5
    data["annotations"][1]["image_id"] = 123456789
    labels = write_json(tmp_path / "labels.json", data)
    rc = main(["quality", str(labels), str(coco_dir / "fakebbox100_results.json"), "--out", str(tmp_path / "out"),
               "--shard-size", "40"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "100/100" in captured.err and "image" in captured.err  # counts images, not shards
    problems = (tmp_path / "out" / "problems.csv").read_text()
    assert "annotations[0]" in problems and "negative width" in problems
    assert "annotations[1]" in problems and "unknown image" in problems
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["problems"]["count"] == 2


def test_cli_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as done:
        main(["quality", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.1)" in text and "(default: 500)" in text and "(default: calibrated per class" in text
    assert "Exit codes:" in text


# ------------------------------------------------------------------------------------------------ images folder
def test_image_paths_are_confined_to_the_images_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n" + b"SECRET-BYTES" * 20)
    (images / "ok.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"fine-bytes" * 20)
    (images / "link.png").symlink_to(secret)
    ims = [{"id": 1, "width": 50, "height": 50, "file_name": "ok.png"},
           {"id": 2, "width": 50, "height": 50, "file_name": "../secret.png"},
           {"id": 3, "width": 50, "height": 50, "file_name": str(secret)},
           {"id": 4, "width": 50, "height": 50, "file_name": "link.png"}]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [5, 5, 10, 10]} for i in range(1, 5)]
    labels = write_json(tmp_path / "l.json", {"images": ims, "categories": [{"id": 1, "name": "c"}],
                                              "annotations": anns})
    out = tmp_path / "out"
    run(labels, labels, out, image_dir=images, progress=False)
    problems = pacsv.read_csv(out / "problems.csv").to_pydict()
    refused = {loc for loc, src in zip(problems["location"], problems["source"]) if src == "images"}
    assert refused == {"image 2", "image 3", "image 4"}
    page = (out / "report.html").read_text()
    assert base64.b64encode(secret.read_bytes()).decode()[:40] not in page
    assert base64.b64encode((images / "ok.png").read_bytes()).decode()[:40] in page


# ------------------------------------------------------------------------------------------------ browser
def _chromium(args: list[str]) -> subprocess.CompletedProcess:
    exe = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if not exe:
        # .ci/run installs Debian's chromium and sets LOSSD_REQUIRE_CHROMIUM=1, so CI never skips this
        if os.environ.get("LOSSD_REQUIRE_CHROMIUM") == "1":
            pytest.fail("no chromium on PATH, and LOSSD_REQUIRE_CHROMIUM=1")
        pytest.skip("no chromium on PATH: the report is not opened in a browser (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_in_a_headless_browser(voc_dir, tmp_path):
    # VOC labels against themselves with one box moved and one relabelled: the page shows the real image with the
    # label boxes, and the reference box each flagged label was compared with (dashed)
    ref = tmp_path / "ref"
    ref.mkdir()
    xml = (voc_dir / "OSBS_029.xml").read_text().replace("<xmin>203</xmin>", "<xmin>183</xmin>", 1)
    (ref / "OSBS_029.xml").write_text(xml)
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(voc_dir / "OSBS_029.xml", labels)
    out = tmp_path / "out"
    summary = run(labels, ref, out, image_dir=voc_dir, progress=False, th=Thresholds(ok_iou=0.9))
    assert summary["by_issue"]["ok"] == 60 and summary["by_issue"]["badly_located"] == 1
    # one browser run: the page as drawn, with the issue filter (plain JavaScript) applied from its address
    profile = tmp_path / "profile"
    dom = _chromium([f"--user-data-dir={profile}", "--dump-dom", (out / "report.html").as_uri() + "#issue=spurious"])
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "Label-quality report" in html and 'id="by-issue"' in html and 'id="by-class"' in html
    assert html.count('class="box label ') == 61 and "data:image/png;base64," in html  # boxes on the image
    assert html.count('class="box partner badly_located"') == 1 and 'stroke-dasharray="6 4"' in html
    assert 'data-filter="spurious"' in html and "0 of the worst images show spurious" in html
    assert 'class="card" data-issues="badly_located" hidden' in html

def test_server_mode_gives_identical_results_and_sends_the_api_key(coco, reference_run, tmp_path):
    from lossd_client import LossdError

    from ..conftest import start_server

    server = start_server({"LOSSD_API_KEYS": '["k3y"]'})
    try:
        with pytest.raises(LossdError):
            run(*coco, tmp_path / "denied", shard_size=50, progress=False, server=server.grpc_url)
        run(*coco, tmp_path / "ok", shard_size=30, progress=False, server=server.grpc_url, api_key="k3y")
        for name in ("boxes.csv", "references.csv", "images.csv"):
            assert (tmp_path / "ok" / name).read_bytes() == (reference_run[0] / name).read_bytes(), name
        assert json.loads((tmp_path / "ok" / "summary.json").read_text())["mode"] == "server"
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)
