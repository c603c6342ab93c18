/*
 * Downpour live dashboard: polls /api/status and /api/history every second and renders them.
 * Every field of either answer may be missing or null. When the coordinator stops answering,
 * the last data stays on screen under a "disconnected" line. <body data-updates> counts the
 * successful status refreshes.
 */
(function () {
  "use strict";

  const POLL_MS = 1000;
  const FETCH_TIMEOUT_MS = 5000;
  const $ = id => document.getElementById(id);

  // ---- formatting (each accepts anything and answers "—" for missing values) ----
  const num = v => typeof v === "number" && isFinite(v);
  const dash = "—";
  function fmtInt(v) { return num(v) ? Math.round(v).toLocaleString("en-US") : dash; }
  function fmtFixed(v, d) { return num(v) ? v.toFixed(d) : dash; }
  function fmtLoss(v) { return num(v) ? (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3)) : dash; }
  function fmtSI(v, unit) {
    if (!num(v)) return dash;
    const a = Math.abs(v), u = unit || "";
    if (a >= 1e9) return (v / 1e9).toFixed(2) + " G" + u;
    if (a >= 1e6) return (v / 1e6).toFixed(2) + " M" + u;
    if (a >= 1e3) return (v / 1e3).toFixed(1) + " k" + u;
    return v.toFixed(a >= 10 || v === 0 ? 0 : 1) + (u ? " " + u : "");
  }
  function fmtBytes(v) { return fmtSI(v, "B"); }
  function fmtDuration(s) {
    if (!num(s)) return dash;
    if (s < 60) return s.toFixed(1) + " s";
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
    const pad = x => String(x).padStart(2, "0");
    return h ? `${h}h ${pad(m)}m ${pad(sec)}s` : `${m}m ${pad(sec)}s`;
  }
  function clock(date) { return date.toLocaleTimeString("en-GB", {hour12: false}); }
  function text(v) { return v === null || v === undefined || v === "" ? dash : String(v); }
  function obj(v) { return v && typeof v === "object" && !Array.isArray(v) ? v : {}; }
  function list(v) { return Array.isArray(v) ? v : []; }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => {
      if (v === null || v === undefined) return;
      if (k === "class") node.className = v; else if (k.startsWith("data-")) node.setAttribute(k, String(v)); else node[k] = v;
    });
    children.flat().forEach(c => { if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c)); });
    return node;
  }

  // ---- state ----
  let status = null, history = null, updates = 0, lastOk = null, everConnected = false;
  const colorOf = (() => {
    const assigned = new Map();
    return name => {
      if (!assigned.has(name)) assigned.set(name, MiniChart.palette[assigned.size % MiniChart.palette.length]);
      return assigned.get(name);
    };
  })();

  // ---- header ----
  function renderHeader(s) {
    const job = text(s.job);
    $("job-name").textContent = job;
    const phase = s.phase ? String(s.phase) : "unknown";
    $("phase").textContent = phase;
    $("phase").dataset.phase = phase;
    const parts = [];
    if (s.consistency) parts.push(String(s.consistency));
    if (num(s.num_servers)) parts.push(s.num_servers + (s.num_servers === 1 ? " server" : " servers"));
    if (num(s.num_workers)) parts.push(s.num_workers + (s.num_workers === 1 ? " worker" : " workers"));
    $("topology").textContent = parts.join(" · ");

    const planned = num(s.planned_examples) && s.planned_examples > 0 ? s.planned_examples : null;
    const frac = planned && num(s.examples) ? Math.max(0, Math.min(1, s.examples / planned)) : null;
    $("progress").dataset.fraction = frac === null ? "" : frac.toFixed(4);
    $("progress-fill").style.width = frac === null ? "0%" : (frac * 100).toFixed(1) + "%";
    $("progress-text").textContent = planned
      ? `${fmtInt(s.examples)} / ${fmtInt(planned)} examples` + (frac === null ? "" : ` (${(frac * 100).toFixed(1)}%)`)
      : (num(s.examples) ? `${fmtInt(s.examples)} examples` : "no progress yet");

    $("examples-per-s").textContent = fmtSI(s.examples_per_s);
    $("loss").textContent = fmtLoss(s.loss);
    $("steps").textContent = fmtInt(s.steps);
    $("elapsed").textContent = fmtDuration(s.elapsed_s);
    $("train-time").textContent = fmtDuration(s.train_s);
    const st = obj(s.staleness);
    $("staleness").textContent = num(st.mean) ? `mean ${fmtFixed(st.mean, 2)} · max ${fmtInt(st.max)}` : dash;
    const b = obj(s.bytes);
    $("bytes").textContent = num(b.sent) || num(b.received) ? `↑ ${fmtBytes(b.sent)} · ↓ ${fmtBytes(b.received)}` : dash;
    document.title = `Downpour · ${job} · ${phase}` + (frac === null ? "" : ` ${(frac * 100).toFixed(0)}%`);

    const banner = $("error-banner");
    const error = s.error;
    if (error !== null && error !== undefined && error !== "" && error !== false) {
      banner.textContent = "Job error: " + (typeof error === "string" ? error : JSON.stringify(error));
      banner.hidden = false;
    } else {
      banner.hidden = true;
      banner.textContent = "";
    }
  }

  // ---- nodes table ----
  const ROLE_ORDER = {coordinator: 0, server: 1, worker: 2};
  function lastValue(name, key) {
    const series = obj(obj(obj(history).series)[name])[key];
    if (!Array.isArray(series)) return null;
    for (let i = series.length - 1; i >= 0; i--) if (num(series[i])) return series[i];
    return null;
  }

  function activity(n) {
    const p = obj(n.progress);
    if (n.role === "worker") {
      // a stream: the prequential AUC of the last window (events scored before they were trained on)
      const auc = num(p.prequential_auc) ? ` · prequential AUC ${fmtFixed(p.prequential_auc, 4)}` : "";
      return `${fmtSI(p.examples_per_s)} ex/s · loss ${fmtLoss(p.loss)} · ${fmtInt(p.steps)} steps${auc}`;
    }
    if (n.role === "server") {
      const rate = lastValue(n.name, "pushes_per_s");
      const pushes = num(rate) ? `${fmtFixed(rate, 1)} pushes/s` : `${fmtInt(p.pushes)} pushes`;
      const extra = num(p.rejected) && p.rejected > 0 ? ` · ${fmtInt(p.rejected)} rejected` : "";
      return `${pushes} · staleness ${fmtFixed(p.staleness_mean, 2)}` + extra;
    }
    return Object.keys(p).length ? Object.entries(p).map(([k, v]) => `${k} ${text(v)}`).join(" · ") : dash;
  }

  function traffic(n) {
    const p = obj(n.progress);
    const out = num(p.bytes_sent) ? p.bytes_sent : p.bytes_out, inn = num(p.bytes_received) ? p.bytes_received : p.bytes_in;
    return num(out) || num(inn) ? `↑ ${fmtBytes(out)} · ↓ ${fmtBytes(inn)}` : dash;
  }

  function renderNodes(s, alertsByNode) {
    const nodes = list(s.nodes).filter(n => n && typeof n === "object").slice();
    nodes.sort((a, b) => ((ROLE_ORDER[a.role] ?? 9) - (ROLE_ORDER[b.role] ?? 9)) ||
      ((num(a.rank) ? a.rank : 1e9) - (num(b.rank) ? b.rank : 1e9)) || String(a.name).localeCompare(String(b.name)));
    const rows = nodes.map(n => {
      const name = text(n.name), state = n.state ? String(n.state) : "unknown";
      const alerts = alertsByNode.get(n.name) || [];
      const age = n.heartbeat_age_s;
      const hostPid = [n.host, n.pid].filter(v => v !== null && v !== undefined && v !== "").join(" / ") || dash;
      const row = el("tr", {"data-node": name, "data-state": state, "data-alert": alerts.length ? alerts.map(a => a.kind).join(" ") : null},
        el("td", {class: "name"}, name, alerts.map(a => el("span", {class: "tag"}, text(a.kind)))),
        el("td", {}, text(n.role)),
        el("td", {}, el("span", {class: "state"}, state)),
        el("td", {class: "muted"}, hostPid),
        el("td", {class: num(age) && age > 3 && state === "alive" ? "late" : ""}, num(age) ? `${age.toFixed(1)} s ago` : dash),
        el("td", {}, activity(n)),
        el("td", {class: "muted"}, traffic(n)));
      if (alerts.length) row.classList.add("alerted");
      return row;
    });
    $("nodes").tBodies[0].replaceChildren(...rows);
    $("nodes-empty").hidden = rows.length > 0;
  }

  // ---- alerts, failures, checkpoints ----
  function affectedText(affected) {
    const short = items => {
      const arr = list(items).map(text);
      return arr.length > 12 ? arr.slice(0, 12).join(", ") + `, … (+${arr.length - 12} more)` : arr.join(", ");
    };
    if (affected === null || affected === undefined) return null;
    if (Array.isArray(affected)) return affected.length ? short(affected) : null;
    if (typeof affected !== "object") return text(affected);
    const parts = Object.entries(affected).map(([k, v]) => `${k}: ` + (Array.isArray(v) ? short(v) : text(v)));
    return parts.length ? parts.join("; ") : null;
  }

  function renderAlerts(s) {
    const alerts = list(s.alerts).filter(a => a && typeof a === "object");
    const items = alerts.map(a => {
      const affected = affectedText(a.affected);
      return el("li", {class: "alert", "data-node": text(a.node), "data-kind": text(a.kind)},
        el("div", {class: "head"}, el("strong", {}, text(a.node)), " ", el("span", {class: "tag"}, text(a.kind)),
          num(a.since_s) ? el("span", {class: "muted"}, ` for ${fmtDuration(a.since_s)}`) : null),
        a.message ? el("div", {class: "message"}, String(a.message)) : null,
        affected ? el("div", {class: "affected"}, "affected — " + affected) : null);
    });
    $("alerts").replaceChildren(...(items.length ? items : [el("li", {class: "empty muted"}, "no alerts")]));

    const failures = list(s.failures).filter(f => f && typeof f === "object").map(f =>
      el("li", {class: "failure", "data-node": text(f.node), "data-kind": text(f.kind)},
        el("strong", {}, text(f.node)), " ", el("span", {class: "tag"}, text(f.kind)),
        num(f.at_s) ? ` at ${fmtDuration(f.at_s)}` : "",
        num(f.detected_after_s) ? ` (detected after ${fmtDuration(f.detected_after_s)})` : "",
        f.reason ? el("div", {class: "message"}, String(f.reason)) : null));
    $("failures").replaceChildren(...(failures.length ? failures : [el("li", {class: "empty muted"}, "no failures")]));

    const c = obj(s.checkpoints);
    const cp = $("checkpoints");
    if (num(c.count) && c.count > 0) {
      cp.textContent = `${fmtInt(c.count)} checkpoint${c.count === 1 ? "" : "s"}` +
        (num(c.last_step) ? ` · last at step ${fmtInt(c.last_step)}` : "") +
        (num(c.mean_write_s) ? ` · mean write ${c.mean_write_s.toFixed(2)} s` : "");
      cp.className = "";
    } else {
      cp.textContent = "no checkpoints";
      cp.className = "muted";
    }
  }

  function renderStatus(s) {
    const alertsByNode = new Map();
    list(s.alerts).forEach(a => {
      if (!a || typeof a !== "object") return;
      if (!alertsByNode.has(a.node)) alertsByNode.set(a.node, []);
      alertsByNode.get(a.node).push(a);
    });
    renderHeader(s);
    renderNodes(s, alertsByNode);
    renderAlerts(s);
  }

  // ---- charts ----
  const charts = {
    throughput: new MiniChart($("chart-throughput"), {yMin: 0}),
    loss: new MiniChart($("chart-loss"), {yFormat: v => fmtLoss(v)}),
    serverLoad: new MiniChart($("chart-server-load"), {yMin: 0}),
    staleness: new MiniChart($("chart-staleness"), {yMin: 0, yFormat: v => v.toFixed(1)}),
    bytes: new MiniChart($("chart-bytes"), {yMin: 0, yFormat: v => fmtBytes(v).replace(" ", "")}),
  };

  function renderCharts(h) {
    const t = list(obj(h).t);
    const all = obj(obj(h).series);
    const names = Object.keys(all).filter(n => n !== "job").sort((a, b) => a.localeCompare(b, "en", {numeric: true}));
    const pick = key => names.filter(n => Array.isArray(obj(all[n])[key]))
      .map(n => ({name: n, color: colorOf(n), values: all[n][key]}));
    const job = obj(all.job);
    const total = (key, label) => Array.isArray(job[key]) ? [{name: label, color: "#e6edf3", values: job[key], dash: [5, 4]}] : [];

    const workers = pick("examples_per_s");
    charts.throughput.draw(t, workers);  // the job total is in the header; on this scale it would flatten the workers
    const losses = pick("loss");
    charts.loss.draw(t, losses.concat(total("loss", "job")));
    charts.serverLoad.draw(t, pick("pushes_per_s"));
    charts.staleness.draw(t, pick("staleness_mean"));

    const sum = key => {
      const rows = pick(key).map(s => s.values);
      if (!rows.length) return null;
      return t.map((_, i) => {
        let acc = null;
        rows.forEach(r => { if (num(r[i])) acc = (acc || 0) + r[i]; });
        return acc;
      });
    };
    const sent = sum("bytes_sent_per_s"), received = sum("bytes_received_per_s");
    charts.bytes.draw(t, [
      sent && {name: "sent", color: "#4cc9f0", values: sent},
      received && {name: "received", color: "#f72585", values: received},
    ].filter(Boolean));
  }

  // ---- polling ----
  async function getJSON(path) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), FETCH_TIMEOUT_MS);
    try {
      const resp = await fetch(path, {cache: "no-store", signal: ctrl.signal});
      if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
      return await resp.json();
    } finally {
      clearTimeout(timer);
    }
  }

  function renderConnection(ok, reason) {
    const c = $("connection");
    c.dataset.connected = String(ok);
    if (ok) {
      c.textContent = `live · updated ${clock(lastOk)}`;
      c.title = "";
    } else {
      c.textContent = lastOk ? `disconnected — last update at ${clock(lastOk)}` : "disconnected — no data yet";
      c.title = reason || "";
    }
    document.body.classList.toggle("disconnected", !ok && everConnected);
  }

  async function poll() {
    const [st, hi] = await Promise.allSettled([getJSON("/api/status"), getJSON("/api/history")]);
    if (hi.status === "fulfilled") {
      history = hi.value;
      renderCharts(history);
    }
    if (st.status === "fulfilled") {
      status = obj(st.value);
      renderStatus(status);
      updates += 1;
      document.body.dataset.updates = String(updates);
      lastOk = new Date();
      everConnected = true;
      renderConnection(true);
    } else {
      renderConnection(false, String(st.reason && st.reason.message || st.reason));
    }
  }

  async function loop() {
    try {
      await poll();
    } catch (e) {
      setTimeout(() => { throw e; });  // surface a rendering bug as an uncaught error, and keep polling
    }
    setTimeout(loop, POLL_MS);
  }

  window.addEventListener("resize", () => { if (history) renderCharts(history); });
  loop();
})();
