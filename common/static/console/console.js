/* The operator console (common/templates/console/index.html): loads /api/console/snapshot,
 * subscribes to every panel's staff-only topic on /ws/ and applies the deltas the publisher
 * sends (common/console_publisher.py). Plain DOM, no framework; sparklines with uPlot (vendored).
 * Every text from a sample goes in through textContent, and only same-site links are followed. */
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("console-config").textContent);
  const csrfToken = document.querySelector('meta[name="csrf-token"]').content;
  const panels = {}; // name -> {sample, status, error, at, ms, rates, seenAt}
  const rendered = {}; // name -> {section: json} so unchanged sections are not rebuilt
  const charts = {}; // name -> {counterKey: uPlot}
  let clockSkew = 0; // server epoch seconds - browser epoch seconds
  let socket = null;
  let retryDelay = 1000;

  function nowServer() {
    return Date.now() / 1000 + clockSkew;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function safeLink(href) {
    return typeof href === "string" && href.startsWith("/") && !href.startsWith("//") ? href : null;
  }

  function linked(text, href) {
    const target = safeLink(href);
    return target ? el("a", { href: target }, text) : document.createTextNode(String(text));
  }

  function formatValue(value) {
    if (value === null || value === undefined) return "—";
    if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(2);
    return String(value);
  }

  function formatRate(perSecond) {
    if (perSecond === null || perSecond === undefined) return "—";
    if (perSecond >= 100) return `${Math.round(perSecond)}/s`;
    return `${perSecond.toFixed(2)}/s`;
  }

  function formatAge(seconds) {
    if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s ago`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
    return `${(seconds / 3600).toFixed(1)} h ago`;
  }

  function section(name) {
    return document.getElementById(`panel-${name}`);
  }

  // --- actions ---------------------------------------------------------------------------------

  function flash(name, text, kind) {
    const node = section(name).querySelector("[data-flash]");
    node.hidden = false;
    node.dataset.kind = kind;
    node.textContent = text;
  }

  async function runAction(name, ref, button) {
    button.disabled = true;
    flash(name, `${ref.label} …`, "pending");
    try {
      const response = await fetch(config.actions_url, {
        method: "POST",
        credentials: "same-origin",
        headers: {
          "Content-Type": "application/json",
          Accept: "application/json",
          "X-CSRFToken": csrfToken,
        },
        body: JSON.stringify({ panel: name, action: ref.action, params: ref.params || {} }),
      });
      const body = await response.json().catch(() => ({}));
      if (response.status === 401) window.location.assign(config.login_url);
      if (response.ok) {
        flash(name, body.detail, "ok");
      } else {
        const message = body.error ? body.error.message : `HTTP ${response.status}`;
        flash(name, `${ref.label}: ${message}`, "error");
      }
    } catch (error) {
      flash(name, `${ref.label}: ${error}`, "error");
    } finally {
      button.disabled = false;
    }
  }

  function actionButtons(name, refs) {
    const box = el("span", { class: "actions" });
    for (const ref of refs || []) {
      const button = el("button", { type: "button", "data-action": ref.action }, ref.label);
      button.addEventListener("click", () => runAction(name, ref, button));
      box.append(button);
    }
    return box;
  }

  // --- rendering -------------------------------------------------------------------------------

  function changed(name, part, value) {
    const memo = (rendered[name] = rendered[name] || {});
    const encoded = JSON.stringify(value);
    if (memo[part] === encoded) return false;
    memo[part] = encoded;
    return true;
  }

  function renderAttention(name, node, items) {
    if (!changed(name, "attention", items)) return;
    node.replaceChildren(
      ...items.map((item) =>
        el(
          "li",
          { "data-key": item.key },
          linked(item.text, item.link),
          item.actions && item.actions.length ? actionButtons(name, item.actions) : null,
        ),
      ),
    );
    node.hidden = items.length === 0;
  }

  function renderNumbers(name, node, numbers) {
    if (!changed(name, "numbers", numbers)) return;
    node.replaceChildren(
      ...numbers.map((number) =>
        el(
          "div",
          { class: "number", "data-number": number.key },
          el("dt", {}, number.label),
          el("dd", { class: "value" }, linked(formatValue(number.value), number.link)),
        ),
      ),
    );
  }

  function renderTables(name, node, tables) {
    if (!changed(name, "tables", tables)) return;
    node.replaceChildren(
      ...tables.map((table) => {
        const withActions = table.rows.some((row) => row.actions && row.actions.length);
        const head = el("tr", {}, ...table.columns.map((column) => el("th", {}, column)));
        if (withActions) head.append(el("th", {}, ""));
        const body = table.rows.map((row) => {
          const cells = row.cells.map((cell, index) =>
            el("td", {}, index === 0 ? linked(formatValue(cell), row.link) : formatValue(cell)),
          );
          if (withActions) cells.push(el("td", {}, actionButtons(name, row.actions)));
          return el("tr", { "data-row": row.key }, ...cells);
        });
        if (!body.length) {
          const span = table.columns.length + (withActions ? 1 : 0);
          body.push(el("tr", { class: "empty" }, el("td", { colspan: span }, "none")));
        }
        return el(
          "table",
          { "data-table": table.key },
          el("caption", {}, table.title),
          el("thead", {}, head),
          el("tbody", {}, ...body),
        );
      }),
    );
  }

  function sparkline(container, series) {
    if (typeof uPlot === "undefined") return null;
    const windowSeconds = config.window_seconds;
    const options = {
      width: Math.max(120, container.clientWidth || 160),
      height: 36,
      pxAlign: false,
      cursor: { show: false },
      select: { show: false },
      legend: { show: false },
      scales: {
        // The last CONSOLE_WINDOW_SECONDS at most; less while there is less history.
        x: {
          time: false,
          range: (u, min, max) => [min < max ? Math.max(min, max - windowSeconds) : max - 60, max],
        },
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1] },
      },
      axes: [{ show: false }, { show: false }],
      series: [
        {},
        { stroke: "#2563eb", width: 1.5, fill: "rgba(37, 99, 235, 0.12)", points: { show: false } },
      ],
    };
    return new uPlot(options, seriesData(series), container);
  }

  function seriesData(series) {
    return [series.map((point) => point[0]), series.map((point) => point[1])];
  }

  function renderCounters(name, node, counters, rates) {
    const panelCharts = (charts[name] = charts[name] || {});
    const keys = Object.keys(counters);
    for (const child of Array.from(node.children)) {
      if (!keys.includes(child.dataset.counter)) {
        if (panelCharts[child.dataset.counter]) panelCharts[child.dataset.counter].destroy();
        delete panelCharts[child.dataset.counter];
        child.remove();
      }
    }
    for (const key of keys) {
      const counter = counters[key];
      const rate = rates[key] || { per_second: null, series: [] };
      let box = node.querySelector(`[data-counter="${CSS.escape(key)}"]`);
      if (!box) {
        box = el(
          "div",
          { class: "counter", "data-counter": key },
          el("div", { class: "label" }, counter.label),
          el("div", { class: "rate" }),
          el("div", { class: "total muted" }),
          el("div", { class: "spark" }),
        );
        node.append(box);
      }
      box.querySelector(".label").textContent = counter.label;
      box.querySelector(".rate").textContent = formatRate(rate.per_second);
      box.querySelector(".total").textContent = `total ${counter.value}`;
      box.querySelector(".total").dataset.value = String(counter.value);
      if (!panelCharts[key]) {
        panelCharts[key] = sparkline(box.querySelector(".spark"), rate.series);
      } else {
        panelCharts[key].setData(seriesData(rate.series));
      }
    }
  }

  function render(name) {
    const node = section(name);
    const panel = panels[name];
    if (!node || !panel) return;
    node.dataset.status = panel.status || "waiting";
    node.dataset.at = panel.at === null || panel.at === undefined ? "" : String(panel.at);
    const badge = node.querySelector("[data-badge]");
    badge.textContent = panel.status || "waiting";
    badge.title = panel.error || "";
    const sample = panel.sample;
    if (!sample) return;
    renderAttention(name, node.querySelector("[data-attention]"), sample.attention || []);
    renderCounters(name, node.querySelector("[data-counters]"), sample.counters || {}, panel.rates);
    renderNumbers(name, node.querySelector("[data-numbers]"), sample.numbers || []);
    renderTables(name, node.querySelector("[data-tables]"), sample.tables || []);
    refreshAges();
  }

  // --- state -----------------------------------------------------------------------------------

  function mergeRates(target, rates, newer) {
    for (const [key, rate] of Object.entries(rates || {})) {
      const series = target[key] ? target[key].series.slice() : [];
      for (const point of rate.series || []) {
        const index = series.findIndex((known) => known[0] >= point[0]);
        if (index === -1) series.push(point);
        else if (series[index][0] !== point[0]) series.splice(index, 0, point);
      }
      const newest = series.length ? series[series.length - 1][0] : 0;
      const kept = series.filter((point) => point[0] >= newest - config.window_seconds);
      const perSecond = newer || !target[key] ? rate.per_second : target[key].per_second;
      target[key] = { label: rate.label, per_second: perSecond, series: kept };
    }
  }

  function apply(name, data) {
    if (!section(name)) return;
    const panel = (panels[name] = panels[name] || { at: null, rates: {} });
    const newer = data.at !== null && data.at !== undefined && (panel.at === null || data.at >= panel.at);
    mergeRates(panel.rates, data.rates, newer);
    if (newer || panel.sample === undefined) {
      panel.sample = data.sample;
      panel.status = data.status;
      panel.error = data.error;
      panel.at = data.at;
      panel.ms = data.ms;
    }
    const counters = (panel.sample && panel.sample.counters) || {};
    for (const key of Object.keys(panel.rates)) {
      if (!(key in counters)) delete panel.rates[key];
    }
    render(name);
  }

  function refreshAges() {
    const staleAfter = 3 * config.sample_seconds + 2;
    for (const [name, panel] of Object.entries(panels)) {
      const node = section(name);
      if (!node || panel.at === null || panel.at === undefined) continue;
      const age = nowServer() - panel.at;
      node.querySelector("[data-at]").textContent = `updated ${formatAge(age)}`;
      const stale = age > staleAfter;
      node.classList.toggle("stale", stale);
      const badge = node.querySelector("[data-badge]");
      badge.textContent = stale ? "stale" : panel.status;
      if (stale) badge.title = "No sample for a while: is the publisher (beat / runall) running?";
    }
    document.getElementById("clock").textContent = new Date().toLocaleTimeString();
  }

  async function loadSnapshot() {
    const response = await fetch(config.snapshot_url, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    if (response.status === 401 || response.status === 403) {
      window.location.assign(config.login_url);
      return;
    }
    if (!response.ok) throw new Error(`snapshot: HTTP ${response.status}`);
    const body = await response.json();
    if (typeof body.now === "number") clockSkew = body.now - Date.now() / 1000;
    config.ws = body.ws;
    for (const panel of body.panels) apply(panel.name, panel);
  }

  // --- live stream -----------------------------------------------------------------------------

  function setConnection(state) {
    const node = document.getElementById("connection");
    node.dataset.state = state;
    node.textContent = state;
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    const path = (config.ws && config.ws.path) || "/ws/";
    const topics = config.panels.map((panel) => panel.topic);
    let pending = new Set(topics);
    socket = new WebSocket(scheme + window.location.host + path);
    setConnection("connecting");
    socket.addEventListener("open", () => {
      for (const frame of (config.ws && config.ws.hello) || []) socket.send(JSON.stringify(frame));
      for (const topic of topics) socket.send(JSON.stringify({ type: "subscribe", topic, ref: topic }));
    });
    socket.addEventListener("message", (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch (error) {
        return;
      }
      if (frame.type === "event" && typeof frame.topic === "string" && frame.topic.startsWith("console.")) {
        apply(frame.topic.slice("console.".length), frame.payload);
      } else if (frame.type === "subscribed" && pending !== null) {
        pending.delete(frame.topic);
        if (pending.size === 0) {
          pending = null;
          retryDelay = 1000;
          // Subscribed to everything: a snapshot now leaves no gap between it and the stream.
          loadSnapshot().then(
            () => setConnection("live"),
            () => setConnection("live"),
          );
        }
      }
    });
    socket.addEventListener("close", (event) => {
      if (event.code === 4401) {
        window.location.assign(config.login_url);
        return;
      }
      setConnection("reconnecting");
      window.setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 15000);
    });
  }

  window.quintetConsole = { panels, apply };
  loadSnapshot().catch(() => setConnection("offline"));
  connect();
  window.setInterval(refreshAges, 1000);
})();
