"""GET /playground in a real headless browser (Debian's chromium driven by Playwright), against a real server.

The page's values are checked against the REST API called directly: the shown CIoU after a drag, the arrows'
directions against the gradient's signs, the descent's IoU, and the server's own error message for a bad
parameter."""

import os

import httpx
import pytest

from tests.conftest import start_server

CHROMIUM = os.environ.get("LOSSD_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

NEEDS_PLAYWRIGHT = pytest.mark.skipif(sync_playwright is None, reason="the playwright Python package is not "
                                      "installed (pip install playwright; no browser download needed, Debian's "
                                      "chromium is used)")
NEEDS_CHROMIUM = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no chromium at {CHROMIUM} (apt-get "
                                    "install chromium, or set LOSSD_TEST_CHROMIUM)")


def in_browser(test):
    return NEEDS_PLAYWRIGHT(NEEDS_CHROMIUM(test))
# predicates as functions: a bare expression string would be eval()ed in the page, which its CSP forbids
READY_EXPR = ("window.lossdPlayground && window.lossdPlayground.ready && !window.lossdPlayground.busy && "
              "!window.lossdPlayground.queued")
READY = f"() => {READY_EXPR}"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, live_server):
    pg = browser.new_page(viewport={"width": 1300, "height": 950})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(f"{live_server.http_url}/playground")
    pg.wait_for_function(READY, timeout=30_000)
    yield pg
    pg.close()
    assert not errors, errors


def state(pg) -> dict:
    return pg.evaluate("(({pred, target, values, loss, gradXyxy, arrows, error, updates}) => "
                       "({pred, target, values, loss, gradXyxy, arrows, error, updates}))(window.lossdPlayground)")


def settle(pg, after: int) -> dict:
    """Wait until the page has finished an update started after update number `after`."""
    pg.wait_for_function(f"() => {READY_EXPR} && window.lossdPlayground.updates > {after}", timeout=20_000)
    return state(pg)


def canvas_point(pg, x: float, y: float) -> tuple[float, float]:
    box = pg.locator("#stage").bounding_box()
    return box["x"] + x * box["width"] / 640, box["y"] + y * box["height"] / 480


def drag(pg, start: tuple[float, float], end: tuple[float, float]) -> None:
    pg.mouse.move(*canvas_point(pg, *start))
    pg.mouse.down()
    for f in (0.33, 0.66, 1.0):
        pg.mouse.move(*canvas_point(pg, start[0] + f * (end[0] - start[0]), start[1] + f * (end[1] - start[1])))
    pg.mouse.up()


def api_metric(url: str, name: str, pred, target) -> float:
    resp = httpx.post(f"{url}/v1/metrics/{name}", json={"boxes1": [pred], "boxes2": [target]})
    assert resp.status_code == 200, resp.text
    return resp.json()["values"][0]


def test_page_is_served_from_the_package(live_server):
    resp = httpx.get(f"{live_server.http_url}/playground")
    assert resp.status_code == 200 and "text/html" in resp.headers["content-type"]
    assert "default-src 'self'" in resp.headers["content-security-policy"]
    for ref in ("playground/app.js", "playground/playground.css"):
        assert ref in resp.text
        assert httpx.get(f"{live_server.http_url}/{ref}").status_code == 200
    # nothing from elsewhere: the page works offline
    assert "http://" not in resp.text and "https://" not in resp.text
    assert httpx.get(f"{live_server.http_url}/playground/..%2Fsettings.py").status_code == 404


@in_browser
def test_drag_moves_the_box_and_shows_the_apis_ciou(page, live_server):
    before = state(page)
    x1, y1, x2, y2 = before["pred"]
    drag(page, ((x1 + x2) / 2, (y1 + y2) / 2), ((x1 + x2) / 2 + 90, (y1 + y2) / 2 + 50))
    after = settle(page, before["updates"])
    assert after["pred"] == pytest.approx([x1 + 90, y1 + 50, x2 + 90, y2 + 50], abs=1.5)
    expected = api_metric(live_server.http_url, "ciou", after["pred"], after["target"])
    assert after["values"]["ciou"] == pytest.approx(expected, abs=1e-6)
    assert after["values"]["ciou"] != pytest.approx(before["values"]["ciou"], abs=1e-3)
    shown = float(page.locator("#metric-ciou").inner_text())
    assert shown == pytest.approx(expected, abs=1e-4)
    # resize by the right edge
    x1, y1, x2, y2 = after["pred"]
    drag(page, (x2, (y1 + y2) / 2), (x2 + 40, (y1 + y2) / 2))
    resized = settle(page, after["updates"])
    assert resized["pred"][2] == pytest.approx(x2 + 40, abs=1.5) and resized["pred"][0] == pytest.approx(x1)
    assert resized["values"]["iou"] == pytest.approx(
        api_metric(live_server.http_url, "iou", resized["pred"], resized["target"]), abs=1e-6)


@in_browser
@pytest.mark.parametrize("box_format", ["xyxy", "cxcywh"])
def test_arrows_point_down_the_gradient(page, live_server, box_format):
    s = state(page)
    page.select_option("#box-format", box_format)
    s = settle(page, s["updates"])
    resp = httpx.post(f"{live_server.http_url}/v1/losses/ciou", json={"pred": [s["pred"]], "target": [s["target"]],
                                                                      "box_format": "xyxy"})
    grad = resp.json()["grad"][0]  # d loss / d (x1, y1, x2, y2), asked in xyxy whatever the page sends
    assert s["gradXyxy"] == pytest.approx(grad, rel=1e-3, abs=1e-7)
    arrows = {a["edge"]: a for a in s["arrows"]}
    biggest = max(abs(g) for g in grad)
    for edge, k, axis in (("left", 0, "x"), ("top", 1, "y"), ("right", 2, "x"), ("bottom", 3, "y")):
        a = arrows[edge]
        along = a[f"{axis}1"] - a[f"{axis}0"]
        across = a["y1" if axis == "x" else "x1"] - a["y0" if axis == "x" else "x0"]
        assert across == 0
        assert along == pytest.approx(-grad[k] / biggest * 60, abs=0.5)  # descent, longest arrow 60 px
        if abs(grad[k]) > 0.05 * biggest:
            assert (along > 0) == (grad[k] < 0), (edge, grad)


@in_browser
def test_descend_raises_the_iou(page, live_server):
    before = state(page)["updates"]
    page.select_option("#loss", "diou")
    s = settle(page, before)
    iou0 = s["values"]["iou"]
    page.fill("#steps", "40")
    page.click("#descend")
    page.wait_for_function("() => window.lossdPlayground.descending === false && "
                           "document.getElementById('descent-status').textContent.startsWith('step 40/40')",
                           timeout=45_000)
    end = settle(page, -1)
    assert not end["error"]
    iou1 = api_metric(live_server.http_url, "iou", end["pred"], end["target"])
    assert end["values"]["iou"] == pytest.approx(iou1, abs=1e-4)  # the page sends boxes rounded to 0.001 px
    assert iou1 > iou0 + 0.3, (iou0, iou1)


@in_browser
def test_a_bad_parameter_shows_the_servers_message(page, live_server):
    s = state(page)
    page.fill("#params input[name=eps]", "-1")
    s = settle(page, s["updates"])
    resp = httpx.post(f"{live_server.http_url}/v1/losses/ciou", json={"pred": [s["pred"]], "target": [s["target"]],
                                                                      "params": {"eps": -1}})
    message = resp.json()["error"]["message"]
    assert resp.status_code == 422 and "eps" in message
    assert message in page.locator("#error").inner_text()
    assert s["loss"] is None and page.locator("#loss-value").inner_text() == "–"
    # the IoU-family values still come (they do not take the loss's parameters)
    assert s["values"]["iou"] is not None
    page.fill("#params input[name=eps]", "1e-7")
    s = settle(page, s["updates"])
    assert s["error"] == "" and s["loss"] is not None


@in_browser
def test_cross_origin_api(browser, live_server):
    """The page from one server calling another lossd that allows its origin (LOSSD_CORS_ORIGINS)."""
    other = start_server({"LOSSD_CORS_ORIGINS": f'["{live_server.http_url}"]'})
    try:
        pg = browser.new_page()
        pg.goto(f"{live_server.http_url}/playground?api={other.http_url}")
        pg.wait_for_function(READY, timeout=30_000)
        s = state(pg)
        assert not s["error"] and s["loss"] is not None
        assert s["values"]["ciou"] == pytest.approx(api_metric(other.http_url, "ciou", s["pred"], s["target"]),
                                                    abs=1e-6)
        pg.close()
    finally:
        other.proc.terminate()
        other.proc.wait(timeout=30)


# ----------------------------------------------------------------------------------------------- side by side
COMPARE_JS = """() => { const c = window.lossdPlayground.compare;
  return {running: c.running, steps: c.steps, lr: c.lr, target: c.target, start: c.start, requests: c.requests,
          error: c.error,
          sides: c.sides.map((s) => ({loss: s.loss, path: s.path, done: s.done, reached: s.reached}))}; }"""
COMPARE_DONE = ("() => { const c = window.lossdPlayground.compare; "
                "return c.error !== '' || (!c.running && c.sides.every((s) => s.done)); }")


def descend_both(pg, steps: int, start: str | None = None, left: str | None = None, right: str | None = None) -> dict:
    if start:
        pg.select_option("#cmp-start", start)
    if left:
        pg.select_option("#cmp-loss-0", left)
    if right:
        pg.select_option("#cmp-loss-1", right)
    pg.fill("#cmp-steps", str(steps))
    pg.fill("#cmp-delay", "0")
    pg.click("#cmp-descend")
    pg.wait_for_function(COMPARE_DONE, timeout=90_000)
    c = pg.evaluate(COMPARE_JS)
    assert c["error"] == "", c["error"]
    return c


def paper_lr(t: int, steps: int, lr: float = 0.1) -> float:
    """simulate's schedule, written out again here: lr to 80% of the steps, lr/10 to 90%, then lr/100."""
    return lr if t <= round(0.8 * steps) else lr / 10 if t <= round(0.9 * steps) else lr / 100


def api_step(url: str, loss: str, box: list, target: list, t: int, steps: int) -> tuple[list, list, float]:
    """One step of the paper's rule from the REST API's own gradient and IoU: (next box, gradient, IoU)."""
    r = httpx.post(f"{url}/v1/losses/{loss}", json={"pred": [box], "target": [target], "box_format": "cxcywh",
                                                    "dtype": "float64", "return_grad": True})
    assert r.status_code == 200, r.text
    grad = r.json()["grad"][0]
    r = httpx.post(f"{url}/v1/metrics/iou", json={"boxes1": [box], "boxes2": [target], "box_format": "cxcywh",
                                                  "dtype": "float64"})
    iou = r.json()["values"][0]
    f = paper_lr(t, steps) * (2 - iou)
    nxt = [v - f * g for v, g in zip(box, grad)]
    nxt[2], nxt[3] = max(nxt[2], 1e-6), max(nxt[3], 1e-6)
    return nxt, grad, iou


def area(box) -> float:
    return box[2] * box[3]


def centre_distance(box, target) -> float:
    return ((box[0] - target[0]) ** 2 + (box[1] - target[1]) ** 2) ** 0.5


@in_browser
def test_side_by_side_giou_grows_then_shrinks_while_diou_closes_in(page, live_server):
    """The default start (a wide, flat box across the target's top edge): GIoU first grows the box and then
    shrinks it; DIoU's centre comes in faster and it reaches IoU 0.99 in fewer steps."""
    assert page.locator("#cmp-loss-0").input_value() == "giou"
    assert page.locator("#cmp-loss-1").input_value() == "diou"
    assert page.locator("#cmp-start").input_value() == "flat"
    c = descend_both(page, 200)
    target = c["target"]
    assert target == [0, 0, 1, 1] and c["steps"] == 200 and c["lr"] == 0.1
    giou, diou = c["sides"]
    assert (giou["loss"], diou["loss"]) == ("giou", "diou")
    for side in (giou, diou):
        path = side["path"]
        assert path[0]["box"] == c["start"]
        assert side["done"] and side["reached"] == len(path) - 1  # each stops at its first IoU > 0.99
        assert path[-1]["iou"] > 0.99 and all(r["iou"] <= 0.99 for r in path[:-1])
        assert path[0]["iou"] < 0.1
        # the IoU the page shows for its last box is the API's
        resp = httpx.post(f"{live_server.http_url}/v1/metrics/iou", json={
            "boxes1": [path[-1]["box"]], "boxes2": [target], "box_format": "cxcywh", "dtype": "float64"})
        assert path[-1]["iou"] == pytest.approx(resp.json()["values"][0], abs=1e-12)
    assert diou["reached"] < giou["reached"] - 30, (diou["reached"], giou["reached"])

    # GIoU: the prediction grows (at least 3x its start) and then shrinks back to about the target's size
    a = [area(r["box"]) for r in giou["path"]]
    peak = max(range(len(a)), key=a.__getitem__)
    assert 0 < peak < len(a) - 1 and a[peak] > 3 * a[0], (a[0], peak, a[peak])
    assert a[-1] < 0.5 * a[peak] and a[-1] == pytest.approx(1, abs=0.1)
    # DIoU grows it too, but less at first, while its centre comes in faster
    assert area(diou["path"][5]["box"]) < 0.75 * a[5]
    for k in (5, 10, 20, 40, 60):
        dg, dd = (centre_distance(s["path"][k]["box"], target) for s in (giou, diou))
        assert dd < dg, (k, dd, dg)

    # the page's steps against the API's gradients, redone here: at lr 0.1, after the drop to 0.01 (t > 160) and
    # to 0.001 (t > 180)
    for side in (giou, diou):
        assert [r["lr"] for r in side["path"][:-1]] == [paper_lr(t, 200) for t in range(1, len(side["path"]))]
    for side, k in ((giou, 0), (giou, 7), (diou, 30), (giou, 165), (giou, 182)):
        box = side["path"][k]["box"]
        nxt, grad, iou = api_step(live_server.http_url, side["loss"], box, target, k + 1, 200)
        assert side["path"][k]["grad"] == pytest.approx(grad, rel=1e-12, abs=1e-15)
        assert side["path"][k]["iou"] == pytest.approx(iou, rel=1e-12, abs=1e-15)
        assert side["path"][k]["lr"] == paper_lr(k + 1, 200)
        assert side["path"][k + 1]["box"] == pytest.approx(nxt, rel=1e-12, abs=1e-15), (side["loss"], k)
        assert nxt != pytest.approx(box, abs=1e-6)  # a step that moved

    # one IoU request per round for both sides, one loss request per side while both run
    both, one = min(len(giou["path"]), len(diou["path"])), abs(len(giou["path"]) - len(diou["path"]))
    assert c["requests"] == 3 * both + 2 * one
    shot = os.environ.get("LOSSD_PLAYGROUND_SCREENSHOT")
    if shot:  # LOSSD_PLAYGROUND_SCREENSHOT=docs/img/playground.png refreshes the docs' picture
        page.set_viewport_size({"width": 1180, "height": 950})
        page.screenshot(path=shot, full_page=True)


@in_browser
def test_side_by_side_iou_loss_cannot_move_apart_boxes(page, live_server):
    """From boxes that do not overlap, IoU loss has no gradient: the left box stays where it is for all the steps,
    while DIoU on the right brings its box onto the target."""
    c = descend_both(page, 200, start="apart", left="iou", right="diou")
    iou, diou = c["sides"]
    assert len(iou["path"]) == 201 and iou["reached"] is None and iou["done"]
    assert all(r["box"] == c["start"] and r["iou"] == 0 for r in iou["path"])
    assert all(g == 0 for g in iou["path"][0]["grad"])
    assert diou["reached"] is not None and diou["path"][-1]["iou"] > 0.99
    text = page.locator("#cmp-status-0").inner_text()
    assert "stopped after 200 steps" in text and "IoU 0.0000" in text
    assert f"IoU > 0.99 after {diou['reached']} steps" in page.locator("#cmp-status-1").inner_text()


@in_browser
def test_side_by_side_same_loss_is_one_request(page, live_server):
    """The same loss on both sides: both rows go in one loss request, and the two paths are the same. The
    'canvas' start takes the boxes above, in units of the target's size."""
    s = state(page)
    page.select_option("#cmp-start", "canvas")
    c = page.evaluate(COMPARE_JS)
    (px, py, pw, ph), (tx, ty, tw, th) = ([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]]
                                          for b in (s["pred"], s["target"]))
    size = (tw * th) ** 0.5
    assert c["start"] == pytest.approx([(px - tx) / size, (py - ty) / size, pw / size, ph / size])
    assert c["target"] == pytest.approx([0, 0, tw / size, th / size])
    c = descend_both(page, 30, left="ciou", right="ciou")
    left, right = c["sides"]
    assert left["path"] == right["path"] and len(left["path"]) == 31
    assert c["requests"] == 2 * 31
    assert left["path"][-1]["iou"] > left["path"][0]["iou"] + 0.1


@in_browser
def test_side_by_side_changing_a_loss_mid_descent_starts_over(page, live_server):
    """Picking another loss while the sides descend stops the descent and resets both; the interrupted one does
    not carry on beside the next (one round of requests per step, every box finite)."""
    page.fill("#cmp-delay", "1000")  # the interrupted descent sleeps through the start of the next one
    page.click("#cmp-descend")
    page.wait_for_function("() => window.lossdPlayground.compare.sides[0].path.length > 1", timeout=30_000)
    page.select_option("#cmp-loss-0", "ciou")
    c = page.evaluate(COMPARE_JS)
    assert not c["running"] and [len(s["path"]) for s in c["sides"]] == [1, 1]
    assert page.locator("#cmp-descend").is_enabled() and not page.locator("#cmp-stop").is_enabled()
    c = descend_both(page, 60)
    left, right = c["sides"]
    assert (left["loss"], right["loss"]) == ("ciou", "diou")
    assert len(left["path"]) == len(right["path"]) == 61 and c["requests"] == 3 * 61
    assert all(v == v and abs(v) < 100 for s in (left, right) for r in s["path"] for v in r["box"])
