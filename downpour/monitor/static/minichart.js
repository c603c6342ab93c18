/*
 * MiniChart: a small canvas line chart, no dependencies (a global, no modules).
 *
 *   const chart = new MiniChart(canvas, {
 *     yMin: 0,                      // optional fixed bottom of the y axis (else the data minimum)
 *     yFormat: v => v.toFixed(2),   // optional label format for y values (legend and axis)
 *   });
 *   chart.draw(t, [                 // t: x values in seconds, shared by every series
 *     {name: "worker-0", color: "#4cc9f0", values: [0, 1200, null, 1250]},  // null = gap
 *     {name: "total", values: [...], dash: [4, 3]},                         // color optional
 *   ]);
 *
 * The canvas keeps its CSS size; its backing store follows devicePixelRatio (HiDPI), so
 * draw() again after a resize. The legend (name and last value) wraps above the plot;
 * the y axis shows min and max, the x axis the first, middle and last time in seconds.
 * After each draw: canvas.dataset.points = non-null points drawn, canvas.dataset.series = series count.
 */
(function (global) {
  "use strict";

  const PALETTE = ["#4cc9f0", "#f72585", "#b5e48c", "#ffb703", "#9d4edd", "#fb8500", "#06d6a0", "#ef476f", "#8ecae6", "#e9c46a"];
  const THEME = {fg: "#c9d1d9", muted: "#8b949e", grid: "#30363d", font: "11px system-ui, sans-serif"};

  function finite(v) { return typeof v === "number" && isFinite(v); }

  function defaultFormat(v) {
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    if (a >= 10 || v === 0) return v.toFixed(0);
    return v.toPrecision(3);
  }

  function MiniChart(canvas, options) {
    this.canvas = canvas;
    this.options = Object.assign({yMin: null, yFormat: defaultFormat}, options || {});
  }

  MiniChart.palette = PALETTE;
  MiniChart.format = defaultFormat;

  MiniChart.prototype.draw = function (t, series) {
    const canvas = this.canvas, fmt = this.options.yFormat;
    t = Array.isArray(t) ? t : [];
    series = (Array.isArray(series) ? series : []).filter(s => s && Array.isArray(s.values));

    // Backing store at device resolution; all drawing below is in CSS pixels.
    const dpr = global.devicePixelRatio || 1;
    const w = canvas.clientWidth || 300, h = canvas.clientHeight || 150;
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = THEME.font;
    ctx.textBaseline = "middle";

    // Data range over the points that will be drawn.
    let xMin = Infinity, xMax = -Infinity, yMin = Infinity, yMax = -Infinity, points = 0;
    series.forEach(s => s.values.forEach((v, i) => {
      if (!finite(v) || !finite(t[i])) return;
      points++;
      xMin = Math.min(xMin, t[i]); xMax = Math.max(xMax, t[i]);
      yMin = Math.min(yMin, v); yMax = Math.max(yMax, v);
    }));

    // Legend: colored swatch, name, last value; wraps onto more lines.
    const colors = series.map((s, k) => s.color || PALETTE[k % PALETTE.length]);
    let lx = 8, ly = 10;
    series.forEach((s, k) => {
      let last = null;
      for (let i = s.values.length - 1; i >= 0; i--) if (finite(s.values[i])) { last = s.values[i]; break; }
      const label = s.name + (last === null ? "" : " " + fmt(last));
      const width = 14 + ctx.measureText(label).width + 12;
      if (lx + width > w - 4 && lx > 8) { lx = 8; ly += 15; }
      ctx.fillStyle = colors[k];
      ctx.fillRect(lx, ly - 2, 10, 4);
      ctx.fillStyle = THEME.fg;
      ctx.textAlign = "left";
      ctx.fillText(label, lx + 14, ly);
      lx += width;
    });

    const top = series.length ? ly + 14 : 10, right = w - 10, bottom = h - 20;
    canvas.dataset.series = String(series.length);
    canvas.dataset.points = String(bottom - top < 10 ? 0 : points);
    if (!points || bottom - top < 10) {
      ctx.fillStyle = THEME.muted;
      ctx.textAlign = "center";
      ctx.fillText("no data yet", w / 2, (top + h) / 2);
      return;
    }

    if (finite(this.options.yMin)) { yMin = Math.min(this.options.yMin, yMin); }
    if (yMax === yMin) { const pad = Math.abs(yMax) * 0.1 || 1; yMax += pad; if (!finite(this.options.yMin)) yMin -= pad; }
    if (xMax === xMin) xMax = xMin + 1;
    const left = Math.max(ctx.measureText(fmt(yMax)).width, ctx.measureText(fmt(yMin)).width, 20) + 10;
    const X = x => left + (x - xMin) / (xMax - xMin) * (right - left);
    const Y = y => bottom - (y - yMin) / (yMax - yMin) * (bottom - top);

    // Axes: frame lines, a mid grid line, min/max on y, first/middle/last time on x.
    ctx.strokeStyle = THEME.grid;
    ctx.lineWidth = 1;
    ctx.setLineDash([]);
    ctx.beginPath();
    ctx.moveTo(left, top); ctx.lineTo(left, bottom); ctx.lineTo(right, bottom);
    ctx.moveTo(left, top + 0.5); ctx.lineTo(right, top + 0.5);
    ctx.moveTo(left, (top + bottom) / 2); ctx.lineTo(right, (top + bottom) / 2);
    ctx.stroke();
    ctx.fillStyle = THEME.muted;
    ctx.textAlign = "right";
    ctx.fillText(fmt(yMax), left - 5, top);
    ctx.fillText(fmt(yMin), left - 5, bottom);
    ctx.textBaseline = "top";
    [[xMin, "left"], [(xMin + xMax) / 2, "center"], [xMax, "right"]].forEach(([x, align]) => {
      ctx.textAlign = align;
      ctx.fillText(x.toFixed(xMax - xMin < 10 ? 1 : 0) + " s", X(x), bottom + 5);
    });

    // Lines, broken at nulls; an isolated point is drawn as a dot.
    ctx.lineWidth = 1.6;
    ctx.lineJoin = "round";
    series.forEach((s, k) => {
      ctx.strokeStyle = ctx.fillStyle = colors[k];
      ctx.setLineDash(s.dash || []);
      ctx.beginPath();
      let pen = false;
      s.values.forEach((v, i) => {
        if (!finite(v) || !finite(t[i])) { pen = false; return; }
        const px = X(t[i]), py = Y(v);
        const alone = !finite(s.values[i - 1]) && !finite(s.values[i + 1]);
        if (alone) ctx.fillRect(px - 1.5, py - 1.5, 3, 3);
        if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
        pen = true;
      });
      ctx.stroke();
    });
    ctx.setLineDash([]);
  };

  global.MiniChart = MiniChart;
})(window);
