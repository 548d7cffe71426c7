// The Runestone dashboard: draws the ticks of /dashboard/feed (server-sent events, one a second).
// Every buffer here is bounded (POINTS per chart series, EVENTS rows, TRANSITIONS and FALLBACKS per
// provider and group, KINDS filter boxes), and a provider or tree node that disappears takes its state
// with it, so a page left open for hours holds the same few hundred kilobytes as after five minutes.
"use strict";
(() => {
  const POINTS = 300;       // chart points per series: five minutes at one tick a second
  const EVENTS = 300;       // event rows kept
  const TRANSITIONS = 8;    // breaker transitions listed per provider
  const FALLBACKS = 8;      // fallbacks listed per failover group
  const KINDS = 40;         // event kinds offered as filters
  const STALE_MS = 5000;    // no tick for this long: the feed is shown stalled

  class Ring {
    constructor(n) { this.a = new Float64Array(n); this.n = n; this.len = 0; this.head = 0; }
    push(v) {
      this.a[this.head] = (v === null || v === undefined) ? NaN : v;
      this.head = (this.head + 1) % this.n;
      if (this.len < this.n) this.len++;
    }
    at(i) { return this.a[(this.head - this.len + i + this.n) % this.n]; }
    last() { return this.len ? this.at(this.len - 1) : NaN; }
  }

  const $ = (id) => document.getElementById(id);
  const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const ms = (s) => (s === null || s === undefined || Number.isNaN(s)) ? "–" : (s * 1000 >= 100 ? (s * 1000).toFixed(0) : (s * 1000).toFixed(1)) + " ms";
  const pct = (x) => (x === null || x === undefined || Number.isNaN(x)) ? "–" : (x * 100).toFixed(x < 0.1 ? 1 : 0) + "%";
  const short = (id) => { const s = String(id ?? ""); return s.length > 16 ? s.slice(0, 15) + "…" : s; };
  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  const BREAKER_CODE = { closed: 0, half_open: 1, open: 2 };
  const BREAKER_COLOR = ["#3fb950", "#d29922", "#f85149"];

  const state = {
    ticks: 0,
    lastTickAt: 0,
    providers: new Map(),   // name -> {card, series, breaker, transitions}
    groups: new Map(),      // group -> recent fallbacks
    restarts: new Map(),    // tree node id -> restarts seen
    flashUntil: new Map(),  // tree node id -> time its restart flash ends
    events: [],             // the rows' data, newest last
    kinds: new Map(),       // kind -> checkbox
    last: null,             // the last tick
    renderPending: false,
  };

  // -- feed ----------------------------------------------------------------------------------------

  function connect() {
    const conn = $("conn");
    const source = new EventSource("/dashboard/feed");
    source.onopen = () => { conn.dataset.state = "live"; conn.textContent = "live"; };
    source.onerror = () => { conn.dataset.state = "offline"; conn.textContent = "reconnecting"; };
    source.onmessage = (e) => {
      try { handle(JSON.parse(e.data)); } catch (err) { console.error("dashboard: bad tick", err); }
    };
    setInterval(() => {
      if (state.lastTickAt && Date.now() - state.lastTickAt > STALE_MS && conn.dataset.state === "live") {
        conn.dataset.state = "connecting"; conn.textContent = "stalled";
      }
    }, 1000);
  }

  function handle(msg) {
    if (!msg || msg.type !== "tick") return;
    state.ticks++;
    state.lastTickAt = Date.now();
    const conn = $("conn");
    if (conn.textContent === "stalled") { conn.dataset.state = "live"; conn.textContent = "live"; }
    const tick = msg.tick || 1;
    const seen = new Set();
    for (const p of msg.providers || []) {
      seen.add(p.name);
      let s = state.providers.get(p.name);
      if (!s) {
        s = { card: null, transitions: [], breaker: new Ring(POINTS),
              series: { rps: new Ring(POINTS), err: new Ring(POINTS), p50: new Ring(POINTS), p95: new Ring(POINTS),
                        t50: new Ring(POINTS), t95: new Ring(POINTS) } };
        state.providers.set(p.name, s);
      }
      const w = (msg.window || {})[p.name] || { attempts: 0, errors: 0 };
      s.series.rps.push(w.attempts / tick);
      s.series.err.push(w.attempts ? w.errors / w.attempts : null);
      s.series.p50.push(w.p50); s.series.p95.push(w.p95);
      s.series.t50.push(w.ttft_p50); s.series.t95.push(w.ttft_p95);
      s.breaker.push(BREAKER_CODE[p.breaker] ?? 0);
      s.window = w;
    }
    for (const [name, s] of state.providers) {
      if (!seen.has(name)) { if (s.card) s.card.remove(); state.providers.delete(name); }
    }
    for (const ev of msg.events || []) addEvent(ev, msg.time);
    state.last = msg;
    scheduleRender();
  }

  // -- events --------------------------------------------------------------------------------------

  function describe(ev) {
    switch (ev.kind) {
      case "breaker_transition":
        return [ev.to_state === "open" ? "bad" : ev.to_state === "closed" ? "ok" : "warn",
                `${ev.provider}: ${ev.from_state} → ${ev.to_state}${ev.reason ? " (" + ev.reason + ")" : ""}`];
      case "failover":
        return ["warn", `${ev.group || "routing"}: ${ev.from_provider ?? "–"} → ${ev.to_provider ?? "nothing left"} after ${ev.attempts} attempt(s)`];
      case "fallback_success":
        return ["ok", `${ev.group}: served by ${ev.to_provider} after ${ev.attempts} attempt(s)`];
      case "fallback_exhausted":
        return ["bad", `${ev.group}: every provider failed (${ev.attempts} attempt(s))`];
      case "retry_scheduled":
        return ["info", `${ev.provider}: attempt ${ev.attempt} in ${Number(ev.delay).toFixed(2)} s (${ev.reason})`];
      case "provider_unhealthy": case "provider_failed":
        return ["bad", `${ev.provider}: health ${Number(ev.score).toFixed(2)}`];
      case "provider_recovered":
        return ["ok", `${ev.provider}: health ${Number(ev.score).toFixed(2)}`];
      case "actor_restarted":
        return ["bad", `${ev.name} restarted (restart ${ev.restarts})`];
      case "provider_registered": case "provider_unregistered":
        return ["info", ev.name];
      case "request_failed":
        return ["bad", `${ev.request_id} ${ev.model} via ${ev.provider || "–"}: ${ev.http_status} ${ev.error_type || ""}`];
      default: {
        const rest = Object.assign({}, ev); delete rest.kind;
        return [/exceeded|failed|exhausted|unhealthy/.test(ev.kind) ? "bad" : "info", JSON.stringify(rest)];
      }
    }
  }

  function addEvent(ev, time) {
    const kind = String(ev.kind || "event");
    if (kind === "breaker_transition") {
      const s = state.providers.get(ev.provider);
      if (s) { s.transitions.push({ time, from: ev.from_state, to: ev.to_state }); if (s.transitions.length > TRANSITIONS) s.transitions.shift(); }
    } else if (kind === "failover" || kind === "fallback_success" || kind === "fallback_exhausted") {
      const key = ev.group || "routing";
      let list = state.groups.get(key);
      if (!list) {
        if (state.groups.size >= 100) state.groups.delete(state.groups.keys().next().value);
        list = []; state.groups.set(key, list);
      }
      list.push({ time, kind, from: ev.from_provider, to: ev.to_provider, attempts: ev.attempts });
      if (list.length > FALLBACKS) list.shift();
    }
    ensureKind(kind);
    const [level, text] = describe(ev);
    const row = document.createElement("div");
    row.className = "ev";
    row.dataset.kind = kind;
    row.dataset.level = level;
    row.innerHTML = `<span class="t">${esc(clock(time))}</span><span class="k">${esc(kind)}</span><span class="d">${esc(text)}</span>`;
    applyFilter(row);
    const list = $("events");
    list.insertBefore(row, list.firstChild);
    state.events.push(kind);
    while (state.events.length > EVENTS) { state.events.shift(); list.lastChild.remove(); }
  }

  function ensureKind(kind) {
    if (state.kinds.has(kind) || state.kinds.size >= KINDS) return;
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox"; box.checked = true; box.dataset.kind = kind;
    box.addEventListener("change", refilter);
    label.append(box, " " + kind);
    $("filter-kinds").append(label);
    state.kinds.set(kind, box);
  }

  function applyFilter(row) {
    const box = state.kinds.get(row.dataset.kind);
    const text = $("filter-text").value.trim().toLowerCase();
    const shown = (!box || box.checked) && (!text || row.textContent.toLowerCase().includes(text));
    row.classList.toggle("hidden", !shown);
  }

  function refilter() { for (const row of $("events").children) applyFilter(row); }

  // -- rendering -----------------------------------------------------------------------------------

  function scheduleRender() {
    if (state.renderPending) return;
    state.renderPending = true;
    requestAnimationFrame(() => { state.renderPending = false; render(); });
  }

  function render() {
    const msg = state.last;
    if (!msg) return;
    renderTotals(msg);
    renderTree(msg.tree);
    renderProviders(msg);
    renderGroups(msg.groups || []);
    renderSplits(msg.splits || []);
    renderInFlight(msg.in_flight || { count: 0, oldest: [] });
    renderKeys(msg.keys || [], (msg.spend || {}).keys || []);
    renderTeams((msg.spend || {}).teams || []);
  }

  function renderTotals(msg) {
    const tick = msg.tick || 1;
    const req = msg.requests || { finished: 0, errors: 0 };
    const providers = msg.providers || [];
    const open = providers.filter((p) => p.breaker !== "closed").length;
    const scores = providers.map((p) => p.health).filter((h) => h !== null && h !== undefined);
    const health = scores.length ? Math.min(...scores) : null;
    $("totals").innerHTML =
      `<span><b>${(req.finished / tick).toFixed(1)}</b> req/s</span>` +
      `<span><b>${pct(req.finished ? req.errors / req.finished : 0)}</b> errors</span>` +
      `<span><b>${msg.in_flight ? msg.in_flight.count : 0}</b> in flight</span>` +
      `<span><b>${providers.length}</b> providers, <b>${open}</b> breaker(s) not closed</span>` +
      `<span>lowest health <b>${health === null ? "–" : health.toFixed(2)}</b></span>` +
      (msg.telemetry && msg.telemetry.dropped ? `<span><b>${msg.telemetry.dropped}</b> events dropped</span>` : "") +
      (msg.events_skipped ? `<span><b>${msg.events_skipped}</b> events not shown</span>` : "");
    document.querySelectorAll(".span-label").forEach((el) => { el.textContent = `${Math.round(POINTS * tick / 60)} min`; });
  }

  function renderTree(tree) {
    const now = Date.now();
    const ids = new Set();
    const node = (n) => {
      const id = n.id || n.name;
      ids.add(id);
      const before = state.restarts.get(id);
      if (before !== undefined && n.restarts > before) state.flashUntil.set(id, now + 4000);
      state.restarts.set(id, n.restarts);
      const flash = (state.flashUntil.get(id) || 0) > now;
      const kind = n.kind === "supervisor" ? "S" : n.kind === "actor" ? "A" : "T";
      const mailbox = n.mailbox ? `<span class="meta" title="mailbox depth / capacity">✉ ${n.mailbox[0]}${n.mailbox[1] ? "/" + n.mailbox[1] : ""}</span>` : "";
      const strategy = n.strategy ? `<span class="meta">${esc(n.strategy)}</span>` : "";
      const err = n.last_error ? `<span class="err" title="${esc(n.last_error)}">${esc(n.last_error)}</span>` : "";
      const children = (n.children && n.children.length) ? `<ul>${n.children.map(node).join("")}</ul>` : "";
      return `<li><div class="node${flash ? " flash" : ""}" data-node="${esc(id)}" data-status="${esc(n.status)}" data-restarts="${n.restarts}">` +
        `<span class="kind" title="${esc(n.kind)}">${kind}</span><span class="name">${esc(n.name)}</span>` +
        `<span class="pill" data-state="${esc(n.status)}">${esc(n.status)}</span>` +
        `<span class="meta" title="restarts">↻ ${n.restarts}</span>${mailbox}${strategy}${err}</div>${children}</li>`;
    };
    $("tree").innerHTML = tree ? node(tree) : `<li class="empty">the tree is not running</li>`;
    for (const id of [...state.restarts.keys()]) if (!ids.has(id)) { state.restarts.delete(id); state.flashUntil.delete(id); }
  }

  const CHARTS = [
    ["req/s", ["rps"], ["#58a6ff"], (v) => v.toFixed(1)],
    ["errors", ["err"], ["#f85149"], (v) => pct(v), 1],
    ["latency p50/p95", ["p50", "p95"], ["#3fb950", "#d29922"], (v) => ms(v)],
    ["TTFT p50/p95", ["t50", "t95"], ["#bc8cff", "#d29922"], (v) => ms(v)],
  ];

  function makeCard(name) {
    const card = document.createElement("div");
    card.className = "provider";
    card.dataset.provider = name;
    card.innerHTML = `<div class="head"></div><div class="nums"></div><div class="charts">` +
      CHARTS.map(([label]) => `<div class="chart"><canvas width="280" height="34"></canvas><span class="label">${esc(label)}</span><span class="value"></span></div>`).join("") +
      `</div><canvas class="strip" width="300" height="8" title="breaker state, one column per tick"></canvas><div class="transitions"></div>`;
    return card;
  }

  function renderProviders(msg) {
    const box = $("providers");
    if (!(msg.providers || []).length) { box.innerHTML = `<div class="empty">no provider registered</div>`; return; }
    box.querySelector(".empty")?.remove();
    for (const p of msg.providers) {
      const s = state.providers.get(p.name);
      if (!s) continue;
      if (!s.card) { s.card = makeCard(p.name); box.append(s.card); }
      const card = s.card;
      card.dataset.breaker = p.breaker;
      card.querySelector(".head").innerHTML =
        `<span class="name">${esc(p.name)}</span><span class="meta">${esc(p.type || "")}</span>` +
        `<span class="pill" data-state="${esc(p.breaker)}" title="circuit breaker">breaker ${esc(p.breaker)}</span>` +
        (p.health_status ? `<span class="pill" data-state="${esc(p.health_status)}">${esc(p.health_status)}</span>` : "") +
        (p.status !== "running" ? `<span class="pill" data-state="${esc(p.status)}">${esc(p.status)}</span>` : "");
      card.querySelector(".nums").innerHTML =
        `health <b>${p.health === null ? "–" : p.health.toFixed(2)}</b> · in flight <b>${p.in_flight}</b> · ` +
        `success <b>${pct(p.success_rate)}</b> · p50 <b>${ms(p.p50)}</b> p95 <b>${ms(p.p95)}</b> · ` +
        `attempts <b>${p.requests}</b> (${p.errors} failed)` + (p.consecutive_failures ? ` · <b>${p.consecutive_failures}</b> failures in a row` : "");
      const canvases = card.querySelectorAll(".chart canvas");
      const values = card.querySelectorAll(".chart .value");
      CHARTS.forEach(([, keys, colors, fmt, fixedMax], i) => {
        const rings = keys.map((k) => s.series[k]);
        spark(canvases[i], rings, colors, fixedMax);
        const v = rings[rings.length - 1].last();
        values[i].textContent = Number.isNaN(v) ? "–" : fmt(v);
      });
      strip(card.querySelector("canvas.strip"), s.breaker);
      card.querySelector(".transitions").textContent = s.transitions.length
        ? "breaker: " + s.transitions.slice(-4).map((t) => `${clock(t.time)} ${t.from}→${t.to}`).join(", ") : "";
    }
  }

  function spark(canvas, rings, colors, fixedMax) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height;
    ctx.clearRect(0, 0, w, h);
    let max = fixedMax || 0;
    if (!fixedMax) for (const r of rings) for (let i = 0; i < r.len; i++) { const v = r.at(i); if (v > max) max = v; }
    if (!(max > 0)) max = 1;
    rings.forEach((r, j) => {
      ctx.strokeStyle = colors[j]; ctx.lineWidth = 1.2; ctx.beginPath();
      let pen = false;
      for (let i = 0; i < r.len; i++) {
        const v = r.at(i);
        if (Number.isNaN(v)) { pen = false; continue; }
        const x = w - (r.len - i) * (w / POINTS), y = h - 2 - (v / max) * (h - 14);
        if (pen) ctx.lineTo(x, y); else { ctx.moveTo(x, y); pen = true; }
      }
      ctx.stroke();
    });
  }

  function strip(canvas, ring) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, step = w / POINTS;
    ctx.fillStyle = "#11161c"; ctx.fillRect(0, 0, w, h);
    for (let i = 0; i < ring.len; i++) {
      ctx.fillStyle = BREAKER_COLOR[ring.at(i)] || BREAKER_COLOR[0];
      ctx.fillRect(w - (ring.len - i) * step, 0, Math.ceil(step), h);
    }
  }

  function renderGroups(groups) {
    if (!groups.length) { $("groups").innerHTML = `<div class="empty">no failover group</div>`; return; }
    $("groups").innerHTML = `<table><tr><th>group</th><th>strategy</th><th>providers</th><th class="num">requests</th><th class="num">fallbacks</th><th class="num">exhausted</th></tr>` +
      groups.map((g) => {
        const st = g.stats || {};
        const recent = (state.groups.get(g.name) || []).slice().reverse()
          .map((f) => `${clock(f.time)} ${f.kind === "failover" ? `${f.from ?? "–"} → ${f.to ?? "–"}` : f.kind.replace("fallback_", "") + (f.to ? " " + f.to : "")}`).join("<br>");
        return `<tr data-group="${esc(g.name)}"><td>${esc(g.name)}</td><td>${esc(g.strategy)}</td><td>${esc((g.providers || []).join(", ") || "all")}</td>` +
          `<td class="num">${st.requests ?? 0}</td><td class="num">${st.fallbacks ?? 0}</td><td class="num">${st.exhausted ?? 0}</td></tr>` +
          (recent ? `<tr><td colspan="6" class="fallbacks">${recent}</td></tr>` : "");
      }).join("") + `</table>`;
    // Recent fallbacks of routing without a group have no row of their own above.
    const loose = state.groups.get("routing");
    if (loose && loose.length) {
      $("groups").insertAdjacentHTML("beforeend", `<div class="fallbacks">routing failovers: ` +
        loose.slice(-4).reverse().map((f) => `${clock(f.time)} ${esc(f.from ?? "–")} → ${esc(f.to ?? "–")}`).join(", ") + `</div>`);
    }
  }

  function renderSplits(splits) {
    if (!splits.length) { $("splits").innerHTML = `<div class="empty">no split configured</div>`; return; }
    $("splits").innerHTML = splits.map((s) => `<table data-split="${esc(s.id)}"><tr><th>${esc(s.id)}</th><th>model</th><th class="num">weight</th><th class="num">requests</th><th class="num">errors</th><th class="num">p50</th><th class="num">p95</th><th class="num">tokens out</th><th class="num">cost</th></tr>` +
      s.variants.map((v) => {
        const m = v.metrics || {};
        return `<tr><td>${esc(v.name)}</td><td>${esc(v.model)}</td><td class="num">${esc(v.weight)}</td><td class="num">${m.requests ?? 0}</td>` +
          `<td class="num">${pct(m.error_rate)}</td><td class="num">${m.latency_p50_ms == null ? "–" : m.latency_p50_ms.toFixed(0) + " ms"}</td>` +
          `<td class="num">${m.latency_p95_ms == null ? "–" : m.latency_p95_ms.toFixed(0) + " ms"}</td><td class="num">${m.tokens_out ?? 0}</td>` +
          `<td class="num">${m.cost == null ? "–" : "$" + Number(m.cost).toFixed(4)}</td></tr>`;
      }).join("") + `</table>`).join("");
  }

  function renderInFlight(inflight) {
    $("inflight-count").textContent = inflight.count ? `(${inflight.count})` : "";
    if (!inflight.oldest.length) { $("inflight").innerHTML = `<div class="empty">none</div>`; return; }
    $("inflight").innerHTML = `<table><tr><th>request</th><th>model</th><th>provider</th><th class="num">attempts</th><th class="num">age</th></tr>` +
      inflight.oldest.map((r) => `<tr><td class="id" title="${esc(r.request_id)}">${esc(short(r.request_id))}${r.stream ? " ⇶" : ""}</td><td>${esc(r.model)}</td><td>${esc(r.provider || "–")}</td>` +
        `<td class="num">${r.attempts}</td><td class="num">${r.age.toFixed(1)} s</td></tr>`).join("") + `</table>`;
  }

  const money = (usd) => `$${Number(usd).toFixed(4)}`;
  const ofBudget = (row) => row.budget_usd == null ? "" : ` <small>of ${money(row.budget_usd)}</small>`;

  // Managed keys by spend in their budget period when there are any; else what this page saw per key.
  function renderKeys(seen, managed) {
    $("keys-note").textContent = managed.length ? "by spend, this budget period" : "by spend, since this page opened";
    if (managed.length) {
      $("keys").innerHTML = `<table><tr><th>key</th><th>team</th><th class="num">requests</th><th class="num">spend</th></tr>` +
        managed.map((k) => `<tr data-key="${esc(k.name)}" data-spend="${k.spent_usd}"><td class="id" title="${esc(k.name)}">${esc(k.key_name || k.name)}</td>` +
          `<td>${esc(k.team ?? "–")}</td><td class="num">${k.requests}</td><td class="num">${money(k.spent_usd)}${ofBudget(k)}</td></tr>`).join("") + `</table>`;
      return;
    }
    if (!seen.length) { $("keys").innerHTML = `<div class="empty">no request yet</div>`; return; }
    $("keys").innerHTML = `<table><tr><th>key</th><th>team</th><th class="num">requests</th><th class="num">spend</th></tr>` +
      seen.map((k) => `<tr data-key="${esc(k.key_id)}"><td class="id">${esc(k.key_id)}</td><td>${esc(k.team ?? "–")}</td><td class="num">${k.requests}</td><td class="num">${money(k.spend)}</td></tr>`).join("") + `</table>`;
  }

  function renderTeams(teams) {
    if (!teams.length) { $("teams").innerHTML = `<div class="empty">no team has spent yet</div>`; return; }
    $("teams").innerHTML = `<table><tr><th>team</th><th class="num">requests</th><th class="num">spend</th></tr>` +
      teams.map((t) => `<tr data-team="${esc(t.name)}" data-spend="${t.spent_usd}"><td>${esc(t.name)}</td><td class="num">${t.requests}</td>` +
        `<td class="num">${money(t.spent_usd)}${ofBudget(t)}</td></tr>`).join("") + `</table>`;
  }

  // -- start ---------------------------------------------------------------------------------------

  $("filter-text").addEventListener("input", refilter);
  // For tests and the curious: feed the page by hand, and see how much it holds.
  window.runestoneDashboard = {
    handle,
    render,
    stats: () => ({
      ticks: state.ticks,
      events: state.events.length,
      rows: $("events").children.length,
      providers: state.providers.size,
      cards: $("providers").querySelectorAll(".provider").length,
      points: Math.max(0, ...[...state.providers.values()].map((s) => s.series.rps.len)),
      transitions: Math.max(0, ...[...state.providers.values()].map((s) => s.transitions.length)),
      fallbacks: Math.max(0, ...[...state.groups.values()].map((l) => l.length)),
      groups: state.groups.size,
      kinds: state.kinds.size,
      treeNodes: state.restarts.size,
    }),
  };
  connect();
})();
