"""The batch job end to end: outputs, resumption after a crash, the same results in every mode, the report in a
real headless browser."""

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from lossd.quality import run
from lossd.quality.score import Thresholds


@pytest.fixture(scope="module")
def coco(coco_dir):
    return coco_dir / "instances_val2014_100.json", coco_dir / "fakebbox100_results.json"


@pytest.fixture(scope="module")
def reference_run(coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    summary = run(*coco, out, shard_size=30, progress=False)
    return out, summary


def test_outputs(reference_run):
    out, summary = reference_run
    for name in ("boxes.parquet", "boxes.csv", "images.csv", "problems.csv", "summary.json", "report.html"):
        assert (out / name).exists(), name
    boxes = pq.read_table(out / "boxes.parquet").to_pydict()
    assert summary["labels"] == 830 and summary["references"] == 734 and summary["images"] == 100
    n_label_rows = sum(k == "label" for k in boxes["kind"])
    assert n_label_rows == 830  # every label box has a row
    assert set(boxes["issue"]) <= {"ok", "badly_located", "spurious", "wrong_class", "missing"}
    assert all(0 <= s <= 1 for s in boxes["score"])
    assert sum(summary["by_issue"].values()) == len(boxes["issue"])
    images = (out / "images.csv").read_text().splitlines()
    assert len(images) == 101 and images[0].startswith("image_id,file,score,n_ok")
    assert json.loads((out / "summary.json").read_text())["ignored"]["labels"] == {"crowd": 9}


def test_resume_after_a_crash_equals_an_uninterrupted_run(coco, reference_run, tmp_path):
    partial = run(*coco, tmp_path, shard_size=30, progress=False, stop_after=2)
    assert partial == {"complete": False, "shards_done": 2, "shards": 4}
    (tmp_path / "shards" / "shard-00002.tmp").write_bytes(b"half-written")  # a write the crash interrupted
    run(*coco, tmp_path, shard_size=30, progress=False)
    ref_out, _ = reference_run
    assert (tmp_path / "boxes.csv").read_bytes() == (ref_out / "boxes.csv").read_bytes()
    assert (tmp_path / "images.csv").read_bytes() == (ref_out / "images.csv").read_bytes()


def test_changed_settings_do_not_reuse_old_shards(coco, tmp_path):
    run(*coco, tmp_path, shard_size=30, progress=False)
    strict = run(*coco, tmp_path, shard_size=30, progress=False, th=Thresholds(ok_iou=0.95))
    loose = run(*coco, tmp_path / "loose", shard_size=30, progress=False, th=Thresholds(ok_iou=0.95))
    assert strict["by_issue"] == loose["by_issue"]


def test_server_mode_gives_identical_results(coco, reference_run, live_server, tmp_path):
    run(*coco, tmp_path, shard_size=30, progress=False, server=live_server.grpc_url)
    ref_out, _ = reference_run
    assert (tmp_path / "boxes.csv").read_bytes() == (ref_out / "boxes.csv").read_bytes()
    assert json.loads((tmp_path / "summary.json").read_text())["mode"] == "server"


def test_ray_mode_gives_identical_results(coco, reference_run, tmp_path):
    pytest.importorskip("ray", reason="Ray comes with the test extra")
    run(*coco, tmp_path, shard_size=30, progress=False, use_ray=True)
    ref_out, _ = reference_run
    assert (tmp_path / "boxes.csv").read_bytes() == (ref_out / "boxes.csv").read_bytes()


def test_cli_with_bad_rows_and_progress(coco_dir, tmp_path):
    data = json.loads((coco_dir / "instances_val2014_100.json").read_text())
    data["annotations"][0]["bbox"][2] = -5
    data["annotations"][1]["image_id"] = 123456789
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(data))
    res = subprocess.run([sys.executable, "-m", "lossd.cli", "quality", str(labels),
                          str(coco_dir / "fakebbox100_results.json"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "scoring" in res.stderr and "100%" in res.stderr  # the progress bar
    problems = (tmp_path / "out" / "problems.csv").read_text()
    assert "annotations[0]" in problems and "negative width" in problems
    assert "annotations[1]" in problems and "unknown image" in problems
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["problems"]["count"] == 2


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
    # VOC labels against themselves with one box moved: the page shows the real image with the boxes on it
    ref = tmp_path / "ref"
    ref.mkdir()
    xml = (voc_dir / "OSBS_029.xml").read_text().replace("<xmin>203</xmin>", "<xmin>183</xmin>", 1)
    (ref / "OSBS_029.xml").write_text(xml)
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(voc_dir / "OSBS_029.xml", labels)
    out = tmp_path / "out"
    summary = run(labels, ref, out, image_dir=voc_dir, progress=False)
    assert summary["by_issue"]["ok"] == 60 and summary["by_issue"]["badly_located"] == 1
    profile = tmp_path / "profile"
    dom = _chromium([f"--user-data-dir={profile}", "--dump-dom", (out / "report.html").as_uri()])
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "Label-quality report" in html and 'id="by-issue"' in html
    assert html.count('class="box ') == 61 and "data:image/png;base64," in html  # boxes drawn on the image
    shot = tmp_path / "report.png"
    res = _chromium([f"--user-data-dir={profile}", "--window-size=1200,1600", f"--screenshot={shot}",
                     (out / "report.html").as_uri()])
    assert res.returncode == 0 and shot.stat().st_size > 20_000


def test_server_mode_sends_the_api_key(coco, reference_run, tmp_path):
    from lossd_client import LossdError

    from ..conftest import start_server

    server = start_server({"LOSSD_API_KEYS": '["k3y"]'})
    try:
        with pytest.raises(LossdError):
            run(*coco, tmp_path / "denied", shard_size=50, progress=False, server=server.grpc_url)
        run(*coco, tmp_path / "ok", shard_size=30, progress=False, server=server.grpc_url, api_key="k3y")
        assert (tmp_path / "ok" / "boxes.csv").read_bytes() == (reference_run[0] / "boxes.csv").read_bytes()
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)
