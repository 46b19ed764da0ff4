"""`lossd quality` from the command line: inputs and options checked first and named, an --images folder that
does not hold the images, a YOLO reference without its own classes.txt / sizes.csv, and Ctrl-C while the outputs
are written (exit 130, one line, no summary.json until every output it lists is there; a rerun completes)."""

import json
import subprocess
import sys

import pyarrow.csv as pacsv
import pytest

from lossd.cli import main


@pytest.fixture(scope="module")
def coco(coco_dir):
    return str(coco_dir / "instances_val2014_100.json"), str(coco_dir / "fakebbox100_results.json")


def _quality(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lossd.cli", "quality", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=300, **kw)


def _one_error_line(r) -> str:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_an_unknown_loss_is_refused_before_any_output(coco, tmp_path):
    out = tmp_path / "q"
    line = _one_error_line(_quality(*coco, "--out", str(out), "--loss", "nosuch"))
    assert "--loss 'nosuch'" in line and "unknown loss" in line and "ciou" in line
    assert not out.exists()
    line = _one_error_line(_quality(*coco, "--out", str(out), "--loss", "focal"))
    assert "--loss 'focal'" in line and "not a loss between two boxes" in line
    assert not out.exists()


def test_an_out_folder_that_cannot_be_made_is_named(coco, tmp_path):
    (tmp_path / "file").write_text("x")
    line = _one_error_line(_quality(*coco, "--out", str(tmp_path / "file" / "sub")))
    assert line.startswith(f"lossd quality: error: --out {tmp_path / 'file' / 'sub'}: cannot create"), line


def test_an_images_folder_that_does_not_exist_is_an_error(coco, tmp_path):
    line = _one_error_line(_quality(*coco, "--out", str(tmp_path / "q"), "--images", str(tmp_path / "nope")))
    assert f"--images {tmp_path / 'nope'}: no such folder" in line
    assert not (tmp_path / "q").exists()


def test_an_images_folder_missing_most_images_warns_and_lists_them(coco, tmp_path):
    labels = json.loads(open(coco[0]).read())
    images = tmp_path / "images"
    images.mkdir()
    first = labels["images"][0]
    (images / first["file_name"]).write_bytes(b"\xff\xd8\xff\xe0" + b"jpeg" * 10)
    out = tmp_path / "q"
    r = _quality(*coco, "--out", str(out), "--images", str(images))
    assert r.returncode == 3, r.stderr
    n = len(labels["images"])
    assert f"warning: --images {images}: no file for {n - 1} of {n} images" in r.stderr
    problems = pacsv.read_csv(out / "problems.csv").to_pydict()
    missing = {loc for loc, src, what in zip(problems["location"], problems["source"], problems["problem"])
               if src == "images" and "no image file" in what}
    assert missing == {f"image {im['id']}" for im in labels["images"][1:]}


def _yolo(folder, lines, classes=True):
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(lines) + "\n")
    if classes:
        (folder / "classes.txt").write_text("cat\ndog\n")
        (folder / "sizes.csv").write_text("image,width,height\na,200,100\n")
    return folder


def test_a_yolo_reference_uses_the_labels_folders_classes_and_sizes(tmp_path):
    labels = _yolo(tmp_path / "labels", ["0 0.5 0.5 0.2 0.4", "1 0.2 0.2 0.1 0.1"])
    preds = _yolo(tmp_path / "preds", ["0 0.5 0.5 0.2 0.4 0.9", "1 0.21 0.2 0.1 0.1 0.8"], classes=False)
    r = _quality(str(labels), str(preds), "--out", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    assert f"note: reference: {preds} has no classes.txt; using the labels folder's {labels / 'classes.txt'}" \
        in r.stderr
    assert "has no sizes.csv" in r.stderr
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["references"] == 2 and summary["problems"]["count"] == 0
    assert len(summary["notes"]) == 2
    boxes = pacsv.read_csv(tmp_path / "q" / "boxes.csv").to_pydict()
    assert boxes["reference_category"] == ["cat", "dog"]


def test_out_with_a_trailing_slash_is_printed_once(coco, tmp_path):
    out = str(tmp_path / "q") + "/"
    r = _quality(*coco, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'q'}/report.html," in r.stdout and "//" not in r.stdout


def _outputs_complete(out) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"]
    missing = [name for name in summary["outputs"] if not (out / name).is_file()]
    assert not missing
    return summary


def test_ctrl_c_while_writing_outputs_leaves_no_summary_and_a_rerun_completes(coco, tmp_path, capsys,
                                                                              monkeypatch):
    import lossd.quality.report as report

    out = tmp_path / "q"
    assert main(["quality", *coco, "--out", str(out), "--no-progress"]) == 0
    _outputs_complete(out)
    (out / "report.html").unlink()
    capsys.readouterr()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupted)
    try:
        rc = main(["quality", *coco, "--out", str(out), "--no-progress"])
    except KeyboardInterrupt:  # would stop the whole test session
        pytest.fail("KeyboardInterrupt escaped lossd quality")
    assert rc == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lossd quality: interrupted; the shards done are kept in {out / 'shards'}: run the same command "
                   "again to go on"]
    assert not (out / "summary.json").exists()  # the earlier run's summary is gone too: it no longer describes out
    monkeypatch.undo()
    assert main(["quality", *coco, "--out", str(out), "--no-progress"]) == 0
    _outputs_complete(out)


def test_a_real_sigint_while_writing_outputs_exits_130_in_one_line(coco, tmp_path):
    # the signal arrives while the report is written (the slowest output), as a user's Ctrl-C would
    # default_int_handler: as in a terminal, also when the test runs where SIGINT is ignored (a background job)
    code = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import lossd.quality.report as report\n"
            "def slow(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n"
            "report.write_report = slow\n"
            "from lossd.cli import main\n"
            f"sys.exit(main(['quality', {coco[0]!r}, {coco[1]!r}, '--out', {str(tmp_path / 'q')!r}, "
            "'--no-progress']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"lossd quality: interrupted; the shards done are kept in {tmp_path / 'q' / 'shards'}: run the same command "
        "again to go on"]
    assert not (tmp_path / "q" / "summary.json").exists()


def test_an_empty_reference_warns_and_exits_3(coco, tmp_path, capsys):
    # every label "spurious" against an empty predictions file is the wrong file far more often than a dataset
    # whose every box is wrong: warn and exit 3, as with one prediction (most labels with no reference box)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    rc = main(["quality", coco[0], str(empty), "--out", str(tmp_path / "q"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "warning: the reference has no usable boxes" in err and "labels have no reference box" in err
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["references"] == 0 and len(summary["warnings"]) == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_cuda_device_without_a_gpu_is_one_line(coco, tmp_path):
    line = _one_error_line(_quality(*coco, "--out", str(tmp_path / "q"), "--device", "cuda"))
    assert line == "lossd quality: error: --device cuda: torch sees no CUDA GPU here; use cpu or auto"
    assert not (tmp_path / "q").exists()


def test_the_rejected_rows_warning_names_the_kind_of_fault(tmp_path, capsys):
    # was "(most: 'expected')": the reason cut at its first quote
    labels = _yolo(tmp_path / "labels", ["0 0.5 0.5 0.2 0.4"])
    preds = _yolo(tmp_path / "preds", ["0 0.5 0.5", "1 0.2", "0 0.5 0.5 0.2 0.4 0.9"], classes=False)
    rc = main(["quality", str(labels), str(preds), "--out", str(tmp_path / "q"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "warning: reference: 2 of 3 rows rejected (most: 'expected …, got …')" in err, err
