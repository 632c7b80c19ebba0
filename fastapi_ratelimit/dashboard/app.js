// The dashboard's only script (served from this app: no CDN). Every value from the server is
// put into the page with textContent, never as HTML: a client or route named "<script>" shows
// as that text. The page's Content-Security-Policy allows no inline script either.
"use strict";

const byId = (id) => document.getElementById(id);

function setText(id, value) {
  byId(id).textContent = String(value);
}

function fillRows(id, rows) {
  const cells = rows.map((row) => {
    const tr = document.createElement("tr");
    for (const value of row) {
      const td = document.createElement("td");
      td.textContent = String(value);
      tr.appendChild(td);
    }
    return tr;
  });
  byId(id).replaceChildren(...cells);
}

function pairs(table) {
  return Object.entries(table || {})
    .map(([name, counts]) => [name, counts[0], counts[1]])
    .sort((a, b) => b[1] - a[1]);
}

function drawChart(series) {
  const width = 600, height = 160, points = series.length;
  const peak = Math.max(1, ...series.map((p) => p[1]));
  const step = points > 1 ? width / (points - 1) : width;
  const line = (index) => series
    .map((p, i) => `${(i * step).toFixed(1)},${(height - (p[index] / peak) * (height - 8)).toFixed(1)}`)
    .join(" ");
  byId("line-total").setAttribute("points", line(1));
  byId("line-blocked").setAttribute("points", line(2));
  setText("peak", `peak ${peak}/s`);
}

function render(s) {
  setText("total", s.total);
  setText("blocked", s.blocked);
  setText("block-rate", `${s.block_rate}%`);
  setText("instances", s.instances);
  setText("backend-errors", s.backend_errors);
  setText("window", `last ${Math.round(s.window / 60)} min`);
  setText("breakers", Object.entries(s.breakers).map(([k, n]) => `${k}: ${n}`).join(", ") || "–");
  const alerts = (s.alerts.length ? s.alerts : [{ severity: "ok", title: "No alerts" }]).map((a) => {
    const li = document.createElement("li");
    li.className = a.severity;
    li.textContent = a.value === undefined
      ? a.title
      : `[${a.severity}] ${a.title}: ${a.value} (threshold ${a.threshold})`;
    return li;
  });
  byId("alerts").replaceChildren(...alerts);
  fillRows("scopes", pairs(s.scopes));
  fillRows("tiers", pairs(s.tiers));
  fillRows("endpoints", pairs(s.endpoints).slice(0, 20));
  fillRows("top", s.top_limited);
  drawChart(s.series);
}

const source = new EventSource("events");
source.onmessage = (event) => {
  render(JSON.parse(event.data));
  setText("status", `live, updated ${new Date().toLocaleTimeString()}`);
};
source.onerror = () => setText("status", "disconnected, retrying…");
