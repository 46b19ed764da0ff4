"""Readers on real annotation data, and bad rows reported with their location, never dropped silently."""

import json

import numpy as np
import pytest

from lossd.quality import InputError, from_cleanlab, read_any, read_coco, read_voc, read_yolo
from lossd.quality.readers import read_coco_reference

from .conftest import write_json


def test_coco_real_data(coco_dir):
    labels = read_coco(coco_dir / "instances_val2014_100.json")
    assert len(labels.images) == 100 and len(labels.categories) == 80
    assert len(labels) == 830 and labels.ignored == {"crowd": 9} and labels.problems == []
    raw = json.loads((coco_dir / "instances_val2014_100.json").read_text())
    first = next(a for a in raw["annotations"] if not a["iscrowd"])
    i = labels.box_id.index(str(first["id"]))
    x, y, w, h = first["bbox"]
    np.testing.assert_allclose(labels.box[i], [x, y, x + w, y + h])
    preds = read_coco_reference(coco_dir / "fakebbox100_results.json", labels)
    assert len(preds) == 734 and preds.problems == [] and preds.score.max() <= 1


def test_coco_bad_rows_are_reported(tmp_path):
    data = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
            "categories": [{"id": 3, "name": "cat"}],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]},
                {"id": 11, "image_id": 1, "category_id": 3, "bbox": [1, 2, -3, 4]},
                {"id": 12, "image_id": 9, "category_id": 3, "bbox": [1, 2, 3, 4]},
                {"id": 13, "image_id": 1, "category_id": 7, "bbox": [1, 2, 3, 4]},
                {"id": 14, "image_id": 1, "category_id": 3, "bbox": [1, 2, "x", 4]},
                {"id": 15, "image_id": 1, "category_id": 3, "bbox": [1, 2]},
            ]}
    labels = read_coco(write_json(tmp_path / "l.json", data))
    assert labels.box_id == ["10"]
    got = {p["location"]: p["problem"] for p in labels.problems}
    assert len(got) == 5
    assert "negative width" in got["annotations[1] (id 11)"]
    assert "unknown image" in got["annotations[2] (id 12)"]
    assert "unknown category" in got["annotations[3] (id 13)"]
    assert "four numbers" in got["annotations[4] (id 14)"]
    assert "not [left, top, width, height]" in got["annotations[5] (id 15)"]


def test_yolo_folder(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "sizes.csv").write_text("image,width,height\nimg1,200,100\nimg2,50,50\n")
    (tmp_path / "img1.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.25 0.25 0.1 0.1 0.9\n7 0.5 0.5 0.1 0.1\n"
                                       "0 0.5 0.5 -0.1 0.1\nbad line\n")
    (tmp_path / "img3.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    b = read_yolo(tmp_path, tmp_path / "classes.txt", tmp_path / "sizes.csv")
    assert len(b) == 2 and [im.key for im in b.images] == ["img1", "img2"]
    np.testing.assert_allclose(b.box[0], [80, 30, 120, 70])
    assert b.score.tolist() == [1.0, 0.9] and [b.categories[c] for c in b.category] == ["cat", "dog"]
    locs = {p["location"]: p["problem"] for p in b.problems}
    assert "unknown class id 7" in locs["img1.txt:3"] and "negative" in locs["img1.txt:4"]
    assert "expected" in locs["img1.txt:5"] and "no image size" in locs["img3.txt"]
    assert len(read_any(tmp_path)) == 2  # classes.txt and sizes.csv found by themselves


def test_voc_real_data_and_malformed_file(voc_dir, tmp_path):
    b = read_voc(voc_dir)
    counts = {im.key: int((b.image == i).sum()) for i, im in enumerate(b.images)}
    assert counts["OSBS_029"] == 61 and counts["SOAP_061"] == 37
    assert set(b.categories) >= {"Tree", "Alive", "Dead"} or set(b.categories) >= {"Tree"}
    assert b.images[[im.key for im in b.images].index("OSBS_029")].width == 400
    (tmp_path / "good.xml").write_text((voc_dir / "OSBS_029.xml").read_text())
    (tmp_path / "broken.xml").write_text("<annotation><object>")
    b2 = read_voc(tmp_path)
    assert len(b2) == 61 and b2.problems[0]["location"] == "broken.xml"


def test_cleanlab_inputs_as_they_are():
    labels = [{"bboxes": np.array([[0, 0, 10, 10], [5, 5, 20, 20]], dtype=np.float32), "labels": np.array([1, 0])},
              {"bboxes": np.zeros((0, 4), dtype=np.float32), "labels": np.zeros(0, dtype=int)}]
    predictions = [np.array([np.array([[5, 5, 19, 20, 0.8]]), np.zeros((0, 5)), np.array([[1, 1, 2, 2, 0.1]])],
                            dtype=object),
                   [np.zeros((0, 5)), np.array([[3, 3, 9, 9, 0.7]]), np.zeros((0, 5))]]
    lab, ref = from_cleanlab(labels, predictions, class_names=["cat", "dog", "bird"])
    assert len(lab.images) == 2 and lab.categories == ["cat", "dog", "bird"]
    assert [lab.categories[c] for c in lab.category] == ["dog", "cat"] and lab.box_id == ["0:0", "0:1"]
    np.testing.assert_allclose(lab.box[1], [5, 5, 20, 20])
    assert ref.box_id == ["0:0:0", "0:2:0", "1:1:0"] and ref.score.tolist() == pytest.approx([0.8, 0.1, 0.7])
    assert [ref.categories[c] for c in ref.category] == ["cat", "bird", "dog"] and ref.image.tolist() == [0, 0, 1]
    with pytest.raises(InputError, match="predictions: 1 images, but labels has 2"):
        from_cleanlab(labels, predictions[:1])
    with pytest.raises(InputError, match=r"labels\[0\]: expected a dict"):
        from_cleanlab([[1, 2]], None)


def test_unreadable_inputs_name_the_file_and_what_was_expected(coco_dir, tmp_path):
    results = coco_dir / "fakebbox100_results.json"
    with pytest.raises(InputError, match="labels: .*missing.json not found"):
        read_any(tmp_path / "missing.json")
    with pytest.raises(InputError, match="list of detections .*swapped"):
        read_any(results)  # predictions given as the labels
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json is not valid JSON"):
        read_any(tmp_path / "bad.json")
    labels = read_coco(coco_dir / "instances_val2014_100.json")
    (tmp_path / "num.json").write_text("42")
    with pytest.raises(InputError, match="reference: .*num.json is neither"):
        read_any(tmp_path / "num.json", like=labels)
    (tmp_path / "yolo").mkdir()
    with pytest.raises(InputError, match="classes.txt not found"):
        read_any(tmp_path / "yolo")


def test_coco_numbers_given_as_strings_are_bad_rows(tmp_path):
    data = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
            "categories": [{"id": 3, "name": "cat"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, "3", 4]},
                            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [1, 2, True, 4]}]}
    labels = read_coco(write_json(tmp_path / "l.json", data))
    assert len(labels) == 0
    assert [p["problem"] for p in labels.problems] == ["bbox [1, 2, '3', 4] is not four numbers",
                                                       "bbox [1, 2, True, 4] is not four numbers"]


def test_prediction_confidences_outside_0_1_or_not_numbers_are_bad_rows(tmp_path):
    data = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
            "categories": [{"id": 3, "name": "cat"}], "annotations": []}
    labels = read_coco(write_json(tmp_path / "l.json", data))
    row = {"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}
    results = [{**row, "score": 0.5}, {**row, "score": 1.5}, {**row, "score": -1}, {**row, "score": "hi"},
               {**row, "score": None}, dict(row), {**row, "score": 1}, {**row, "score": 0}]
    ref = read_coco_reference(write_json(tmp_path / "r.json", results), labels)
    assert ref.box_id == ["r0", "r6", "r7"] and ref.score.tolist() == [0.5, 1.0, 0.0]
    got = {p["location"]: p["problem"] for p in ref.problems}
    assert got == {"results[1]": "confidence 1.5 is not a number in [0, 1]",
                   "results[2]": "confidence -1.0 is not a number in [0, 1]",
                   "results[3]": "score 'hi' is not a number", "results[4]": "score 'None' is not a number",
                   "results[5]": "no score (other rows have one)"}
    # no row with a score: a second annotator's boxes, each with confidence 1
    ref = read_coco_reference(write_json(tmp_path / "r2.json", [dict(row)]), labels)
    assert ref.score.tolist() == [1.0] and not ref.problems
    # YOLO and VOC confidences too
    yolo = tmp_path / "yolo"
    yolo.mkdir()
    (yolo / "a.txt").write_text("0 0.5 0.5 0.2 0.2 1.5\n0 0.5 0.5 0.2 0.2 0.7\n")
    ref = read_yolo(yolo, ["cat"], {"a": (100.0, 100.0)})
    assert ref.score.tolist() == [0.7] and ref.problems[0]["problem"] == "confidence 1.5 is not a number in [0, 1]"


def test_cleanlab_arrays_of_the_wrong_shape_are_refused():
    preds = [[np.array([[0, 0, 10, 10, 0.9]])]]
    with pytest.raises(InputError, match=r"labels\[0\]\['bboxes'\]: shape \[1, 3\], expected \[L, 4\]"):
        from_cleanlab([{"bboxes": np.zeros((1, 3)), "labels": np.array([0])}], preds)
    with pytest.raises(InputError, match=r"predictions\[0\]\[0\]: shape \[1, 4\], expected \[M, 5\]"):
        from_cleanlab([{"bboxes": np.array([[0, 0, 10, 10]]), "labels": np.array([0])}], [[np.array([[0, 0, 10, 10]])]])
