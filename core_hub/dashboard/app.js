// Outpost fleet dashboard: plain JavaScript over the public API, no build step, no CDN.
//
// Everything comes from the API with the visitor's token (Authorization: Bearer; the event
// stream is read with fetch so that it sends the header too). What changes fast arrives on
// /v1/events (SSE) and triggers an early refresh of what it touches; agent liveness
// (heartbeats, not events) is polled.
// Sized for 1,000 agents and 10,000 tasks: the task table holds one page (limit + next_cursor),
// a site shows at most AGENTS_PER_SITE cards until asked for all, and the per-site counts come
// from a background scan whose pace follows how long the scan takes.

const TOKEN_KEY = "outpost-token";
const PAGE_SIZE = 50;
const ARTIFACT_PAGE = 20; // each row asks for its holders too (GET /v1/artifacts/{digest})
const DIGEST_RE = /^sha256:[0-9a-f]{64}$/;
const AGENTS_PER_SITE = 48;
const SITES_OPEN_UP_TO = 120; // agents; bigger fleets start with healthy sites folded
const CAPACITY_SAMPLES = 120; // per site: two minutes at the agents poll's quickest pace
const FEED_MAX = 200;
const LOG_MAX_CHARS = 200_000;
const LOG_TAIL = 200;
const TASK_STATES = ["pending", "staging", "starting", "running", "finished", "failed", "killed",
  "lost", "unknown"];
const TERMINAL = new Set(["finished", "failed", "killed", "lost"]);
const STATUS_ORDER = { unreachable: 0, disconnected: 1, draining: 2, online: 3, revoked: 4 };
const EVENT_KINDS = ["task", "offer", "agent", "snapshot", "result"];
const BACKLOG_AFTER_S = 5;
const NAME_RE = /^[a-z0-9][a-z0-9_.-]{0,62}$/;

// ---------------------------------------------------------------- small helpers

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

/** A DOM element; text children only (never HTML), so API data cannot inject markup. */
function h(tag, props = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}

function setText(el, text) {
  const s = String(text ?? "");
  if (el.textContent !== s) el.textContent = s;
}

const short = id => (id ? String(id).slice(0, 8) : "—");
const enc = encodeURIComponent;
const clamp = (x, lo, hi) => Math.max(lo, Math.min(hi, x));

function num(x, digits = 2) {
  if (x === null || x === undefined || Number.isNaN(Number(x))) return "—";
  return String(Number(Number(x).toFixed(digits)));
}

function bytes(n) {
  if (n === null || n === undefined || Number.isNaN(Number(n))) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let x = Number(n);
  let i = 0;
  while (x >= 1024 && i < units.length - 1) {
    x /= 1024;
    i++;
  }
  return `${i ? num(x, x >= 100 ? 0 : 1) : x} ${units[i]}`;
}

function mem(mb) {
  if (mb === null || mb === undefined) return "—";
  return mb >= 10240 ? `${num(mb / 1024, 1)} GB` : `${num(mb, 0)} MB`;
}

function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 2) return "just now";
  if (s < 90) return `${Math.round(s)}s ago`;
  if (s < 5400) return `${Math.round(s / 60)}m ago`;
  if (s < 172800) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86400)}d ago`;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 90) return `${Math.round(seconds)}s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)}m`;
  return `${Math.round(seconds / 3600)}h`;
}

function when(ts) {
  if (!ts) return "—";
  const d = new Date(ts * 1000);
  const p = n => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
    `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

function clock(date = new Date()) {
  const p = n => String(n).padStart(2, "0");
  return `${p(date.getHours())}:${p(date.getMinutes())}:${p(date.getSeconds())}`;
}

/** argv from a command line: whitespace splits; '...' and "..." quote; backslash escapes. */
function splitArgs(line) {
  const out = [];
  let cur = null;
  let quote = null;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quote) {
      if (c === quote) quote = null;
      else if (c === "\\" && quote === '"' && i + 1 < line.length) cur += line[++i];
      else cur += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      cur = cur ?? "";
    } else if (c === "\\" && i + 1 < line.length) {
      cur = (cur ?? "") + line[++i];
    } else if (/\s/.test(c)) {
      if (cur !== null) out.push(cur);
      cur = null;
    } else {
      cur = (cur ?? "") + c;
    }
  }
  if (quote) throw new Error("the command has an unclosed quote");
  if (cur !== null) out.push(cur);
  return out;
}

/** A command line back from argv, quoted so that splitArgs would read the same argv. */
function joinArgs(argv) {
  return (argv || []).map(a => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'"'"'`)}'`))
    .join(" ");
}

// ---------------------------------------------------------------- state

const S = {
  token: "",
  role: "operator",
  info: null,
  agents: new Map(), // id -> agent
  offers: new Map(), // agent id -> its latest unexpired offer (what it has free now)
  sites: [],
  cards: new Map(), // agent id -> card
  siteEls: new Map(), // site -> section parts
  siteOpen: new Map(), // site -> bool, once the user opened or folded it
  siteAll: new Set(), // sites showing every agent
  capacity: new Map(), // site -> [{t, cpu, mem}] fractions in use, one per agents poll
  counts: null, // {bySite: Map(site -> {state: n}), total: {state: n}, n, at, took}
  filter: { site: "", agent: "", state: "", name: "" },
  pages: { cursors: [null], idx: 0, items: [], next: null, gen: 0, sig: "" },
  services: [],
  artifacts: { cursors: [null], idx: 0, items: [], next: null, gen: 0, sig: "", name: "", note: "" },
  view: null, // {id, task, gen}
  log: null, // {ctl, retry}
  es: null,
  lastEventId: null,
  feedDropped: false,
  feed: [],
  pollers: [],
  started: false,
};

const canOperate = () => S.role === "operator" || S.role === "admin";

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || {};
  }
}

async function errorOf(resp) {
  let err = {};
  try {
    err = (await resp.json()).error || {};
  } catch {
    // not a JSON error body (a proxy's page): keep the status line
  }
  return new ApiError(resp.status, err.code || "http_error",
    err.message || `${resp.status} ${resp.statusText}`, err.details);
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${S.token}` };
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    hubReachable(false);
    throw e;
  }
  hubReachable(true);
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (resp.status === 401) logout(`Signed out: ${err.message}`);
    throw err;
  }
  return resp.json();
}

function hubReachable(ok) {
  const banner = $("#banner");
  if (ok) banner.hidden = true;
  else {
    setText(banner, "Cannot reach the hub right now; retrying. What you see may be out of date.");
    banner.hidden = false;
  }
}

/**
 * Runs `fn` again and again, `factor` times as long after it as it took (within min..max ms),
 * so a big fleet is polled less often than a small one. `soon(ms)` asks for an earlier run
 * (events do), yet not sooner than `gap` ms (or twice the last run's time) after the last run
 * ended, so a busy feed cannot turn polling into a loop; `now()` is for a person's click.
 */
class Poller {
  constructor(name, fn, { min, max, factor, gap }) {
    Object.assign(this, { name, fn, min, max, factor, gap });
    this.timer = null;
    this.due = Infinity;
    this.running = false;
    this.again = null; // "now" or "soon": asked for while running
    this.stopped = true;
    this.ended = 0;
    this.took = 0;
  }

  start() {
    this.stopped = false;
    this.now();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.due = Infinity;
  }

  now() {
    this.schedule(Date.now(), "now");
  }

  soon(ms = 0) {
    this.schedule(Math.max(Date.now() + ms, this.ended + Math.max(this.gap, 2 * this.took)), "soon");
  }

  schedule(due, why = "") {
    if (this.stopped) return;
    if (this.running) {
      if (why && this.again !== "now") this.again = why;
      return;
    }
    if (due >= this.due) return;
    clearTimeout(this.timer);
    this.due = due;
    this.timer = setTimeout(() => this.run(), Math.max(0, due - Date.now()));
  }

  async run() {
    this.due = Infinity;
    if (this.stopped) return;
    this.running = true;
    const t0 = performance.now();
    try {
      await this.fn();
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 401) console.warn(`${this.name}: ${e.message}`);
    } finally {
      this.running = false;
    }
    if (this.stopped) return;
    this.took = performance.now() - t0;
    this.ended = Date.now();
    const again = this.again;
    this.again = null;
    if (again === "now") this.now();
    else if (again === "soon") this.soon(0);
    else this.schedule(this.ended + clamp(this.took * this.factor, this.min, this.max));
  }
}

// ---------------------------------------------------------------- toast-like results

function showResult(ok, ...parts) {
  const box = $("#form-result");
  box.replaceChildren(...parts);
  box.className = ok ? "form-result" : "form-result error";
  box.hidden = false;
}

function flash(ok, message) {
  let box = $("#flash");
  if (!box) {
    box = h("div", { id: "flash", role: "status" });
    document.body.append(box);
  }
  box.className = ok ? "flash" : "flash error";
  setText(box, message);
  box.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { box.hidden = true; }, ok ? 4000 : 8000);
}

/** A button that asks once more before it acts (no modal dialogs). */
function confirmButton(label, confirmLabel, action, extraClass = "") {
  const b = h("button", { type: "button", class: `danger small action ${extraClass}` }, label);
  let armed = null;
  b.addEventListener("click", async ev => {
    ev.stopPropagation();
    if (!armed) {
      b.classList.add("confirm");
      setText(b, confirmLabel);
      armed = setTimeout(() => {
        armed = null;
        b.classList.remove("confirm");
        setText(b, label);
      }, 4000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    b.disabled = true;
    b.classList.remove("confirm");
    setText(b, "…");
    try {
      await action();
    } catch (e) {
      flash(false, e.message);
    } finally {
      b.disabled = false;
      setText(b, label);
    }
  });
  return b;
}

// ---------------------------------------------------------------- fleet

const agentName = id => S.agents.get(id)?.name || short(id);

function siteOfTask(t) {
  return S.agents.get(t.agent_id)?.site || t.site || "unplaced";
}

async function loadAgents() {
  const items = [];
  let cursor = null;
  do {
    const page = await api("GET", `/v1/agents?limit=1000${cursor ? `&cursor=${enc(cursor)}` : ""}`);
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor);
  const offers = await api("GET", "/v1/offers");
  S.offers = new Map((offers.items || []).map(o => [o.agent_id, o]));
  S.agents = new Map(items.map(a => [a.id, a]));
  S.sites = [...new Set(items.map(a => a.site))].sort();
  sampleCapacity();
  renderFleet();
  renderSummary();
  renderFilterOptions();
}

function usageBar(label) {
  const fill = h("span");
  const bar = h("div", { class: "bar" }, fill);
  const val = h("span", { class: "val" });
  return { el: h("div", { class: "bar-row" }, h("span", { class: "lbl" }, label), bar, val), bar, fill, val };
}

function setBar(b, used, total, fmt) {
  const frac = total > 0 ? clamp((used || 0) / total, 0, 1) : 0;
  b.fill.style.width = `${(frac * 100).toFixed(1)}%`;
  b.bar.classList.toggle("high", frac >= 0.75 && frac < 0.95);
  b.bar.classList.toggle("full", frac >= 0.95);
  setText(b.val, `${fmt(used || 0)} / ${fmt(total || 0)}`);
}

function makeCard(agent) {
  const c = {
    dot: h("span", { class: "dot" }),
    name: h("span", { class: "agent-name" }),
    status: h("span", { class: "status" }),
    id: h("span", { class: "mono" }),
    seen: h("span", { class: "seen" }),
    version: h("span"),
    isolation: h("span"),
    cpu: usageBar("cpu"),
    mem: usageBar("mem"),
    outbox: h("span", { class: "outbox" }),
    labels: h("div", { class: "labels" }),
    foot: null,
    drain: null,
    revoke: null,
    agent,
  };
  c.foot = h("div", { class: "agent-foot" }, c.outbox);
  c.el = h("article", { class: "agent", dataset: { agentId: agent.id } },
    h("div", { class: "agent-top" }, h("span", { class: "agent-title" }, c.dot, c.name), c.status),
    h("div", { class: "agent-meta" }, c.id, c.seen, c.version, c.isolation),
    h("div", { class: "bars" }, c.cpu.el, c.mem.el),
    c.labels,
    c.foot);
  S.cards.set(agent.id, c);
  return c;
}

function updateCard(c, a) {
  c.agent = a;
  const st = a.status || "unknown";
  c.el.className = `agent is-${st}`;
  c.el.dataset.status = st;
  c.dot.className = `dot st-${st}`;
  setText(c.name, a.name);
  c.name.title = a.name;
  c.status.className = `status st-${st}`;
  setText(c.status, st);
  setText(c.id, short(a.id));
  c.id.title = a.id;
  setText(c.seen, `seen ${ago(a.last_seen)}`);
  c.seen.title = when(a.last_seen);
  setText(c.version, a.version ? `v${a.version}` : "v?");
  setText(c.isolation, a.isolation || "");
  const res = a.resources || {};
  setBar(c.cpu, usedOf(a, "cpus"), res.cpus, x => num(x, 2));
  setBar(c.mem, usedOf(a, "mem_mb"), res.mem_mb, mem);
  const ob = a.outbox || {};
  const depth = ob.depth ?? 0;
  const oldest = ob.oldest_age_s;
  if (ob.gap) {  // acked by JetStream at the edge, never applied at the core (core_hub/liveness.py)
    setText(c.outbox, `sync gap · acked ${ob.gap.acked_seq}, core has ${ob.gap.applied_seq}`);
    c.outbox.className = "outbox gap";
    c.outbox.title = `events the edge was told were stored never reached the core (since ${when(ob.gap.since)})`;
  } else {
    const queued = depth > 0 ? `outbox ${depth} queued · oldest ${age(oldest)}` : "outbox empty";
    // Only a live link is "in sync"; for an agent away, say what it last reported, and when.
    const live = st === "online" || st === "draining";
    setText(c.outbox, live ? (depth > 0 ? queued : "outbox empty · in sync")
      : `last heard ${ago(a.last_seen)}: ${queued} then`);
    c.outbox.className = `outbox${backlog(a) ? " backlog" : ""}${backlog(a) && oldest > 60 ? " stale" : ""}`;
    c.outbox.title = "events waiting at the edge to reach the core";
  }
  const labelSig = JSON.stringify(a.labels || {});
  if (c.labels.dataset.sig !== labelSig) {
    c.labels.dataset.sig = labelSig;
    c.labels.replaceChildren(...Object.entries(a.labels || {}).map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`)));
  }
  const wantDrain = canOperate() && st !== "draining" && st !== "revoked";
  if (wantDrain && !c.drain) {
    c.drain = confirmButton("Drain", "Confirm drain", () => drainAgent(c.agent), "drain");
    c.foot.append(c.drain);
  } else if (!wantDrain && c.drain) {
    c.drain.remove();
    c.drain = null;
  }
  // Revoking is for good (the agent's key is distrusted): admins only, confirmed like a drain.
  const wantRevoke = S.role === "admin" && st !== "revoked";
  if (wantRevoke && !c.revoke) {
    c.revoke = confirmButton("Revoke", "Confirm revoke (for good)", () => revokeAgent(c.agent), "revoke");
    c.foot.append(c.revoke);
  } else if (!wantRevoke && c.revoke) {
    c.revoke.remove();
    c.revoke = null;
  }
}

async function revokeAgent(agent) {
  await api("POST", `/v1/agents/${enc(agent.id)}/revoke`);
  flash(true, `Revoked ${agent.name}: its events are rejected and nothing is placed on it.`);
  pollers.agents.now();
}

/** In use now: capacity minus the free amount of the agent's latest offer (edges send one on
 * every change), else the `used` of its last agent record (sent when it connects). */
function usedOf(agent, key) {
  const offer = S.offers.get(agent.id);
  const total = (agent.resources || {})[key];
  if (offer && typeof offer[key] === "number" && typeof total === "number") {
    return Math.max(0, total - offer[key]);
  }
  return (agent.used || {})[key] || 0;
}

async function drainAgent(agent) {
  const out = await api("POST", `/v1/agents/${enc(agent.id)}/drain`);
  flash(true, `Draining ${agent.name}: no new placements (command ${short(out.command_id)}).`);
  pollers.agents.now();
}

// An outbox with events in it is normal for a moment (the edge ships them within a second);
// one whose oldest event has waited BACKLOG_AFTER_S is an edge that cannot reach the core.
const backlog = a => (a.outbox?.depth ?? 0) > 0 && (a.outbox?.oldest_age_s ?? 0) >= BACKLOG_AFTER_S;

function agentMatches(a, text, status) {
  if (status === "backlog") {
    if (!backlog(a)) return false;
  } else if (status === "problem" ? a.status === "online" && !backlog(a) : status && a.status !== status) {
    return false;
  }
  if (!text) return true;
  return a.name.toLowerCase().includes(text) || a.site.toLowerCase().includes(text) ||
    a.id.startsWith(text);
}

// ---------------------------------------------------------------- capacity over time

/** One sample per site at every agents poll (since this page opened): the share of the
 * site's CPU and memory in use, over agents that can run work (not unreachable or revoked). */
function sampleCapacity() {
  const t = Date.now() / 1000;
  const per = new Map();
  for (const a of S.agents.values()) {
    if (a.status === "unreachable" || a.status === "revoked") continue;
    const res = a.resources || {};
    const p = per.get(a.site) || { cpu: 0, cpuTotal: 0, mem: 0, memTotal: 0 };
    p.cpu += usedOf(a, "cpus");
    p.cpuTotal += res.cpus || 0;
    p.mem += usedOf(a, "mem_mb");
    p.memTotal += res.mem_mb || 0;
    per.set(a.site, p);
  }
  for (const site of S.sites) {
    const p = per.get(site);
    const series = S.capacity.get(site) || [];
    // No agent of the site can run work now: a gap in the lines, not a drop to zero.
    series.push({
      t,
      cpu: p && p.cpuTotal > 0 ? clamp(p.cpu / p.cpuTotal, 0, 1) : null,
      mem: p && p.memTotal > 0 ? clamp(p.mem / p.memTotal, 0, 1) : null,
    });
    if (series.length > CAPACITY_SAMPLES) series.splice(0, series.length - CAPACITY_SAMPLES);
    S.capacity.set(site, series);
  }
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** The top of a capacity plot: the smallest of these shares that holds every sample, so a
 * site at 3% use still shows a line, and the label says which scale it is. */
const SPARK_SCALES = [0.1, 0.25, 0.5, 1];

function sparkScale(series) {
  const top = Math.max(0, ...series.flatMap(p => [p.cpu ?? 0, p.mem ?? 0]));
  return SPARK_SCALES.find(s => top <= s) ?? 1;
}

/** An SVG plot of a site's CPU (line over a filled area) and memory use over the samples
 * taken since the page opened, stretched over the whole width, on the scale ``scale``. */
function sparkline(series, scale) {
  const w = 220, hgt = 48;
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.setAttribute("width", String(w));
  svg.setAttribute("height", String(hgt));
  svg.setAttribute("class", "spark");
  const grid = document.createElementNS(SVG_NS, "line");
  grid.setAttribute("class", "spark-grid");
  for (const [k, v] of Object.entries({ x1: 0, x2: w, y1: hgt / 2, y2: hgt / 2 })) grid.setAttribute(k, String(v));
  svg.append(grid);
  const step = series.length > 1 ? w / (series.length - 1) : w;
  const y = v => (hgt - 2 - clamp(v / scale, 0, 1) * (hgt - 4)).toFixed(1);
  for (const key of ["mem", "cpu"]) {
    // One polyline per run of known samples (a site with no reachable agent leaves a gap).
    let run = [];
    const flush = () => {
      if (run.length > 1) {
        if (key === "cpu") {
          const area = document.createElementNS(SVG_NS, "polygon");
          area.setAttribute("class", "spark-area");
          const first = run[0].split(",")[0], last = run[run.length - 1].split(",")[0];
          area.setAttribute("points", `${first},${hgt} ${run.join(" ")} ${last},${hgt}`);
          svg.append(area);
        }
        const line = document.createElementNS(SVG_NS, "polyline");
        line.setAttribute("class", `spark-${key}`);
        line.setAttribute("points", run.join(" "));
        svg.append(line);
      }
      run = [];
    };
    series.forEach((p, i) => {
      if (p[key] === null) flush();
      else run.push(`${(i * step).toFixed(1)},${y(p[key])}`);
    });
    flush();
  }
  return svg;
}

function renderSpark(s, site) {
  const series = S.capacity.get(site) || [];
  if (!series.length) return;
  const last = series[series.length - 1];
  const sig = `${series.length}:${last.t}`;
  if (s.spark.dataset.sig === sig) return;
  s.spark.dataset.sig = sig;
  const pct = x => `${Math.round(x * 100)}%`;
  const scale = sparkScale(series);
  const now = last.cpu === null ? "no reachable agent" : `cpu ${pct(last.cpu)} · mem ${pct(last.mem)}`;
  const since = clock(new Date(series[0].t * 1000));
  s.spark.title = `In use at ${site} since ${since} (cpu blue, memory grey; the top of the ` +
    `plot is ${pct(scale)}): ${now}`;
  s.spark.replaceChildren(sparkline(series, scale),
    h("span", { class: "spark-now" }, now, h("br"), h("span", { class: "spark-scale" }, `0–${pct(scale)} since ${since}`)));
}

function siteSection(site) {
  let s = S.siteEls.get(site);
  if (s) return s;
  const caret = h("span", { class: "caret" }, "▸");
  const title = h("h3", {}, site);
  const count = h("span", { class: "muted small" });
  const chips = h("span", { class: "chips" });
  const spark = h("span", { class: "site-spark" });
  const body = h("div", { class: "site-body" });
  const head = h("div", { class: "site-head", role: "button", tabindex: "0" }, caret, title, count, chips, spark);
  const el = h("section", { class: "site", dataset: { site } }, head, body);
  const toggle = () => {
    S.siteOpen.set(site, !el.classList.contains("open"));
    renderFleet();
  };
  head.addEventListener("click", toggle);
  head.addEventListener("keydown", ev => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); toggle(); } });
  s = { el, body, count, chips, spark, more: null, order: "" };
  S.siteEls.set(site, s);
  return s;
}

function renderFleet() {
  const box = $("#sites");
  const text = $("#agent-search").value.trim().toLowerCase();
  const status = $("#agent-status-filter").value;
  const bySite = new Map();
  for (const a of S.agents.values()) {
    if (!bySite.has(a.site)) bySite.set(a.site, []);
    bySite.get(a.site).push(a);
  }
  if (!S.agents.size) {
    box.replaceChildren(h("p", { class: "muted" }, "No agents have joined yet. Create a join token with ",
      h("code", {}, "outpost-hub token create"), " and start an agent with it."));
    S.siteEls.clear();
    S.cards.clear();
    return;
  }
  const big = S.agents.size > SITES_OPEN_UP_TO;
  box.classList.toggle("compact", big); // folded sites as tiles in a grid
  const shown = new Set();
  const sections = [];
  for (const site of [...bySite.keys()].sort()) {
    const all = bySite.get(site);
    const visible = all.filter(a => agentMatches(a, text, status));
    if (!visible.length && (text || status)) continue;
    const s = siteSection(site);
    sections.push(s.el);
    const tally = {};
    for (const a of all) tally[a.status] = (tally[a.status] || 0) + 1;
    const behind = all.filter(backlog);
    setText(s.count, `${all.length} agent${all.length === 1 ? "" : "s"}`);
    renderSpark(s, site);
    const chipSig = JSON.stringify([tally, behind.length]);
    if (s.chips.dataset.sig !== chipSig) {
      s.chips.dataset.sig = chipSig;
      s.chips.replaceChildren(...Object.keys(STATUS_ORDER).filter(k => tally[k])
        .map(k => h("span", { class: `chip st-${k}` }, h("span", { class: `dot st-${k}` }), `${tally[k]} ${k}`)),
      behind.length ? h("span", { class: "chip backlog", title: "agents with events waiting to reach the core" },
        `${behind.length} outbox backlog`) : "");
    }
    // Until the user decides, a big fleet shows only the sites that need a look, as they
    // come to need it (an agent that goes unreachable later opens its site then).
    const byDefault = !big || all.some(a => a.status !== "online");
    const open = (S.siteOpen.has(site) ? S.siteOpen.get(site) : byDefault) || Boolean(text || status);
    s.el.classList.toggle("open", open);
    if (!open) {
      s.body.replaceChildren();
      continue;
    }
    visible.sort((x, y) => (STATUS_ORDER[x.status] ?? 9) - (STATUS_ORDER[y.status] ?? 9) ||
      x.name.localeCompare(y.name));
    const limit = S.siteAll.has(site) ? visible.length : AGENTS_PER_SITE;
    const kids = [];
    for (const a of visible.slice(0, limit)) {
      const c = S.cards.get(a.id) || makeCard(a);
      updateCard(c, a);
      shown.add(a.id);
      kids.push(c.el);
    }
    if (visible.length > limit) {
      if (!s.more) {
        s.more = h("button", { type: "button", class: "ghost site-more" });
        s.more.addEventListener("click", () => { S.siteAll.add(site); renderFleet(); });
      }
      setText(s.more, `Show all ${visible.length} agents in ${site}`);
      kids.push(s.more);
    }
    const order = kids.map(k => k.dataset.agentId || "more").join(",");
    if (order !== s.order || s.body.childElementCount !== kids.length) {
      s.order = order;
      s.body.replaceChildren(...kids);
    }
  }
  for (const id of [...S.cards.keys()]) if (!shown.has(id)) S.cards.delete(id);
  const current = Array.from(box.children);
  if (current.length !== sections.length || current.some((el, i) => el !== sections[i])) {
    box.replaceChildren(...sections);
    if (!sections.length) box.append(h("p", { class: "muted" }, "No agent matches."));
  }
}

function tickTimes() {
  for (const c of S.cards.values()) setText(c.seen, `seen ${ago(c.agent.last_seen)}`);
}

function renderSummary() {
  const box = $("#summary");
  const tally = {};
  for (const a of S.agents.values()) tally[a.status] = (tally[a.status] || 0) + 1;
  const chips = [h("span", { class: "chip" }, h("b", {}, String(S.agents.size)), " agents")];
  for (const st of Object.keys(STATUS_ORDER).reverse()) {
    if (tally[st]) chips.push(h("span", { class: "chip" }, h("span", { class: `dot st-${st}` }), `${tally[st]} ${st}`));
  }
  const behind = [...S.agents.values()].filter(backlog);
  if (behind.length) {
    const events = behind.reduce((n, a) => n + a.outbox.depth, 0);
    const oldest = Math.max(...behind.map(a => a.outbox.oldest_age_s || 0));
    chips.push(h("span", { class: "chip warn", title: "events waiting at edges to reach the core" },
      `${behind.length} outbox backlog · ${events} event${events === 1 ? "" : "s"} · oldest ${age(oldest)}`));
  }
  if (S.counts) {
    const t = S.counts.total;
    chips.push(h("span", { class: "chip" }, h("b", {}, String(S.counts.n)), " tasks"));
    for (const st of ["running", "pending", "unknown", "failed"]) {
      if (t[st]) chips.push(h("span", { class: "chip" }, `${t[st]} ${st}`));
    }
  }
  box.replaceChildren(...chips);
}

// ---------------------------------------------------------------- task counts (background scan)

async function scanCounts() {
  const t0 = performance.now();
  const bySite = new Map();
  const total = {};
  let n = 0;
  let cursor = null;
  do {
    const page = await api("GET", `/v1/tasks?limit=1000${cursor ? `&cursor=${enc(cursor)}` : ""}`);
    for (const t of page.items) {
      const site = siteOfTask(t);
      if (!bySite.has(site)) bySite.set(site, {});
      const row = bySite.get(site);
      row[t.state] = (row[t.state] || 0) + 1;
      total[t.state] = (total[t.state] || 0) + 1;
      n++;
    }
    cursor = page.next_cursor;
  } while (cursor);
  S.counts = { bySite, total, n, at: new Date(), took: performance.now() - t0 };
  renderCounts();
  renderSummary();
}

function renderCounts() {
  const table = $("#counts");
  const c = S.counts;
  if (!c) return;
  setText($("#counts-meta"), `${c.n} tasks · counted ${clock(c.at)}`);
  const states = TASK_STATES.filter(s => c.total[s] || s === "running");
  const filterTo = (site, state) => {
    S.filter = { site: site === "unplaced" ? "" : site, agent: "", state, name: "" };
    syncFilterInputs();
    resetPages();
  };
  const cell = (site, st, n) => (n
    ? h("td", { class: "num" }, h("a", { href: "#/", onclick: ev => { ev.preventDefault(); filterTo(site, st); } }, String(n)))
    : h("td", { class: "num zero" }, "0"));
  const head = h("thead", {}, h("tr", {}, h("th", {}, "Site"), ...states.map(s => h("th", { class: "num" }, s)), h("th", { class: "num" }, "all")));
  const rows = [...c.bySite.keys()].sort().map(site => {
    const r = c.bySite.get(site);
    const all = Object.values(r).reduce((x, y) => x + y, 0);
    return h("tr", { dataset: { site } }, h("td", {}, site), ...states.map(s => cell(site, s, r[s] || 0)),
      h("td", { class: "num" }, String(all)));
  });
  rows.unshift(h("tr", { class: "total" }, h("td", {}, `all ${c.bySite.size} site${c.bySite.size === 1 ? "" : "s"}`),
    ...states.map(s => h("td", { class: "num" }, String(c.total[s] || 0))),
    h("td", { class: "num" }, String(c.n))));
  if (!c.n) {
    table.replaceChildren(h("tbody", {}, h("tr", {}, h("td", { class: "muted" }, "No tasks yet."))));
    return;
  }
  table.replaceChildren(head, h("tbody", {}, ...rows));
}

// ---------------------------------------------------------------- task table (one page at a time)

function renderFilterOptions() {
  const fill = (select, options, keepFirst = 1) => {
    const sig = JSON.stringify(options);
    if (select.dataset.sig === sig) return;
    select.dataset.sig = sig;
    const value = select.value;
    const first = Array.from(select.options).slice(0, keepFirst);
    select.replaceChildren(...first, ...options.map(([v, label]) => h("option", { value: v }, label)));
    select.value = options.some(([v]) => v === value) ? value : "";
  };
  const sites = S.sites.map(s => [s, s]);
  fill($("#f-site"), sites);
  fill($("#task-form [name=site]"), sites);
  const agents = [...S.agents.values()].filter(a => !S.filter.site || a.site === S.filter.site)
    .sort((x, y) => x.name.localeCompare(y.name)).slice(0, 1000)
    .map(a => [a.id, `${a.name} (${a.site})`]);
  if (S.filter.agent && !agents.some(([v]) => v === S.filter.agent)) {
    agents.unshift([S.filter.agent, agentName(S.filter.agent)]);
  }
  fill($("#f-agent"), agents);
  fill($("#f-state"), TASK_STATES.map(s => [s, s]));
  syncFilterInputs(false);
}

/** The filter inputs from S.filter; the name box only when the filter was set by a click,
 * never by a refresh (that would wipe what the user is typing). */
function syncFilterInputs(name = true) {
  $("#f-site").value = S.filter.site;
  $("#f-agent").value = S.filter.agent;
  $("#f-state").value = S.filter.state;
  if (name) $("#f-name").value = S.filter.name;
}

function resetPages() {
  S.pages = { cursors: [null], idx: 0, items: [], next: null, gen: S.pages.gen + 1, sig: "" };
  renderTaskTable();
  pollers.tasks.now();
}

async function loadTaskPage() {
  const gen = S.pages.gen;
  const idx = S.pages.idx;
  // Last changed first, across the whole fleet (the API orders, not this page): what
  // someone just did, or what just failed, is at the top.
  const q = new URLSearchParams({ limit: String(PAGE_SIZE), order: "recent" });
  const f = S.filter;
  if (f.site) q.set("site", f.site);
  if (f.agent) q.set("agent", f.agent);
  if (f.state) q.set("state", f.state);
  if (f.name) q.set("name", f.name);
  const cursor = S.pages.cursors[idx];
  if (cursor) q.set("cursor", cursor);
  let page;
  try {
    page = await api("GET", `/v1/tasks?${q}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 400 && gen === S.pages.gen) {
      showTableMessage(e.message);
      return;
    }
    throw e;
  }
  if (gen !== S.pages.gen || idx !== S.pages.idx) return; // the filter or page changed meanwhile
  S.pages.items = page.items;
  S.pages.next = page.next_cursor;
  renderTaskTable();
}

function showTableMessage(text) {
  $("#task-table tbody").replaceChildren(h("tr", { class: "empty" }, h("td", { colspan: "9" }, text)));
}

function renderTaskTable() {
  const p = S.pages;
  const sig = JSON.stringify([p.idx, p.next, canOperate(), p.items.map(t =>
    [t.id, t.state, t.reason, t.exit_code, t.restarts, t.updated_at, t.agent_id, agentName(t.agent_id)])]);
  $("#page-prev").disabled = p.idx === 0;
  $("#page-next").disabled = !p.next;
  const filtered = Object.values(S.filter).some(Boolean);
  setText($("#page-info"), `Page ${p.idx + 1} · ${p.items.length} task${p.items.length === 1 ? "" : "s"}` +
    `${filtered ? " matching" : ""}${p.next ? " · more on the next page" : ""}`);
  if (sig === p.sig) return;
  p.sig = sig;
  if (!p.items.length) {
    showTableMessage(p.next ? "Nothing on this page; try the next one." : "No task matches.");
    return;
  }
  $("#task-table tbody").replaceChildren(...p.items.map(taskRow));
}

function taskRow(t) {
  const agent = S.agents.get(t.agent_id);
  const tr = h("tr", { dataset: { taskId: t.id, state: t.state } },
    h("td", { class: "name", title: t.name }, t.name),
    h("td", { class: "mono", title: t.id }, short(t.id)),
    h("td", { class: "state-cell" }, h("span", { class: `state state-${t.state}`, title: t.reason || "" }, t.state),
      stagingProgress(t)),
    h("td", {}, siteOfTask(t)),
    h("td", { title: t.agent_id || "" }, agent ? agent.name : (t.agent_id ? short(t.agent_id) : "—")),
    h("td", { class: "num" }, t.exit_code ?? "—"),
    h("td", { class: "num" }, String(t.restarts ?? 0)),
    h("td", { title: when(t.updated_at) }, ago(t.updated_at)),
    h("td", {}, canOperate() && !TERMINAL.has(t.state) ? confirmButton("Kill", "Confirm kill", () => killTask(t)) : ""));
  tr.addEventListener("click", () => { location.hash = `#/tasks/${t.id}`; });
  return tr;
}

async function killTask(t) {
  const out = await api("DELETE", `/v1/tasks/${enc(t.id)}`);
  flash(true, out.command_id
    ? `Kill sent to ${agentName(out.agent_id)} for ${t.name} (command ${short(out.command_id)}).`
    : `${t.name} is ${out.state}.`);
  pollers.tasks.now();
  if (S.view && S.view.id === t.id) pollers.task.now();
}

// ---------------------------------------------------------------- services

async function loadServices() {
  const page = await api("GET", "/v1/services");
  S.services = page.items || [];
  const body = $("#service-table tbody");
  const sig = JSON.stringify(S.services.map(s => [s.name, s.running, s.instances, s.revision, s.rollout]));
  if (body.dataset.sig === sig) return;
  body.dataset.sig = sig;
  $("#services").hidden = false;
  if (!S.services.length) {
    body.replaceChildren(h("tr", { class: "empty" }, h("td", { colspan: "5" }, "No services.")));
    return;
  }
  const shown = S.services.slice(0, PAGE_SIZE);
  const rows = shown.map(s => {
    const tr = h("tr", { dataset: { service: s.name } },
      h("td", { class: "name" }, s.name),
      h("td", { class: "num" }, String(s.running ?? "—")),
      h("td", { class: "num" }, String(s.instances)),
      h("td", {}, s.revision ?? "—"),
      h("td", { class: "reason" }, s.rollout ? (s.rollout.state || s.rollout.status || "in progress") : "—"));
    tr.addEventListener("click", () => {
      S.filter = { site: "", agent: "", state: "", name: s.name };
      syncFilterInputs();
      resetPages();
      $("#tasks").scrollIntoView({ behavior: "smooth" });
    });
    return tr;
  });
  if (S.services.length > shown.length) {
    rows.push(h("tr", { class: "empty" }, h("td", { colspan: "5" }, `and ${S.services.length - shown.length} more`)));
  }
  body.replaceChildren(...rows);
}

// ---------------------------------------------------------------- staging progress

/** A staging task's fetch progress, from its reason as the edge keeps it (edge_agent/staging.py:
 * "fetching artifact NAME:VERSION: 1 of 3 MB (33%)", or "waiting for artifact: ...; retrying in
 * 2s" when it cannot be had yet): a bar when the reason has a percentage, and the reason. */
function stagingProgress(t) {
  if (t.state !== "staging" || !t.reason) return "";
  const m = /\((\d{1,3})%\)\s*$/.exec(t.reason);
  const pct = m ? clamp(Number(m[1]), 0, 100) : null;
  let bar = "";
  if (pct !== null) {
    const fill = h("span");
    fill.style.width = `${pct}%`;
    bar = h("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
      "aria-valuenow": String(pct), "aria-label": "fetch progress" }, fill);
  }
  return h("div", { class: `staging${pct === null ? " waiting" : ""}`, title: t.reason },
    bar, h("span", { class: "stage-reason" }, t.reason));
}

// ---------------------------------------------------------------- artifacts (one page at a time)

function resetArtifactPages() {
  const a = S.artifacts;
  S.artifacts = { cursors: [null], idx: 0, items: [], next: null, gen: a.gen + 1, sig: "", name: a.name, note: "" };
  pollers.artifacts.now();
}

async function loadArtifacts() {
  const a = S.artifacts;
  const { gen, idx } = a;
  const q = new URLSearchParams({ limit: String(ARTIFACT_PAGE) });
  if (a.name) q.set("name", a.name);
  const cursor = a.cursors[idx];
  if (cursor) q.set("cursor", cursor);
  let page;
  try {
    page = await api("GET", `/v1/artifacts?${q}`);
  } catch (e) {
    // 503: this node has no artifact store (or JetStream is away): say so in the card.
    if (e instanceof ApiError && (e.status === 400 || e.status === 503) && gen === S.artifacts.gen) {
      a.note = e.message;
      a.sig = "";
      renderArtifacts();
      return;
    }
    throw e;
  }
  // Which agents hold each one: the core's answer for one artifact names them ({id, site}
  // from each agent's latest offer); an edge's answer has no holders.
  const items = page.items.filter(art => DIGEST_RE.test(art.digest));
  const details = await Promise.all(items.map(art =>
    api("GET", `/v1/artifacts/${art.digest}`).catch(e => {
      if (e instanceof ApiError && e.status === 404) return null; // deleted meanwhile
      throw e;
    })));
  if (gen !== S.artifacts.gen || idx !== S.artifacts.idx) return; // the page or filter changed
  a.items = items.map((art, i) => ({ ...art, agents: details[i] ? details[i].agents : undefined }))
    .filter((art, i) => details[i] !== null);
  a.next = page.next_cursor;
  a.note = "";
  renderArtifacts();
}

function renderArtifacts() {
  const a = S.artifacts;
  $("#artifact-prev").disabled = a.idx === 0;
  $("#artifact-next").disabled = !a.next;
  setText($("#artifact-page-info"), `Page ${a.idx + 1} · ${a.items.length} artifact${a.items.length === 1 ? "" : "s"}` +
    `${a.name ? " named " + a.name : ""}${a.next ? " · more on the next page" : ""}`);
  const sig = JSON.stringify([a.note, a.items.map(x => [x.digest, x.agents, (x.agents || []).map(g => agentName(g.id))])]);
  if (sig === a.sig) return;
  a.sig = sig;
  const body = $("#artifact-table tbody");
  const message = text => body.replaceChildren(h("tr", { class: "empty" }, h("td", { colspan: "6" }, text)));
  if (a.note) {
    message(a.note);
    return;
  }
  if (!a.items.length) {
    if (a.next) message("Nothing on this page; try the next one.");
    else if (a.name) message(`No artifact named ${a.name}.`);
    else message("No artifacts yet. Push one with: outpost artifacts push FILE --name NAME --version VERSION");
    return;
  }
  body.replaceChildren(...a.items.map(artifactRow));
}

function artifactRow(art) {
  const labels = Object.entries(art.labels || {});
  return h("tr", { dataset: { digest: art.digest, name: art.name } },
    h("td", { class: "name", title: art.name }, art.name,
      labels.length ? h("span", { class: "labels" }, ...labels.map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`))) : ""),
    h("td", { class: "version", title: art.version }, art.version),
    h("td", { class: "mono digest", title: art.digest }, art.sha256 ? art.sha256.slice(0, 12) : short(art.digest)),
    h("td", { class: "num size", title: `${art.size} bytes` }, bytes(art.size)),
    h("td", { class: "created" }, when(art.created)),
    h("td", { class: "holders" }, heldBy(art.agents)));
}

/** "berlin 2 · oslo 1": how many agents of each site hold it (their names in the tooltip). */
function heldBy(agents) {
  if (agents === undefined) return h("span", { class: "muted" }, "—");
  if (!agents.length) return h("span", { class: "muted none" }, "no agent yet");
  const bySite = new Map();
  for (const g of agents) {
    if (!bySite.has(g.site)) bySite.set(g.site, []);
    bySite.get(g.site).push(agentName(g.id));
  }
  return h("span", { class: "chips" }, ...[...bySite.keys()].sort().map(site => {
    const names = bySite.get(site).sort();
    return h("span", { class: "chip holder", dataset: { site }, title: `${site}: ${names.join(", ")}` },
      h("span", { class: "site-name" }, site), h("b", { class: "n" }, String(names.length)));
  }));
}

// ---------------------------------------------------------------- task view

function route() {
  const m = location.hash.match(/^#\/tasks\/([\w-]+)/);
  if (m) openTask(m[1]);
  else closeTask();
}

function openTask(id) {
  if (S.view && S.view.id === id) return;
  closeTask();
  S.view = { id, task: null };
  $("#fleet-view").hidden = true;
  $("#task-view").hidden = false;
  setText($("#tv-title"), `Task ${short(id)}`);
  $("#tv-facts").replaceChildren();
  $("#tv-spec").replaceChildren();
  $("#task-actions").replaceChildren();
  setText($("#tv-json"), "");
  $("#tv-history").replaceChildren();
  window.scrollTo(0, 0);
  setText($("#log"), "");
  logStatus("");
  pollers.task.start(); // its first load starts the log
}

function closeTask() {
  if (!S.view) {
    $("#fleet-view").hidden = false;
    $("#task-view").hidden = true;
    return;
  }
  pollers.task.stop();
  stopLogs();
  S.view = null;
  $("#fleet-view").hidden = false;
  $("#task-view").hidden = true;
}

async function loadTask() {
  const view = S.view;
  if (!view) return;
  let t;
  try {
    t = await api("GET", `/v1/tasks/${enc(view.id)}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404 && S.view === view) {
      setText($("#tv-title"), `No task ${view.id}`);
      return;
    }
    throw e;
  }
  if (S.view !== view) return;
  const was = view.task;
  view.task = t;
  renderTask(t);
  if (!was || was.updated_at !== t.updated_at || was.state !== t.state) loadHistory(view);
  // The log follows the task: it starts once the task is on an edge, and a change of state
  // reconnects it unless it is streaming fine (an agent gone unreachable shows why, as 503).
  if (!S.log) startLogs();
  else if (was && was.state !== t.state && (!S.log.streaming || t.state === "unknown")) startLogs();
}

/** The task's state changes as its edge reported them (the API's history), newest first. */
async function loadHistory(view) {
  let answer;
  try {
    answer = await api("GET", `/v1/tasks/${enc(view.id)}/history`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) return;
    throw e;
  }
  if (S.view !== view) return;
  const items = answer.items.slice().reverse();
  const list = $("#tv-history");
  if (!items.length) {
    list.replaceChildren(h("li", { class: "muted" }, "No state reported by an edge yet."));
    return;
  }
  list.replaceChildren(...items.map(e => h("li", {},
    h("span", { class: "when", title: when(e.ts) }, when(e.ts)),
    h("span", { class: `state state-${e.state}` }, e.state),
    e.exit_code !== null && e.exit_code !== undefined ? h("span", { class: "exit" }, `exit ${e.exit_code}`) : "",
    e.restarts ? h("span", { class: "muted small" }, `restart ${e.restarts}`) : "",
    e.reason ? h("span", { class: "reason" }, e.reason) : "")));
}

function fact(label, value, cls = "") {
  return h("div", { class: cls }, h("dt", {}, label), h("dd", {}, value ?? "—"));
}

function renderTask(t) {
  const agent = S.agents.get(t.agent_id);
  $("#tv-title").replaceChildren(t.name, h("span", { class: `state state-${t.state}`, id: "tv-state" }, t.state),
    h("span", { class: "mono" }, t.id));
  const agentCell = t.agent_id
    ? h("span", {}, agent ? agent.name : short(t.agent_id), " ",
      agent ? h("span", { class: `status st-${agent.status}` }, agent.status) : "")
    : "not placed";
  $("#tv-facts").replaceChildren(
    fact("State", h("span", { class: `state state-${t.state}` }, t.state)),
    fact("Exit code", t.exit_code ?? "—"),
    fact("Restarts", String(t.restarts ?? 0)),
    fact("Agent", agentCell),
    fact("Site", siteOfTask(t)),
    fact("Origin", t.origin),
    fact("Generation", String(t.generation ?? "—")),
    fact("PID", t.pid ?? "—"),
    fact("Healthy", t.healthy === null || t.healthy === undefined ? "—" : (t.healthy ? "yes" : "no")),
    fact("Created", when(t.created_at)),
    fact("Started", when(t.started_at)),
    fact("Finished", when(t.finished_at)),
    fact("Reason", t.reason || "—", "wide"),
    t.state === "staging" ? fact("Staging", stagingProgress(t), "wide staging-fact") : "");
  const res = t.resources || {};
  const rs = t.restart || {};
  const cons = t.constraints || {};
  const consText = [cons.site && `site=${cons.site}`, cons.agent && `agent=${cons.agent}`,
    ...(cons.labels || []).map(l => `${l.key} ${l.op} ${(l.values || []).join(",")}`),
    cons.unique && `unique per ${cons.unique}`, cons.strategy].filter(Boolean).join(" · ");
  const env = Object.entries(t.env || {});
  const labels = Object.entries(t.labels || {});
  $("#tv-spec").replaceChildren(
    fact("Command", h("code", {}, joinArgs(t.command)), "wide"),
    fact("Resources", `${num(res.cpus)} CPU · ${mem(res.mem_mb)}${res.disk_mb ? ` · ${mem(res.disk_mb)} disk` : ""}`),
    fact("Restart policy", `${rs.policy || "never"}${rs.max !== null && rs.max !== undefined ? ` (max ${rs.max})` : ""}` +
      `${rs.policy && rs.policy !== "never" ? ` · backoff ${rs.backoff}s..${rs.max_backoff}s` : ""}`),
    fact("Kill timeout", t.kill_timeout !== undefined ? `${t.kill_timeout}s` : "—"),
    fact("Constraints", consText || "—"),
    fact("Health check", t.health ? `${joinArgs(t.health.command)} every ${t.health.interval}s` : "none"),
    fact("Labels", labels.length ? labels.map(([k, v]) => `${k}=${v}`).join(", ") : "—"),
    fact("Artifacts", (t.artifacts || []).length ? (t.artifacts || []).map(artifactUse).join("\n") : "—",
      (t.artifacts || []).length ? "wide artifacts-fact" : ""),
    t.image ? fact("Image", h("code", {}, t.image)) : "",
    fact("Environment", env.length ? env.map(([k, v]) => `${k}=${v}`).join("\n") : "—", env.length ? "wide" : ""));
  setText($("#tv-json"), JSON.stringify(t, null, 2));
  const actions = $("#task-actions");
  const wantKill = canOperate() && !TERMINAL.has(t.state);
  const hasKill = Boolean(actions.querySelector(".kill"));
  if (wantKill && !hasKill) actions.append(confirmButton("Kill task", "Confirm kill", () => killTask(t), "kill"));
  if (!wantKill && hasKill) actions.replaceChildren();
}

/** One entry of a task's ``artifacts``: what it names and where it goes in the sandbox. */
function artifactUse(u) {
  const what = u.digest ? `${u.digest.slice(0, 19)}…` : `${u.name}:${u.version}`;
  const how = [u.extract ? "extracted" : "", u.mode ? `mode ${u.mode}` : ""].filter(Boolean).join(", ");
  return `${what} → ${u.dest || "."}${how ? ` (${how})` : ""}`;
}

// ---------------------------------------------------------------- log tail (forwarded from the edge)

function stopLogs() {
  if (!S.log) return;
  S.log.ctl.abort();
  clearTimeout(S.log.retry);
  S.log = null;
}

function logStatus(text, kind = "") {
  const el = $("#log-status");
  el.className = kind ? `notice ${kind}` : "muted small";
  setText(el, text);
}

function appendLog(pre, text) {
  const nearBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
  pre.append(text);
  if (pre.textContent.length > LOG_MAX_CHARS) {
    const keep = pre.textContent.slice(-Math.floor(LOG_MAX_CHARS * 0.8));
    pre.textContent = keep.slice(keep.indexOf("\n") + 1);
  }
  if (nearBottom) pre.scrollTop = pre.scrollHeight;
}

async function startLogs() {
  stopLogs();
  const view = S.view;
  if (!view) return;
  const log = { ctl: new AbortController(), retry: null, streaming: false };
  S.log = log;
  const task = view.task;
  if (!task) return;
  if (!task.agent_id || task.state === "pending" || task.state === "staging") {
    logStatus(`Waiting for the task to start on an agent (${task.state}).`);
    return;
  }
  const stream = $("#log-stream").value;
  const follow = $("#log-follow").checked;
  const pre = $("#log");
  const again = ms => {
    log.retry = setTimeout(() => { if (S.log === log) startLogs(); }, ms);
  };
  logStatus("Asking the edge for the log…");
  let resp;
  try {
    resp = await fetch(`/v1/tasks/${enc(view.id)}/logs?tail=${LOG_TAIL}&follow=${follow}&stream=${stream}`,
      { headers: { Authorization: `Bearer ${S.token}` }, signal: log.ctl.signal });
  } catch (e) {
    if (e.name === "AbortError") return;
    logStatus(`Cannot reach the hub for the log (${e.message}); retrying.`, "error");
    again(5000);
    return;
  }
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (S.log !== log) return;
    if (resp.status === 401) {
      logout(`Signed out: ${err.message}`);
      return;
    }
    // 503: the edge is offline: say so (the API's words), keep what we showed, try again.
    // 404 can be a task that has not reached its edge yet.
    const offline = resp.status === 503;
    logStatus(`${offline ? "Log unavailable: " : ""}${err.message} · retrying every 5 s`,
      offline ? "offline" : "error");
    if (resp.status >= 500 || resp.status === 404) again(5000);
    return;
  }
  pre.textContent = "";
  log.streaming = true;
  logStatus(follow ? "Following the log live from the edge." : `Last ${LOG_TAIL} lines from the edge.`);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      appendLog(pre, value);
    }
  } catch (e) {
    if (e.name === "AbortError" || S.log !== log) return;
    logStatus(`The log stream broke (${e.message}); reconnecting.`, "error");
    again(3000);
    return;
  }
  if (S.log !== log) return;
  log.streaming = false;
  const now = S.view && S.view.task;
  if (!pre.textContent) pre.textContent = "(no output yet)";
  if (follow && now && !TERMINAL.has(now.state)) {
    logStatus("The log stream ended (the edge may have gone away); reconnecting in 5 s.");
    again(5000);
  } else {
    logStatus("End of log.");
  }
}

// ---------------------------------------------------------------- event feed (SSE)

function setFeedState(text, cls) {
  const el = $("#feed-state");
  setText(el, text);
  el.className = `live ${cls}`;
}

function openFeed() {
  closeFeed();
  // fetch, not EventSource: EventSource cannot send an Authorization header, and a token in
  // the address would land in server and proxy logs (the API takes bearer headers only). So
  // the stream is read here, and a drop is retried here, with Last-Event-ID like EventSource.
  const ctl = new AbortController();
  S.es = ctl;
  readFeed(ctl).then(() => {
    if (S.es !== ctl) return;
    S.feedDropped = true;
    setFeedState("reconnecting…", "off");
    setTimeout(() => { if (S.es === ctl && S.started) openFeed(); }, 2000);
  });
}

async function readFeed(ctl) {
  const headers = { Authorization: `Bearer ${S.token}`, Accept: "text/event-stream" };
  // On the first open, from a little before now (the hub says where): the panel shows what
  // just happened instead of waiting for the next event.
  const from = S.lastEventId ?? S.info?.recent_events_after ?? null;
  if (from !== null) headers["Last-Event-ID"] = String(from);
  let resp;
  try {
    resp = await fetch("/v1/events", { headers, signal: ctl.signal, cache: "no-store" });
  } catch {
    return;
  }
  if (!resp.ok || !resp.body) {
    if (resp.status === 401) logout("Signed out: the token is no longer valid");
    return;
  }
  setFeedState("live", "on");
  if (S.feedDropped) {
    S.feedDropped = false;
    refreshAll(); // what changed while the stream was down and liveness is not in the feed
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done || S.es !== ctl) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        feedBlock(block);
      }
    }
  } catch {
    // aborted by closeFeed, or the connection dropped: the caller retries if still wanted
  }
}

/** One server-sent event block (the text/event-stream format): id, event and data lines. */
function feedBlock(block) {
  let id = "", kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // a keepalive comment
    const at = line.indexOf(":");
    const field = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    if (field === "id") id = value;
    else if (field === "event") kind = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length || (kind !== "message" && !EVENT_KINDS.includes(kind))) return;
  onEvent(kind, { data: data.join("\n"), lastEventId: id });
}

function closeFeed() {
  const ctl = S.es;
  S.es = null;
  if (ctl) ctl.abort();
}

function onEvent(kind, ev) {
  let data;
  try {
    data = JSON.parse(ev.data);
  } catch {
    return;
  }
  if (ev.lastEventId) S.lastEventId = ev.lastEventId;
  const item = { kind, data, at: eventTime(data), id: ev.lastEventId };
  S.feed.unshift(item);
  if (S.feed.length > FEED_MAX) S.feed.length = FEED_MAX;
  if (kind !== "offer" || $("#feed-offers").checked) {
    const list = $("#feed");
    const empty = list.querySelector(".empty");
    if (empty) empty.remove();
    list.prepend(feedItem(item));
    while (list.childElementCount > FEED_MAX) list.lastElementChild.remove();
  }
  // Quick updates for what the event touches.
  if (kind === "task" || kind === "result" || kind === "snapshot") {
    pollers.tasks.soon(300);
    pollers.counts.soon(2000);
    pollers.agents.soon(1000);
    pollers.services.soon(1500);
    if (S.view && (data.id === S.view.id || data.task_id === S.view.id)) pollers.task.soon(100);
    if (kind === "result") pollers.artifacts.soon(1000); // a stage command done
  } else {
    pollers.agents.soon(500);
    // An offer lists the artifacts its agent holds: the holders may have changed.
    if (kind === "offer" || kind === "agent") pollers.artifacts.soon(1000);
  }
}

/** When it happened, as far as the event says (a replayed one is not "now"). */
function eventTime(d) {
  const ts = ["ts", "updated_at", "finished_at", "started_at", "created_at"]
    .map(k => d && d[k]).find(v => typeof v === "number" && v > 0);
  return ts ? new Date(ts * 1000) : new Date();
}

function feedText(kind, d) {
  const who = agentName(d._agent || d.agent_id);
  switch (kind) {
    case "task": {
      const link = h("a", { href: `#/tasks/${d.id}` }, d.name || short(d.id));
      return [link, ` ${short(d.id)} → `, h("span", { class: `state state-${d.state}` }, d.state),
        d.exit_code !== null && d.exit_code !== undefined ? ` exit ${d.exit_code}` : "", ` on ${who}`];
    }
    case "offer":
      return [`${who} offers ${num(d.cpus)} CPU, ${mem(d.mem_mb)} free`];
    case "agent":
      return [`${d.name || who} (${d.site || "?"}) connected: v${d.version || "?"}, ${d.isolation || "?"}`];
    case "snapshot": {
      const n = (d.tasks || []).length;
      return [`${who} reconciled: ${n} active task${n === 1 ? "" : "s"}`];
    }
    case "result": {
      const task = d.task_id ? [" for ", h("a", { href: `#/tasks/${d.task_id}` }, short(d.task_id))] : [];
      return [`${d.kind || "command"} ${d.status || ""}`, ...task, ` on ${who}`, d.detail ? `: ${d.detail}` : ""];
    }
    default:
      return [JSON.stringify(d).slice(0, 200)];
  }
}

function feedItem(item) {
  return h("li", { dataset: { kind: item.kind, eventId: item.id } },
    h("time", {}, clock(item.at)),
    h("span", { class: `kind k-${item.kind}` }, item.kind),
    h("span", { class: "text" }, ...feedText(item.kind, item.data)));
}

function renderFeed() {
  const offers = $("#feed-offers").checked;
  const items = S.feed.filter(i => offers || i.kind !== "offer").map(feedItem);
  $("#feed").replaceChildren(...(items.length ? items : [h("li", { class: "muted empty" }, "Waiting for events…")]));
}

// ---------------------------------------------------------------- forms

function numberField(form, name, fallback) {
  const v = Number(form.elements[name].value);
  return Number.isFinite(v) && v > 0 ? v : fallback;
}

function checkName(name) {
  if (!NAME_RE.test(name)) {
    throw new Error("name: lowercase letters, digits and . _ - (at most 63), starting with a letter or digit");
  }
}

async function submitTask(ev) {
  ev.preventDefault();
  const f = ev.target;
  const button = f.querySelector("button[type=submit]");
  try {
    const name = f.elements.name.value.trim();
    checkName(name);
    const command = splitArgs(f.elements.command.value.trim());
    if (!command.length) throw new Error("command: give the program and its arguments");
    const spec = {
      name,
      command,
      resources: { cpus: numberField(f, "cpus", 0.1), mem_mb: Math.round(numberField(f, "mem", 32)) },
    };
    if (f.elements.site.value) spec.constraints = { site: f.elements.site.value };
    button.disabled = true;
    const t = await api("POST", "/v1/tasks", spec);
    showResult(true, "Task ", h("a", { href: `#/tasks/${t.id}`, id: "submitted-task" }, t.name), ` submitted (${short(t.id)}): `,
      h("span", { class: `state state-${t.state}` }, t.state), t.reason ? ` ${t.reason}` : "");
    pollers.tasks.now();
    pollers.counts.soon(500);
  } catch (e) {
    showResult(false, e.message);
  } finally {
    button.disabled = false;
  }
}

async function submitService(ev) {
  ev.preventDefault();
  const f = ev.target;
  const button = f.querySelector("button[type=submit]");
  try {
    const name = f.elements.name.value.trim();
    checkName(name);
    const command = splitArgs(f.elements.command.value.trim());
    if (!command.length) throw new Error("command: give the program and its arguments");
    const instances = Number.parseInt(f.elements.instances.value, 10);
    if (!(instances >= 0)) throw new Error("instances: a whole number, 0 or more");
    button.disabled = true;
    const s = await api("POST", "/v1/services", {
      name,
      instances,
      task: { command, resources: { cpus: numberField(f, "cpus", 0.1), mem_mb: Math.round(numberField(f, "mem", 32)) } },
    });
    showResult(true, `Service ${s.name}: ${s.instances} instance${s.instances === 1 ? "" : "s"} wanted, ${s.running ?? 0} running.`);
    pollers.services.now();
    pollers.tasks.soon(500);
  } catch (e) {
    showResult(false, e.message);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- login, start, stop

const pollers = {
  agents: new Poller("agents", loadAgents, { min: 1000, max: 15000, factor: 8, gap: 500 }),
  tasks: new Poller("tasks", loadTaskPage, { min: 2500, max: 30000, factor: 10, gap: 400 }),
  counts: new Poller("counts", scanCounts, { min: 5000, max: 120000, factor: 6, gap: 3000 }),
  services: new Poller("services", loadServices, { min: 5000, max: 60000, factor: 10, gap: 1000 }),
  task: new Poller("task", loadTask, { min: 2000, max: 15000, factor: 10, gap: 200 }),
  artifacts: new Poller("artifacts", loadArtifacts, { min: 5000, max: 60000, factor: 10, gap: 2000 }),
};

function refreshAll() {
  for (const [name, p] of Object.entries(pollers)) if (name !== "task" || S.view) p.now();
}

function showLogin(message = "") {
  $("#app").hidden = true;
  $("#login").hidden = false;
  const err = $("#login-error");
  setText(err, message);
  err.hidden = !message;
  $("#login-token").value = "";
  $("#login-token").focus();
}

function logout(message = "") {
  localStorage.removeItem(TOKEN_KEY);
  S.token = "";
  S.started = false;
  for (const p of Object.values(pollers)) p.stop();
  closeFeed();
  stopLogs();
  S.view = null;
  S.lastEventId = null;
  S.feed = [];
  renderFeed();
  showLogin(message);
}

async function start() {
  S.token = localStorage.getItem(TOKEN_KEY) || "";
  if (!S.token) {
    showLogin();
    return;
  }
  try {
    S.info = await api("GET", "/v1/info");
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return; // api() showed the login
    showLogin(`Cannot reach the hub: ${e.message}`);
    return;
  }
  // Cores say which role the token has; an edge that does not is treated as operator (its
  // API still refuses what the token may not do).
  S.role = S.info.token_role || "operator";
  document.body.dataset.role = S.role;
  setText($("#role-badge"), S.role);
  setText($("#hub-meta"), `${S.info.role === "core" ? "core hub" : `edge ${S.info.name || ""}`} · v${S.info.version}`);
  $("#actions").hidden = !canOperate();
  $("#login").hidden = true;
  $("#app").hidden = false;
  S.started = true;
  openFeed();
  for (const [name, p] of Object.entries(pollers)) if (name !== "task") p.start();
  route();
}

function takeTokenFromHash() {
  const m = location.hash.match(/[#&]token=([^&]+)/);
  if (!m) return false;
  localStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
  // Out of the address bar and the history at once: the token must not linger in either.
  history.replaceState(null, "", location.pathname + location.search);
  return true;
}

function wire() {
  $("#login-form").addEventListener("submit", ev => {
    ev.preventDefault();
    const token = $("#login-token").value.trim();
    if (!token) return;
    localStorage.setItem(TOKEN_KEY, token);
    start();
  });
  $("#logout").addEventListener("click", () => logout());
  $("#agent-search").addEventListener("input", () => renderFleet());
  $("#agent-status-filter").addEventListener("change", () => renderFleet());
  $("#f-site").addEventListener("change", ev => {
    S.filter.site = ev.target.value;
    if (S.filter.agent && S.agents.get(S.filter.agent)?.site !== S.filter.site) S.filter.agent = "";
    renderFilterOptions();
    resetPages();
  });
  $("#f-agent").addEventListener("change", ev => { S.filter.agent = ev.target.value; resetPages(); });
  $("#f-state").addEventListener("change", ev => { S.filter.state = ev.target.value; resetPages(); });
  let nameTimer = null;
  $("#f-name").addEventListener("input", ev => {
    clearTimeout(nameTimer);
    nameTimer = setTimeout(() => { S.filter.name = ev.target.value.trim(); resetPages(); }, 300);
  });
  $("#task-filters").addEventListener("submit", ev => ev.preventDefault());
  $("#f-clear").addEventListener("click", () => {
    S.filter = { site: "", agent: "", state: "", name: "" };
    renderFilterOptions();
    syncFilterInputs();
    resetPages();
  });
  $("#page-prev").addEventListener("click", () => {
    if (S.pages.idx === 0) return;
    S.pages.idx--;
    S.pages.gen++;
    pollers.tasks.now();
  });
  $("#page-next").addEventListener("click", () => {
    if (!S.pages.next) return;
    S.pages.cursors[S.pages.idx + 1] = S.pages.next;
    S.pages.cursors.length = S.pages.idx + 2;
    S.pages.idx++;
    S.pages.gen++;
    pollers.tasks.now();
  });
  for (const tab of $$(".tab")) {
    tab.addEventListener("click", () => {
      for (const t of $$(".tab")) t.classList.toggle("active", t === tab);
      $("#task-form").hidden = tab.dataset.tab !== "task-form";
      $("#service-form").hidden = tab.dataset.tab !== "service-form";
      $("#form-result").hidden = true;
    });
  }
  let artifactTimer = null;
  $("#artifact-name").addEventListener("input", ev => {
    clearTimeout(artifactTimer);
    artifactTimer = setTimeout(() => { S.artifacts.name = ev.target.value.trim(); resetArtifactPages(); }, 300);
  });
  $("#artifact-prev").addEventListener("click", () => {
    const a = S.artifacts;
    if (a.idx === 0) return;
    a.idx--;
    a.gen++;
    pollers.artifacts.now();
  });
  $("#artifact-next").addEventListener("click", () => {
    const a = S.artifacts;
    if (!a.next) return;
    a.cursors[a.idx + 1] = a.next;
    a.cursors.length = a.idx + 2;
    a.idx++;
    a.gen++;
    pollers.artifacts.now();
  });
  $("#task-form").addEventListener("submit", submitTask);
  $("#service-form").addEventListener("submit", submitService);
  $("#log-stream").addEventListener("change", () => startLogs());
  $("#log-follow").addEventListener("change", () => startLogs());
  $("#feed-offers").addEventListener("change", renderFeed);
  window.addEventListener("hashchange", () => {
    if (takeTokenFromHash()) {
      const token = localStorage.getItem(TOKEN_KEY);
      if (S.started) logout();
      localStorage.setItem(TOKEN_KEY, token);
      start();
    } else if (S.started) {
      route();
    }
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden && S.started) refreshAll(); });
  setInterval(tickTimes, 1000);
}

takeTokenFromHash();
wire();
start();
