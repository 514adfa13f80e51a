// Draws the report's charts with uPlot from the JSON in #goodhart-data (see page.rs):
// a smoothing slider for the step charts (TensorBoard's debiased EMA), linked cursor and
// zoom across them, legend toggles and hover values (uPlot's legend), and markers with
// labels stacked in rows so that none overlaps another.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("goodhart-data").textContent);
  const report = { charts: [], smoothing: data.smoothing, ema, setSmoothing, resetZoom };
  window.goodhartReport = report;

  // The same as `report::ema` in Rust: m = w m + (1 - w) y from 0, shown as m / (1 - w^n).
  function ema(ys, w) {
    if (!(w > 0)) return ys.slice();
    let last = 0;
    let n = 0;
    return ys.map(function (y) {
      last = last * w + (1 - w) * y;
      n += 1;
      return last / (1 - Math.pow(w, n));
    });
  }

  // The chart's lines joined on one x axis, step lines smoothed by w.
  function aligned(spec, w) {
    const tables = spec.lines.map(function (l) {
      return [l.x, spec.step && !l.dots ? ema(l.y, w) : l.y.slice()];
    });
    return uPlot.join(tables);
  }

  let zooming = false;
  function zoomAll(min, max) {
    if (zooming || !(max > min)) return;
    zooming = true;
    for (const c of report.charts) {
      if (c.spec.step) c.plot.setScale("x", { min: min, max: max });
    }
    zooming = false;
  }

  function resetZoom() {
    for (const c of report.charts) {
      if (c.spec.step) c.plot.setData(c.plot.data, true);
    }
  }

  function setSmoothing(w) {
    report.smoothing = w;
    const input = document.getElementById("smoothing");
    if (input && Number(input.value) !== w) input.value = String(w);
    const out = document.getElementById("smoothing-value");
    if (out) out.textContent = w.toFixed(2);
    for (const c of report.charts) {
      if (c.spec.step) c.plot.setData(aligned(c.spec, w), false);
    }
  }

  // Vertical markers (dashed) and dots at (x, y); labels in the first free row.
  function drawMarks(u, spec) {
    const px = window.devicePixelRatio || 1;
    const ctx = u.ctx;
    const box = u.bbox;
    const marks = spec.marks
      .filter(function (m) {
        return m.line === null || (u.series[m.line + 1] && u.series[m.line + 1].show);
      })
      .sort(function (a, b) {
        return a.x - b.x;
      });
    if (marks.length === 0) return;
    ctx.save();
    ctx.beginPath();
    ctx.rect(box.left, box.top, box.width, box.height);
    ctx.clip();
    ctx.font = Math.round(11 * px) + "px system-ui, sans-serif";
    ctx.textBaseline = "top";
    const rowHeight = 14 * px;
    const rows = [];
    for (const m of marks) {
      const x = Math.round(u.valToPos(m.x, "x", true));
      if (x < box.left - 1 || x > box.left + box.width + 1) continue;
      ctx.strokeStyle = m.color;
      if (m.y === null) {
        ctx.lineWidth = px;
        ctx.setLineDash([4 * px, 4 * px]);
        ctx.beginPath();
        ctx.moveTo(x, box.top);
        ctx.lineTo(x, box.top + box.height);
        ctx.stroke();
      } else {
        ctx.lineWidth = 2 * px;
        ctx.setLineDash([]);
        ctx.beginPath();
        ctx.arc(x, u.valToPos(m.y, "y", true), 5 * px, 0, 2 * Math.PI);
        ctx.stroke();
      }
      if (!m.label) continue;
      const w = ctx.measureText(m.label).width + 4 * px;
      const right = box.left + box.width;
      const start = x + 3 * px + w > right ? x - 3 * px - w : x + 3 * px;
      let r = rows.findIndex(function (end) {
        return end <= start;
      });
      if (r < 0) {
        if (rows.length >= 6) continue; // the detections table lists it
        r = rows.length;
        rows.push(0);
      }
      rows[r] = start + w + 4 * px;
      const y = box.top + 2 * px + r * rowHeight;
      ctx.fillStyle = "rgba(255,255,255,0.85)";
      ctx.fillRect(start - px, y - px, w, rowHeight - px);
      ctx.fillStyle = m.color;
      ctx.fillText(m.label, start + px, y);
    }
    ctx.restore();
  }

  function build(spec, el) {
    const small = spec.small;
    const width = Math.max(280, el.clientWidth || (small ? 360 : 900));
    const series = [{ label: spec.x_label }];
    for (const l of spec.lines) {
      const s = { label: l.label, stroke: l.color, width: small ? 1.5 : 2, spanGaps: true };
      if (l.dash) s.dash = [6, 4];
      if (l.dots) {
        s.paths = function () {
          return null;
        };
        s.points = { show: true, size: 6, fill: l.color, stroke: l.color };
      }
      series.push(s);
    }
    const opts = {
      width: width,
      height: small ? 200 : 340,
      title: spec.title || undefined,
      scales: { x: { time: false } },
      axes: [{ label: spec.x_label }, {}],
      series: series,
      legend: { live: true },
      cursor: {
        drag: { x: true, y: false, setScale: !spec.step },
        sync: spec.step ? { key: "goodhart-steps", setSeries: false } : undefined,
      },
      hooks: {
        draw: [
          function (u) {
            drawMarks(u, spec);
          },
        ],
        setSelect: [
          function (u) {
            if (!spec.step || u.select.width <= 0) return;
            const min = u.posToVal(u.select.left, "x");
            const max = u.posToVal(u.select.left + u.select.width, "x");
            u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
            zoomAll(min, max);
          },
        ],
      },
    };
    const plot = new uPlot(opts, aligned(spec, report.smoothing), el);
    if (spec.step) {
      plot.over.addEventListener("dblclick", resetZoom);
    }
    return plot;
  }

  const byId = new Map(
    data.charts.map(function (c) {
      return [c.id, c];
    })
  );
  for (const el of document.querySelectorAll("[data-chart]")) {
    const spec = byId.get(el.dataset.chart);
    if (!spec) throw new Error("no data for chart " + el.dataset.chart);
    report.charts.push({ id: spec.id, spec: spec, plot: build(spec, el), el: el });
  }

  const input = document.getElementById("smoothing");
  if (input) {
    input.value = String(report.smoothing);
    input.addEventListener("input", function () {
      setSmoothing(Number(input.value));
    });
  }
  setSmoothing(report.smoothing);

  let resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      for (const c of report.charts) {
        const w = Math.max(280, c.el.clientWidth);
        if (w !== c.plot.width) c.plot.setSize({ width: w, height: c.plot.height });
      }
    }, 150);
  });
  report.ready = true;
})();
