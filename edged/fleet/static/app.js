// edged fleet: the live page of `edged fleet serve`. No framework, no build step, no CDN.
// State comes from /events (Server-Sent Events): a "snapshot" (the /api/fleet document) on every
// (re)connection, then "changes" (the aggregator's events, batched, with the fleet summary).
// Everything from the broker (device ids, boards, models...) is set as text, never as HTML.
"use strict";

(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const STATE_RANK = { offline: 0, stale: 1, online: 2 };
  const SERIES = ["decode_tok_s", "tokens_per_s", "hottest_c"];
  const CHARTS = [
    { key: "decode_tok_s", label: "decode tok/s", unit: "", digits: 1, floor: 0, minRange: 2, cls: "tok" },
    { key: "hottest_c", label: "hottest", unit: "°C", digits: 1, floor: null, minRange: 4, cls: "temp", warn: 70 },
  ];
  const FACTS = [
    ["tokens_per_s", "gen tok/s"],
    ["s_per_1k_tokens", "s / 1k tok"],
    ["ttft_ms_p50", "TTFT p50 ms"],
    ["queue", "queue"],
    ["jobs_done", "jobs done"],
    ["governor", "governor"],
    ["last_seen", "last seen"],
    ["reports", "reports"],
  ];

  const fleet = {
    devices: new Map(), // id -> DeviceState (as JSON)
    history: new Map(), // id -> {t: [], decode_tok_s: [], tokens_per_s: [], hottest_c: []}
    cards: new Map(), // id -> card parts
    dirty: new Set(),
    order: [],
    summary: null,
    counters: null,
    resolution: 10,
    chartS: 900,
    skew: 0, // server clock minus ours, seconds
    scheduled: false,
    summaryDirty: false,
  };

  const $ = (id) => document.getElementById(id);
  const now = () => Date.now() / 1000 + fleet.skew;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(value, digits) {
    return value === null || value === undefined ? "—" : Number(value).toFixed(digits);
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s}s ago`;
    if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s ago`;
    if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m ago`;
    return `${Math.floor(s / 86400)}d ago`;
  }

  function setValue(node, value, text) {
    const raw = value === null || value === undefined ? "" : String(value);
    if (node.dataset.value !== raw) node.dataset.value = raw;
    if (node.textContent !== text) node.textContent = text;
  }

  // -- the cards ----------------------------------------------------------------------------------

  function makeCard(id) {
    const card = el("article", "card");
    card.dataset.device = id;
    const head = el("header", "card-head");
    const name = el("h2", "name", id);
    name.title = id;
    const badge = el("span", "badge state");
    const throttled = el("span", "badge throttled", "throttled");
    throttled.hidden = true;
    head.append(name, badge, throttled);
    const meta = el("p", "meta");
    const charts = el("div", "charts");
    const chartParts = {};
    for (const spec of CHARTS) {
      const figure = el("figure", `chart ${spec.cls}`);
      const caption = el("figcaption");
      const value = el("b", "value", "—");
      value.dataset.field = spec.key;
      const zone = spec.key === "hottest_c" ? el("span", "zone dim") : null;
      caption.append(el("span", "label", spec.label));
      if (zone) caption.append(zone);
      caption.append(value);
      if (spec.unit) caption.append(el("span", "unit", spec.unit));
      const chart = svg("svg", { viewBox: "0 0 360 74", role: "img", "aria-label": spec.label });
      chart.dataset.series = spec.key;
      figure.append(caption, chart);
      charts.append(figure);
      chartParts[spec.key] = { spec, value, chart, zone };
    }
    const facts = el("dl", "facts");
    const factParts = {};
    for (const [key, label] of FACTS) {
      const item = el("div");
      const dd = el("dd", "", "—");
      dd.dataset.field = key;
      item.append(el("dt", "", label), dd);
      facts.append(item);
      factParts[key] = dd;
    }
    card.append(head, meta, charts, facts);
    return { card, name, badge, throttled, meta, charts: chartParts, facts: factParts };
  }

  function renderCard(id) {
    const d = fleet.devices.get(id);
    if (!d) return;
    let parts = fleet.cards.get(id);
    if (!parts) {
      parts = makeCard(id);
      fleet.cards.set(id, parts);
    }
    const classes = `card state-${d.state}${d.throttled ? " is-throttled" : ""}`;
    if (parts.card.className !== classes) parts.card.className = classes;
    parts.card.dataset.state = d.state;
    setValue(parts.badge, d.state, d.state);
    parts.throttled.hidden = !d.throttled;
    const meta = [d.board || "unknown board", d.profile, d.backend, d.model].filter(Boolean).join(" · ");
    if (parts.meta.textContent !== meta) parts.meta.textContent = meta;
    parts.meta.title = meta;

    const f = parts.facts;
    setValue(f.tokens_per_s, d.tokens_per_s, fmt(d.tokens_per_s, 1));
    setValue(f.s_per_1k_tokens, d.s_per_1k_tokens, fmt(d.s_per_1k_tokens, 1));
    setValue(f.ttft_ms_p50, d.ttft_ms_p50, fmt(d.ttft_ms_p50, 0));
    const queue = d.queue_depth === null ? "—" : d.queue_max_depth ? `${d.queue_depth}/${d.queue_max_depth}` : String(d.queue_depth);
    setValue(f.queue, d.queue_depth, queue);
    setValue(f.jobs_done, d.jobs_done, d.jobs_done === null ? "—" : String(d.jobs_done));
    setValue(f.governor, d.governor, d.governor || "—");
    f.governor.className = `gov-${d.governor || "none"}`;
    setValue(f.reports, d.reports, String(d.reports));
    f.last_seen.dataset.at = d.last_seen === null ? "" : String(d.last_seen);
    renderAge(f.last_seen, d);

    const history = fleet.history.get(id);
    for (const key of Object.keys(parts.charts)) {
      const { spec, value, chart, zone } = parts.charts[key];
      const current = d[key];
      setValue(value, current, fmt(current, spec.digits));
      if (zone) zone.textContent = d.hottest_zone || "";
      value.classList.toggle("warn", key === "hottest_c" && current !== null && current >= 70);
      value.classList.toggle("hot", key === "hottest_c" && current !== null && current >= 80);
      drawChart(chart, history, spec, d.interval_s);
    }
  }

  function renderAge(node, d) {
    const text = d.last_seen === null ? "never" : age(now() - d.last_seen);
    setValue(node, d.last_seen, text);
  }

  // -- the charts ---------------------------------------------------------------------------------

  function drawChart(chart, history, spec, intervalS) {
    const W = 360;
    const H = 74;
    const left = 32;
    const right = 6;
    const top = 6;
    const bottom = 15;
    const times = history ? history.t : [];
    const values = history ? history[spec.key] : [];
    const end = now();
    const first = times.length ? times[0] : end;
    // The charts span the history the page has (up to chart_s), so a young aggregator fills them too.
    const span = Math.min(fleet.chartS, Math.max(10 * fleet.resolution, end - first + fleet.resolution));
    const start = end - span;
    const points = [];
    for (let i = 0; i < times.length; i++) {
      if (times[i] >= start && values[i] !== null && values[i] !== undefined) points.push([times[i], values[i]]);
    }
    chart.replaceChildren();
    chart.dataset.points = String(points.length);
    chart.dataset.last = points.length ? String(points[points.length - 1][1]) : "";
    chart.append(svg("line", { x1: left, x2: W - right, y1: H - bottom, y2: H - bottom, class: "axis" }));
    chart.append(svg("text", { x: left, y: H - 3, class: "tick" }, span >= 120 ? `−${Math.round(span / 60)} min` : `−${Math.round(span)} s`));
    chart.append(svg("text", { x: W - right, y: H - 3, class: "tick end" }, "now"));
    if (!points.length) {
      chart.append(svg("text", { x: (left + W - right) / 2, y: (top + H - bottom) / 2 + 4, class: "nodata" }, "no data"));
      return;
    }
    let lo = Math.min(...points.map((p) => p[1]));
    let hi = Math.max(...points.map((p) => p[1]));
    if (spec.floor !== null) lo = Math.min(lo, spec.floor);
    if (hi - lo < spec.minRange) {
      const mid = (hi + lo) / 2;
      lo = spec.floor !== null ? Math.max(spec.floor, mid - spec.minRange / 2) : mid - spec.minRange / 2;
      hi = lo + spec.minRange;
    }
    const pad = (hi - lo) * 0.08;
    hi += pad;
    if (spec.floor === null) lo -= pad;
    const x = (t) => left + ((t - start) / span) * (W - left - right);
    const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (H - top - bottom);
    for (const v of [lo, hi]) {
      chart.append(svg("line", { x1: left, x2: W - right, y1: y(v), y2: y(v), class: "grid" }));
      chart.append(svg("text", { x: left - 4, y: y(v) + 3, class: "tick end" }, fmt(v, Math.abs(hi - lo) < 10 ? 1 : 0)));
    }
    if (spec.warn !== undefined && spec.warn > lo && spec.warn < hi) {
      chart.append(svg("line", { x1: left, x2: W - right, y1: y(spec.warn), y2: y(spec.warn), class: "warnline" }));
    }
    // Runs of points without a gap (a missed report leaves one): one line and area each.
    const gap = 3 * Math.max(fleet.resolution, intervalS || 0);
    const runs = [];
    let run = [];
    for (const p of points) {
      if (run.length && p[0] - run[run.length - 1][0] > gap) {
        runs.push(run);
        run = [];
      }
      run.push(p);
    }
    runs.push(run);
    for (const r of runs) {
      const line = r.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
      if (r.length > 1) {
        const area = `${line}L${x(r[r.length - 1][0]).toFixed(1)},${H - bottom}L${x(r[0][0]).toFixed(1)},${H - bottom}Z`;
        chart.append(svg("path", { d: area, class: "area" }));
      }
      chart.append(svg("path", { d: line, class: "line" }));
    }
    const [lt, lv] = points[points.length - 1];
    chart.append(svg("circle", { cx: x(lt), cy: y(lv), r: 2.6, class: "dot" }));
    chart.setAttribute("aria-label", `${spec.label}: ${fmt(lv, spec.digits)}${spec.unit}, ${points.length} points`);
  }

  // -- summary ------------------------------------------------------------------------------------

  function renderSummary() {
    const s = fleet.summary;
    if (!s) return;
    setValue($("sum-online"), s.online, String(s.online));
    $("sum-total").textContent = ` / ${s.devices}`;
    $("sum-states").textContent = `${s.stale} stale · ${s.offline} offline${s.throttled ? ` · ${s.throttled} throttled` : ""}`;
    setValue($("sum-tokens"), s.tokens_per_s, fmt(s.tokens_per_s, 1));
    setValue($("sum-jobs"), s.jobs_per_min, fmt(s.jobs_per_min, s.jobs_per_min % 1 ? 1 : 0));
    const hot = s.hottest;
    setValue($("sum-hottest-c"), hot ? hot.hottest_c : null, hot ? fmt(hot.hottest_c, 1) : "—");
    setValue($("sum-hottest"), hot ? hot.device_id : null, hot ? hot.device_id : "no temperature reported");
    $("sum-hottest-zone").textContent = hot && hot.zone ? hot.zone : "";
    $("sum-hottest-c").classList.toggle("warn", Boolean(hot && hot.hottest_c >= 70));
    const c = fleet.counters;
    if (c) {
      const skipped = c.malformed + c.unknown_schema;
      $("counters").textContent = `${c.messages} messages${skipped ? ` · ${c.malformed} malformed, ${c.unknown_schema} unknown schema skipped` : ""}`;
    }
    $("empty").hidden = fleet.devices.size > 0;
  }

  // -- ordering and the render loop ---------------------------------------------------------------

  function sortKey(d) {
    return [STATE_RANK[d.state] ?? 0, d.throttled ? 0 : 1, d.device_id];
  }

  function compare(a, b) {
    const ka = sortKey(a);
    const kb = sortKey(b);
    for (let i = 0; i < ka.length; i++) {
      if (ka[i] < kb[i]) return -1;
      if (ka[i] > kb[i]) return 1;
    }
    return 0;
  }

  function reorder() {
    const order = [...fleet.devices.values()].sort(compare).map((d) => d.device_id);
    if (order.length === fleet.order.length && order.every((id, i) => id === fleet.order[i])) return;
    fleet.order = order;
    $("devices").replaceChildren(...order.map((id) => fleet.cards.get(id).card));
  }

  function schedule() {
    if (fleet.scheduled) return;
    fleet.scheduled = true;
    requestAnimationFrame(flush);
  }

  function flush() {
    fleet.scheduled = false;
    for (const id of fleet.dirty) renderCard(id);
    fleet.dirty.clear();
    for (const id of [...fleet.cards.keys()]) {
      if (!fleet.devices.has(id)) {
        fleet.cards.get(id).card.remove();
        fleet.cards.delete(id);
      }
    }
    reorder();
    if (fleet.summaryDirty) renderSummary();
    fleet.summaryDirty = false;
    document.body.dataset.devices = String(fleet.devices.size);
  }

  // -- data ---------------------------------------------------------------------------------------

  function addPoint(id, point) {
    let h = fleet.history.get(id);
    if (!h) {
      h = { t: [] };
      for (const key of SERIES) h[key] = [];
      fleet.history.set(id, h);
    }
    const n = h.t.length;
    const bucket = Math.floor(point.t / fleet.resolution);
    if (n && point.t < h.t[n - 1]) return;
    const replace = n && Math.floor(h.t[n - 1] / fleet.resolution) === bucket;
    const at = replace ? n - 1 : n;
    h.t[at] = point.t;
    for (const key of SERIES) h[key][at] = point[key] ?? null;
    const horizon = point.t - fleet.chartS - fleet.resolution;
    let drop = 0;
    while (drop < h.t.length && h.t[drop] < horizon) drop++;
    if (drop) for (const key of ["t", ...SERIES]) h[key].splice(0, drop);
  }

  function applySnapshot(doc) {
    fleet.resolution = doc.resolution_s;
    fleet.chartS = doc.chart_s;
    fleet.skew = doc.generated_at - Date.now() / 1000;
    fleet.devices = new Map(doc.devices.map((d) => [d.device_id, d]));
    fleet.history = new Map();
    for (const [id, series] of Object.entries(doc.history)) {
      const h = { t: series.t.slice() };
      for (const key of SERIES) h[key] = (series[key] || []).slice();
      fleet.history.set(id, h);
    }
    fleet.summary = doc.summary;
    fleet.counters = doc.counters;
    fleet.summaryDirty = true;
    $("broker").textContent = doc.broker ? `broker ${doc.broker}` : "";
    document.body.dataset.snapshots = String(Number(document.body.dataset.snapshots || 0) + 1);
    for (const id of fleet.devices.keys()) fleet.dirty.add(id);
    schedule();
  }

  function applyChanges(doc) {
    for (const event of doc.events) {
      const id = event.device_id;
      if (event.kind === "removed") {
        fleet.devices.delete(id);
        fleet.history.delete(id);
        continue;
      }
      if (event.device) fleet.devices.set(id, event.device);
      if (event.kind === "telemetry" && event.point) addPoint(id, event.point);
      fleet.dirty.add(id);
    }
    if (doc.summary) {
      fleet.summary = doc.summary;
      fleet.skew = doc.summary.at - Date.now() / 1000;
    }
    if (doc.counters) fleet.counters = doc.counters;
    fleet.summaryDirty = true;
    schedule();
  }

  function setConnection(state, text) {
    const conn = $("conn");
    conn.dataset.state = state;
    conn.textContent = text;
  }

  function connect() {
    const source = new EventSource("/events");
    source.addEventListener("snapshot", (e) => {
      applySnapshot(JSON.parse(e.data));
      setConnection("live", "live");
    });
    source.addEventListener("changes", (e) => applyChanges(JSON.parse(e.data)));
    source.onerror = () => {
      setConnection("lost", "reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        setTimeout(connect, 3000);
      }
    };
  }

  // Ages move with the clock, not with messages.
  setInterval(() => {
    for (const [id, parts] of fleet.cards) {
      const d = fleet.devices.get(id);
      if (d) renderAge(parts.facts.last_seen, d);
    }
  }, 1000);

  connect();
})();
