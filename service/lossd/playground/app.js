// lossd playground: two boxes on a canvas, every value from the lossd REST API (/v1) as they move.
// Plain browser JavaScript, no dependencies: the calls below are the ones an annotation tool would make.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $("stage");
  const ctx = canvas.getContext("2d");
  const INITIAL = { pred: [110, 120, 250, 230], target: [300, 190, 450, 330] }; // xyxy, canvas pixels
  const EDGE = 7; // px: how close to an edge a press grabs it
  const MIN = 4; // px: smallest width/height a drag leaves
  const state = {
    pred: INITIAL.pred.slice(), target: INITIAL.target.slice(),
    losses: {}, metrics: [], values: {}, loss: null, grad: null, gradXyxy: null, arrows: [], arrowScale: null,
    error: "", updates: 0, busy: false, queued: false, descending: false, trail: [], lastRequest: null,
  };
  window.lossdPlayground = state; // for the curious (and the browser test)

  // ------------------------------------------------------------------------------------------- boxes
  const fmt = {
    xyxy: (b) => b.slice(),
    xywh: (b) => [b[0], b[1], b[2] - b[0], b[3] - b[1]],
    cxcywh: (b) => [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]],
  };
  const fromCxcywh = (c) => [c[0] - c[2] / 2, c[1] - c[3] / 2, c[0] + c[2] / 2, c[1] + c[3] / 2];
  // d loss / d (x1, y1, x2, y2) from the gradient in another format (chain rule of that format's definition)
  const gradToXyxy = {
    xyxy: (g) => g.slice(),
    xywh: (g) => [g[0] - g[2], g[1] - g[3], g[2], g[3]],
    cxcywh: (g) => [g[0] / 2 - g[2], g[1] / 2 - g[3], g[0] / 2 + g[2], g[1] / 2 + g[3]],
  };
  const round = (v) => Math.round(v * 1000) / 1000;
  const num = (v) => (typeof v === "number" ? (Math.abs(v) >= 1e-3 || v === 0 ? v.toFixed(4) : v.toExponential(3)) : String(v));

  // ------------------------------------------------------------------------------------------- the API
  function apiBase() {
    return $("api").value.trim().replace(/\/+$/, "");
  }
  async function api(path, body) {
    const headers = { "content-type": "application/json" };
    const key = $("api-key").value;
    if (key) headers["x-api-key"] = key;
    const resp = await fetch(apiBase() + path, body === undefined ? { headers } :
      { method: "POST", headers, body: JSON.stringify(body) });
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok) {
      const err = data && data.error;
      const message = err && typeof err === "object" ? err.message : (err || `HTTP ${resp.status}`);
      throw new Error(message);
    }
    return data;
  }

  function lossName() { return $("loss").value; }

  // the parameter form: one input per catalog parameter; what the user types is sent as typed (numbers parsed),
  // so the server's own message explains a bad value
  function buildForm() {
    const form = $("params");
    form.replaceChildren();
    const info = state.losses[lossName()];
    if (!info) return;
    $("loss-summary").textContent = `${info.summary} (${info.reference})`;
    for (const [name, p] of Object.entries(info.params)) {
      const row = document.createElement("div");
      row.className = "param";
      const label = document.createElement("label");
      label.textContent = name + " ";
      let input;
      if (p.type === "choice") {
        input = document.createElement("select");
        for (const c of p.choices || []) input.add(new Option(c, c, false, c === p.default));
      } else if (p.type === "bool") {
        input = document.createElement("input");
        input.type = "checkbox";
        input.checked = !!p.default;
      } else {
        input = document.createElement("input");
        input.type = "text";
        input.value = p.default === null ? "" : String(p.default);
      }
      input.name = name;
      input.dataset.type = p.type;
      input.dataset.default = JSON.stringify(p.default);
      input.addEventListener("input", () => update());
      input.addEventListener("change", () => update());
      label.appendChild(input);
      const range = p.min !== null || p.max !== null ? ` [${p.min ?? "-inf"}, ${p.max ?? "inf"}]` : "";
      const doc = document.createElement("span");
      doc.className = "doc";
      doc.textContent = `${p.type}${range}, default ${JSON.stringify(p.default)}: ${p.doc}`;
      row.append(label, doc);
      form.appendChild(row);
    }
  }

  function params() {
    const out = {};
    for (const el of $("params").elements) {
      let v;
      if (el.dataset.type === "bool") v = el.checked;
      else if (el.dataset.type === "choice") v = el.value;
      else if (el.dataset.type === "floats") {
        v = el.value.trim() === "" ? null : el.value.split(",").map((s) => (s.trim() !== "" && !isNaN(Number(s)) ? Number(s) : s.trim()));
      } else {
        const s = el.value.trim();
        v = s !== "" && !isNaN(Number(s)) ? Number(s) : s;
      }
      if (JSON.stringify(v) !== el.dataset.default) out[el.name] = v;
    }
    return out;
  }

  // ------------------------------------------------------------------------------------------- live values
  let chain = Promise.resolve();
  function update() { // coalesces: calls made while one is waiting share it
    if (state.queued) return chain;
    state.queued = true;
    chain = chain.then(async () => { state.queued = false; await refresh(); });
    return chain;
  }

  async function refresh() {
    state.busy = true;
    const pred = state.pred.slice(), target = state.target.slice();
    const boxFormat = $("box-format").value;
    const body = { pred: [fmt[boxFormat](pred).map(round)], target: [fmt[boxFormat](target).map(round)],
                   box_format: boxFormat, params: params(), return_grad: true };
    state.lastRequest = { url: `${apiBase()}/v1/losses/${lossName()}`, body };
    $("request").textContent = `POST ${state.lastRequest.url}\n${JSON.stringify(body)}`;
    const metricCalls = state.metrics.map((m) => api(`/v1/metrics/${m}`,
      { boxes1: [pred.map(round)], boxes2: [target.map(round)], box_format: "xyxy" }));
    const [lossResult, ...metricResults] = await Promise.allSettled([api(`/v1/losses/${lossName()}`, body), ...metricCalls]);
    const errors = [];
    state.metrics.forEach((m, i) => {
      const r = metricResults[i];
      if (r.status === "fulfilled") state.values[m] = r.value.values[0];
      else { state.values[m] = null; errors.push(`${m}: ${r.reason.message}`); }
    });
    if (lossResult.status === "fulfilled") {
      state.loss = lossResult.value.loss[0];
      state.grad = lossResult.value.grad[0];
      state.gradXyxy = gradToXyxy[boxFormat](state.grad);
    } else {
      state.loss = null; state.grad = null; state.gradXyxy = null;
      errors.unshift(lossResult.reason.message);
    }
    state.error = errors.join("\n");
    $("error").textContent = state.error;
    show(boxFormat);
    state.updates += 1;
    state.busy = false;
    draw();
  }

  function show(boxFormat) {
    $("loss-value").textContent = state.loss === null ? "–" : num(state.loss);
    $("grad-value").textContent = state.grad === null ? "–" :
      `[${state.grad.map(num).join(", ")}] (d loss / d ${boxFormat})`;
    const rows = state.metrics.map((m) => `<tr><th>${m}</th><td id="metric-${m}">${state.values[m] === null ? "–" : num(state.values[m])}</td></tr>`);
    $("metrics").innerHTML = rows.join("");
    $("formats").innerHTML = ["xyxy", "xywh", "cxcywh"].map((f) =>
      `<tr><th>${f}</th><td>pred ${JSON.stringify(fmt[f](state.pred).map(round))}<br>target ${JSON.stringify(fmt[f](state.target).map(round))}</td></tr>`).join("");
  }

  // ------------------------------------------------------------------------------------------- drawing
  function draw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if ($("trail").checked) {
      ctx.strokeStyle = "rgba(30, 90, 200, 0.25)";
      ctx.lineWidth = 1;
      for (const b of state.trail) ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
    }
    box(state.target, "rgba(20, 150, 60, 0.18)", "#149640", "target");
    box(state.pred, "rgba(30, 90, 200, 0.18)", "#1e5ac8", "pred");
    arrows();
  }

  function box(b, fill, stroke, label) {
    ctx.fillStyle = fill;
    ctx.fillRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
    ctx.strokeStyle = stroke;
    ctx.lineWidth = 2;
    ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
    ctx.fillStyle = stroke;
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillText(label, b[0] + 3, b[1] - 4);
  }

  // the descent direction (-gradient) of each of the prediction's sides, at the side's middle; the longest
  // arrow is 60 px, the others in proportion
  function arrows() {
    state.arrows = [];
    const g = state.gradXyxy;
    if (!g) return;
    const d = g.map((v) => -v);
    const biggest = Math.max(...d.map(Math.abs));
    if (!(biggest > 1e-12)) return;
    const k = 60 / biggest;
    state.arrowScale = k;
    const [x1, y1, x2, y2] = state.pred, mx = (x1 + x2) / 2, my = (y1 + y2) / 2;
    const spec = [["left", x1, my, d[0] * k, 0], ["top", mx, y1, 0, d[1] * k],
                  ["right", x2, my, d[2] * k, 0], ["bottom", mx, y2, 0, d[3] * k]];
    ctx.strokeStyle = ctx.fillStyle = "#d0021b";
    ctx.lineWidth = 2;
    for (const [edge, x, y, dx, dy] of spec) {
      state.arrows.push({ edge, x0: x, y0: y, x1: x + dx, y1: y + dy });
      const len = Math.hypot(dx, dy);
      if (len < 1) continue;
      ctx.beginPath(); ctx.moveTo(x, y); ctx.lineTo(x + dx, y + dy); ctx.stroke();
      const ux = dx / len, uy = dy / len, h = Math.min(8, len / 2);
      ctx.beginPath();
      ctx.moveTo(x + dx, y + dy);
      ctx.lineTo(x + dx - h * ux - h * 0.5 * uy, y + dy - h * uy + h * 0.5 * ux);
      ctx.lineTo(x + dx - h * ux + h * 0.5 * uy, y + dy - h * uy - h * 0.5 * ux);
      ctx.closePath(); ctx.fill();
    }
  }

  // ------------------------------------------------------------------------------------------- the mouse
  let drag = null;
  function pos(ev) {
    const r = canvas.getBoundingClientRect();
    return [(ev.clientX - r.left) * canvas.width / r.width, (ev.clientY - r.top) * canvas.height / r.height];
  }
  function grab(x, y) {
    for (const which of ["pred", "target"]) {
      const [x1, y1, x2, y2] = state[which];
      const inY = y > y1 - EDGE && y < y2 + EDGE, inX = x > x1 - EDGE && x < x2 + EDGE;
      const edges = { left: inY && Math.abs(x - x1) < EDGE, right: inY && Math.abs(x - x2) < EDGE,
                      top: inX && Math.abs(y - y1) < EDGE, bottom: inX && Math.abs(y - y2) < EDGE };
      if (Object.values(edges).some(Boolean)) return { which, edges };
      if (x > x1 && x < x2 && y > y1 && y < y2) return { which, edges: null };
    }
    return null;
  }
  function cursorFor(g) {
    if (!g) return "default";
    if (!g.edges) return "move";
    const { left, right, top, bottom } = g.edges;
    if ((left && top) || (right && bottom)) return "nwse-resize";
    if ((right && top) || (left && bottom)) return "nesw-resize";
    return left || right ? "ew-resize" : "ns-resize";
  }
  canvas.addEventListener("pointerdown", (ev) => {
    const [x, y] = pos(ev);
    const g = grab(x, y);
    if (!g) return;
    stopDescent();
    drag = { ...g, x, y, start: state[g.which].slice() };
    canvas.setPointerCapture(ev.pointerId);
  });
  canvas.addEventListener("pointermove", (ev) => {
    const [x, y] = pos(ev);
    if (!drag) { canvas.style.cursor = cursorFor(grab(x, y)); return; }
    const dx = x - drag.x, dy = y - drag.y, s = drag.start, b = s.slice();
    if (!drag.edges) { b[0] += dx; b[2] += dx; b[1] += dy; b[3] += dy; }
    else {
      if (drag.edges.left) b[0] = Math.min(s[0] + dx, s[2] - MIN);
      if (drag.edges.right) b[2] = Math.max(s[2] + dx, s[0] + MIN);
      if (drag.edges.top) b[1] = Math.min(s[1] + dy, s[3] - MIN);
      if (drag.edges.bottom) b[3] = Math.max(s[3] + dy, s[1] + MIN);
    }
    state[drag.which] = b;
    state.trail = [];
    draw();
    update();
  });
  const endDrag = () => { drag = null; };
  canvas.addEventListener("pointerup", endDrag);
  canvas.addEventListener("pointercancel", endDrag);

  // ------------------------------------------------------------------------------------------- descent
  // The DIoU paper's step on (x, y, w, h): box -= lr * (2 - IoU) * gradient, with the boxes measured in units
  // of the target's size (target area 1, as in the paper), so lr means the same for every box size.
  function stopDescent() { state.descending = false; }
  async function descend() {
    if (state.descending) return;
    state.descending = true;
    $("descend").disabled = true; $("stop").disabled = false;
    state.trail = [state.pred.slice()];
    const lr = Number($("lr").value), steps = Math.max(1, Math.floor(Number($("steps").value) || 1));
    const name = lossName(), p = params();
    try {
      for (let i = 1; i <= steps && state.descending; i++) {
        const t = state.target, size = Math.sqrt((t[2] - t[0]) * (t[3] - t[1]));
        const pred = fmt.cxcywh(state.pred).map((v) => v / size), target = fmt.cxcywh(t).map((v) => v / size);
        const [res, iou] = await Promise.all([
          api(`/v1/losses/${name}`, { pred: [pred], target: [target], box_format: "cxcywh", params: p, return_grad: true }),
          api("/v1/metrics/iou", { boxes1: [pred], boxes2: [target], box_format: "cxcywh" })]);
        const f = lr * (2 - iou.values[0]), g = res.grad[0];
        const next = pred.map((v, k) => v - f * g[k]);
        next[2] = Math.max(next[2], 1e-3); next[3] = Math.max(next[3], 1e-3);
        state.pred = fromCxcywh(next.map((v) => v * size));
        if (i % 3 === 0) state.trail.push(state.pred.slice());
        $("descent-status").textContent = `step ${i}/${steps}: IoU ${num(iou.values[0])}, loss ${num(res.loss[0])}`;
        await update();
      }
    } catch (e) {
      $("error").textContent = e.message;
      state.error = e.message;
    } finally {
      state.descending = false;
      $("descend").disabled = false; $("stop").disabled = true;
      draw();
    }
  }

  // ------------------------------------------------------------------------------------------- side by side
  // Two predictions descend from the same start, each on its own loss, with the step of `lossd simulate`:
  // box -= lr(t) * (2 - IoU) * d loss / d (x, y, w, h), lr(t) = lr for t <= 80% of the steps, lr / 10 to 90%,
  // then lr / 100. Boxes are in cxcywh, in units of the target's size (the target has area 1 and its centre at
  // the origin, y down as in an image), sent as float64 so the page's steps can be redone exactly from the API.
  const CMP_COLORS = ["#e07000", "#7b2cbf"];
  const CMP_MIN_SIZE = 1e-6; // simulate's floor for a width or height a step would take to zero or below
  const CMP_STARTS = {
    flat: { label: "a wide, flat box across the target's top edge", pred: [-1, -0.5, 3, 0.25], target: [0, 0, 1, 1] },
    apart: { label: "apart: a small box up and to the left", pred: [-2, -2, 0.5, 0.25], target: [0, 0, 1, 1] },
    inside: { label: "the target inside a wider box", pred: [-0.5, 0, 3, 1.2], target: [0, 0, 1, 1] },
    canvas: { label: "the two boxes on the canvas above" },
  };
  const cmp = {
    running: false, run: 0, start: null, target: null, steps: 0, lr: 0, requests: 0, stepsDone: 0, error: "", view: null,
    sides: [0, 1].map((i) => ({ loss: null, color: CMP_COLORS[i], path: [], done: false, reached: null })),
  };
  state.compare = cmp;

  function cmpLearningRate(lr, t, steps) { // t from 1, as simulate.learning_rate
    if (t <= Math.round(0.8 * steps)) return lr;
    if (t <= Math.round(0.9 * steps)) return lr / 10;
    return lr / 100;
  }

  function cmpStartBoxes() {
    const key = $("cmp-start").value;
    if (key !== "canvas") return { pred: CMP_STARTS[key].pred.slice(), target: CMP_STARTS[key].target.slice() };
    const t = fmt.cxcywh(state.target), p = fmt.cxcywh(state.pred), size = Math.sqrt(t[2] * t[3]);
    return { pred: [(p[0] - t[0]) / size, (p[1] - t[1]) / size, p[2] / size, p[3] / size],
             target: [0, 0, t[2] / size, t[3] / size] };
  }

  function cmpReset() {
    cmp.running = false;
    cmp.run += 1; // a descent still waiting on the server sees this and drops its answer
    $("cmp-descend").disabled = false; $("cmp-stop").disabled = true;
    const { pred, target } = cmpStartBoxes();
    cmp.start = pred; cmp.target = target; cmp.stepsDone = 0; cmp.requests = 0; cmp.view = null;
    cmp.error = ""; $("cmp-error").textContent = "";
    cmp.sides.forEach((s, i) => {
      s.loss = $(`cmp-loss-${i}`).value;
      s.path = [{ box: pred.slice(), iou: null, loss: null, grad: null, lr: null }];
      s.done = false; s.reached = null;
    });
    cmpDraw();
  }

  // one IoU request for both sides, one loss request per distinct loss (both rows in it when the losses agree)
  async function cmpEvaluate(active) {
    const last = active.map((s) => s.path[s.path.length - 1]);
    const byLoss = new Map();
    active.forEach((s, i) => { if (!byLoss.has(s.loss)) byLoss.set(s.loss, []); byLoss.get(s.loss).push(i); });
    const losses = [...byLoss.entries()];
    const calls = [api("/v1/metrics/iou", { boxes1: last.map((r) => r.box), boxes2: last.map(() => cmp.target),
                                            box_format: "cxcywh", dtype: "float64" })];
    for (const [name, rows] of losses) {
      calls.push(api(`/v1/losses/${name}`, { pred: rows.map((i) => last[i].box), target: rows.map(() => cmp.target),
                                             box_format: "cxcywh", dtype: "float64", return_grad: true }));
    }
    cmp.requests += calls.length;
    const [iou, ...results] = await Promise.all(calls);
    last.forEach((r, i) => { r.iou = iou.values[i]; });
    losses.forEach(([, rows], j) => rows.forEach((i, k) => {
      last[i].loss = results[j].loss[k]; last[i].grad = results[j].grad[k];
    }));
  }

  const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function cmpDescend() {
    if (cmp.running) return;
    cmpReset();
    const run = cmp.run;
    cmp.running = true;
    $("cmp-descend").disabled = true; $("cmp-stop").disabled = false;
    cmp.steps = Math.max(1, Math.floor(Number($("cmp-steps").value) || 1));
    cmp.lr = Number($("cmp-lr").value);
    const delay = Math.max(0, Number($("cmp-delay").value) || 0);
    try {
      for (let t = 1; cmp.running && cmp.run === run; t++) {
        const active = cmp.sides.filter((s) => !s.done);
        if (!active.length) break;
        await cmpEvaluate(active);
        if (cmp.run !== run) return;
        for (const s of active) {
          const last = s.path[s.path.length - 1];
          if (last.iou > 0.99) { s.done = true; s.reached = s.path.length - 1; continue; }
          if (t > cmp.steps) { s.done = true; continue; }
          last.lr = cmpLearningRate(cmp.lr, t, cmp.steps);
          const f = last.lr * (2 - last.iou);
          const next = last.box.map((v, k) => v - f * last.grad[k]);
          next[2] = Math.max(next[2], CMP_MIN_SIZE); next[3] = Math.max(next[3], CMP_MIN_SIZE);
          s.path.push({ box: next, iou: null, loss: null, grad: null, lr: null });
        }
        cmp.stepsDone = t - 1;
        cmpDraw();
        if (delay) await pause(delay);
      }
    } catch (e) {
      if (cmp.run !== run) return;
      cmp.error = e.message;
      $("cmp-error").textContent = e.message;
    } finally {
      if (cmp.run === run) {
        cmp.running = false;
        $("cmp-descend").disabled = false; $("cmp-stop").disabled = true;
        cmpDraw();
      }
    }
  }

  const centreDistance = (b, t) => Math.hypot(b[0] - t[0], b[1] - t[1]);

  function cmpStatus(s) {
    const i = s.path.length - 1, last = s.path[i], b = last.box;
    const where = `step ${i}: IoU ${last.iou === null ? "–" : last.iou.toFixed(4)}, loss ${last.loss === null ? "–" : num(last.loss)}`;
    const shape = `centre distance ${centreDistance(b, cmp.target).toFixed(3)}, area ${(b[2] * b[3]).toFixed(3)}`;
    let end = "";
    if (s.reached !== null) end = `IoU > 0.99 after ${s.reached} steps`;
    else if (s.done) end = `stopped after ${i} steps, IoU ${last.iou.toFixed(4)}`;
    return `${where}\n${shape}${end ? "\n" + end : ""}`;
  }

  // both panels share one view (the same scale), which only grows during a run so nothing jumps
  function cmpView(w, h) {
    let [x1, y1, x2, y2] = fromCxcywh(cmp.target);
    const cover = (b) => { const c = fromCxcywh(b); x1 = Math.min(x1, c[0]); y1 = Math.min(y1, c[1]);
                           x2 = Math.max(x2, c[2]); y2 = Math.max(y2, c[3]); };
    for (const s of cmp.sides) for (const r of s.path) cover(r.box);
    const v = cmp.view;
    if (v) { x1 = Math.min(x1, v.x1); y1 = Math.min(y1, v.y1); x2 = Math.max(x2, v.x2); y2 = Math.max(y2, v.y2); }
    cmp.view = { x1, y1, x2, y2 };
    const pad = 0.12 * Math.max(x2 - x1, y2 - y1);
    const k = Math.min(w / (x2 - x1 + 2 * pad), h / (y2 - y1 + 2 * pad));
    const ox = (w - k * (x2 - x1)) / 2 - k * x1, oy = (h - k * (y2 - y1)) / 2 - k * y1;
    return (b) => { const c = fromCxcywh(b); return [ox + k * c[0], oy + k * c[1], ox + k * c[2], oy + k * c[3]]; };
  }

  function cmpDraw() {
    if (!cmp.start) return;
    cmp.view = cmp.running || cmp.sides.some((s) => s.path.length > 1) ? cmp.view : null;
    const c0 = $("cmp-canvas-0"), toPx = cmpView(c0.width, c0.height);
    cmp.sides.forEach((s, i) => {
      const cv = $(`cmp-canvas-${i}`), g = cv.getContext("2d");
      g.clearRect(0, 0, cv.width, cv.height);
      const t = toPx(cmp.target);
      g.fillStyle = "rgba(20, 150, 60, 0.18)"; g.fillRect(t[0], t[1], t[2] - t[0], t[3] - t[1]);
      g.strokeStyle = "#149640"; g.lineWidth = 2; g.strokeRect(t[0], t[1], t[2] - t[0], t[3] - t[1]);
      const st = toPx(cmp.start);
      g.setLineDash([4, 4]); g.strokeStyle = "#999"; g.lineWidth = 1;
      g.strokeRect(st[0], st[1], st[2] - st[0], st[3] - st[1]); g.setLineDash([]);
      g.strokeStyle = s.color; g.globalAlpha = 0.25;
      s.path.forEach((r, k) => { if (k % 5 === 0) { const b = toPx(r.box); g.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]); } });
      g.globalAlpha = 1;
      g.beginPath(); // the trail of the centres
      s.path.forEach((r, k) => { const b = toPx(r.box), x = (b[0] + b[2]) / 2, y = (b[1] + b[3]) / 2;
                                  if (k) g.lineTo(x, y); else g.moveTo(x, y); });
      g.lineWidth = 1.5; g.stroke();
      const b = toPx(s.path[s.path.length - 1].box);
      g.fillStyle = s.color + "2e"; g.fillRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
      g.lineWidth = 2; g.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
      g.fillStyle = "#222"; g.font = "13px system-ui, sans-serif";
      g.fillText(`${s.loss}  ·  step ${s.path.length - 1}`, 8, 18);
      $(`cmp-status-${i}`).textContent = cmpStatus(s);
    });
    chart("cmp-chart-iou", "IoU", (r) => r.iou, [0, 1]);
    chart("cmp-chart-area", "area ÷ target area", (r) => r.box[2] * r.box[3] / (cmp.target[2] * cmp.target[3]), [0, null]);
    chart("cmp-chart-dist", "centre distance ÷ target size", (r) => centreDistance(r.box, cmp.target), [0, null]);
  }

  function chart(id, title, value, [lo, hi]) {
    const cv = $(id), g = cv.getContext("2d"), w = cv.width, h = cv.height, L = 34, B = 18, T = 20;
    g.clearRect(0, 0, w, h);
    const series = cmp.sides.map((s) => s.path.map(value).map((v, k) => [k, v]).filter(([, v]) => v !== null && isFinite(v)));
    const n = Math.max(cmp.steps || Number($("cmp-steps").value) || 1, ...series.map((p) => p.length - 1), 1);
    let top = hi;
    if (top === null) top = Math.max(1e-9, ...series.flat().map(([, v]) => v)) * 1.08;
    const X = (k) => L + (w - L - 6) * k / n, Y = (v) => T + (h - T - B) * (1 - (v - lo) / (top - lo));
    g.strokeStyle = "#bbb"; g.lineWidth = 1;
    g.beginPath(); g.moveTo(L, T); g.lineTo(L, h - B); g.lineTo(w - 6, h - B); g.stroke();
    g.fillStyle = "#444"; g.font = "11px system-ui, sans-serif";
    g.fillText(title, L, 12);
    g.fillText(top.toPrecision(2), 2, T + 4); g.fillText(String(lo), 2, h - B);
    g.fillText("0", L - 3, h - 4); g.fillText("step", (L + w) / 2 - 10, h - 4);
    g.textAlign = "right"; g.fillText(String(n), w - 6, h - 4); g.textAlign = "left";
    series.forEach((pts, i) => {
      g.strokeStyle = CMP_COLORS[i]; g.lineWidth = 1.5; g.beginPath();
      pts.forEach(([k, v], j) => (j ? g.lineTo(X(k), Y(v)) : g.moveTo(X(k), Y(v))));
      g.stroke();
    });
  }

  function cmpSetup(q) {
    const start = $("cmp-start");
    for (const [key, s] of Object.entries(CMP_STARTS)) start.add(new Option(s.label, key, false, key === (q.get("start") || "flat")));
    ["giou", "diou"].forEach((fallback, i) => {
      const select = $(`cmp-loss-${i}`), want = q.get(i ? "right" : "left") || fallback;
      for (const name of Object.keys(state.losses)) select.add(new Option(name, name, false, name === want));
      select.addEventListener("change", cmpReset);
    });
    start.addEventListener("change", cmpReset);
    $("cmp-descend").addEventListener("click", cmpDescend);
    $("cmp-stop").addEventListener("click", () => { cmp.running = false; });
    $("cmp-reset").addEventListener("click", cmpReset);
    cmpReset();
  }

  // ------------------------------------------------------------------------------------------- start
  async function start() {
    const q = new URLSearchParams(location.search);
    if (q.get("api")) $("api").value = q.get("api");
    try {
      const [losses, metrics] = await Promise.all([api("/v1/losses"), api("/v1/metrics")]);
      for (const l of losses.losses) {
        if ((l.kind === "box" && l.pred.startsWith("[N,4]")) || l.kind === "regression") state.losses[l.name] = l;
      }
      state.metrics = metrics.metrics.map((m) => m.name);
      const select = $("loss");
      for (const name of Object.keys(state.losses)) select.add(new Option(name, name, false, name === (q.get("loss") || "ciou")));
      buildForm();
      cmpSetup(q);
    } catch (e) {
      $("error").textContent = `cannot reach the lossd API: ${e.message}`;
      state.error = e.message;
    }
    draw();
    await update();
    state.ready = true;
  }
  $("loss").addEventListener("change", () => { buildForm(); update(); });
  $("box-format").addEventListener("change", () => update());
  $("trail").addEventListener("change", draw);
  $("key-form").addEventListener("submit", (ev) => { ev.preventDefault(); update(); });
  $("params").addEventListener("submit", (ev) => { ev.preventDefault(); update(); });
  $("descend").addEventListener("click", descend);
  $("stop").addEventListener("click", stopDescent);
  $("reset").addEventListener("click", () => {
    stopDescent(); state.pred = INITIAL.pred.slice(); state.target = INITIAL.target.slice(); state.trail = [];
    draw(); update();
  });
  $("api").addEventListener("change", () => location.replace(`?api=${encodeURIComponent($("api").value)}`));
  start();
})();
