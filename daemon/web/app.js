// The Traffic Manager page: renders what ./api.js returns. No framework, no network but the daemon.
import * as api from "./api.js";

const UNITS = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
const PAGE_SIZE = 100; // users per page: the page fetches and draws no more, however many exist
const FILTER_DELAY = 250; // ms after the last keystroke in the filter box
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

// The daemon's display_bytes: powers of 1000, the system sizes are entered in ("50GB" shows
// "50 GB"), at most two decimals, rounded half to even on the exact value (BigInt, so the
// text is the CLI's to the digit).
export function displayBytes(count) {
  const bytes = BigInt(Math.max(0, Math.round(Number(count) || 0)));
  let hundredths = 0n;
  let unit = UNITS[0];
  for (let power = 0; power < UNITS.length; power++) {
    const divisor = 1000n ** BigInt(power);
    const remainder = (bytes * 100n) % divisor;
    hundredths = (bytes * 100n) / divisor;
    if (2n * remainder > divisor || (2n * remainder === divisor && hundredths % 2n === 1n)) hundredths += 1n;
    unit = UNITS[power];
    if (hundredths < 100000n) break;  // compare what is printed: 999999 is "1 MB", not "1000 kB"
  }
  const cents = (hundredths % 100n).toString().padStart(2, "0");
  return `${hundredths / 100n}.${cents}`.replace(/0+$/, "").replace(/\.$/, "") + ` ${unit}`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function ago(iso) {
  if (!iso) return el("span", { class: "muted" }, "never");
  const when = new Date(iso);
  const seconds = Math.max(0, (Date.now() - when.getTime()) / 1000);
  const text = seconds < 60 ? "just now"
    : seconds < 3600 ? `${Math.floor(seconds / 60)} min ago`
    : seconds < 86400 ? `${Math.floor(seconds / 3600)} h ago`
    : `${Math.floor(seconds / 86400)} d ago`;
  return el("time", { datetime: iso, title: when.toLocaleString() }, text);
}

// --- messages ----------------------------------------------------------------------------

function say(kind, text) {
  const box = $("message");
  box.className = kind;
  box.textContent = text;
  box.hidden = !text;
}

function describe(error) {
  if (error instanceof api.ApiError && error.status === 401) {
    $("api-key").focus();
    return "The daemon wants an API key (X-API-Key): enter it above. " + `(${error.message})`;
  }
  return error.message || String(error);
}

// --- state -------------------------------------------------------------------------------

const page = {
  users: [],            // rows of the users table: the current page
  offset: 0,            // of the current page, among the users matching the filter
  search: "",           // the filter: part of a name
  matched: 0,           // users matching the filter
  allUsers: 0,          // users in all
  loads: 0,             // counts loads, so an older load's late answers are dropped
  overviewOk: false,    // GET api/admin/usage answered
  expanded: new Set(),  // names whose details are open
  chart: new Map(),     // name -> "hourly" | "daily"
  busy: false,
  stale: false,         // the page or filter changed while loading
};

async function busy(work) {
  if (page.busy) return;
  page.busy = true;
  for (const id of ["refresh", "reset-all", "cleanup"]) $(id).disabled = true;
  document.body.classList.add("busy");
  try {
    await work();
  } catch (error) {
    say("error", describe(error));
  } finally {
    page.busy = false;
    for (const id of ["refresh", "reset-all", "cleanup"]) $(id).disabled = false;
    document.body.classList.remove("busy");
  }
  if (page.stale) navigate();
}

// Show the page at page.offset for page.search; a change while loading loads again after.
function navigate() {
  page.stale = page.busy;
  if (!page.busy) busy(load);
}

// --- loading -----------------------------------------------------------------------------

// A page of users with their keys here; this server's keys alone from a daemon without the
// usage routes (global numbers then "not available", no filter).
async function fetchPage() {
  try {
    const o = await api.usersPage(page.offset, PAGE_SIZE, page.search);
    return { o, rows: o.perUser.map(userRow), matched: o.matched, all: o.users };
  } catch (error) {
    if (!error.missing) throw error;
  }
  const k = await api.keysPage(page.offset, PAGE_SIZE);
  const rows = k.keys.map((key) => ({ ...key, total: key.up + key.down, servers: 1 }));
  return { o: null, rows, matched: k.total, all: k.total };
}

async function load() {
  const serial = ++page.loads;
  let got = { o: null, rows: [], matched: 0, all: 0 };
  let error = null;
  try {
    got = await fetchPage();
  } catch (failure) {
    error = failure;
  }
  if (!got.rows.length && page.offset > 0 && got.matched > 0) {
    page.offset = lastOffset(got.matched);  // keys went away, or the filter matches fewer
    return load();
  }
  page.overviewOk = !!got.o;
  renderGlobal(got.o, error ? null : got.all);
  renderDatabase(got.o);
  Object.assign(page, { users: got.rows, matched: got.matched, allUsers: got.all });
  renderUsers();
  renderPager();
  $("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
  say(error ? "error" : "", error ? describe(error) : "");
  fillLastUsed(got.o, serial);
  for (const name of page.expanded) if (detailsBox(name)) loadDetails(name);  // on this page
  return !error;
}

const lastOffset = (count) => Math.max(0, Math.floor((count - 1) / PAGE_SIZE) * PAGE_SIZE);

function setText(id, text) { $(id).textContent = text; }

function renderGlobal(o, keyCount) {
  const note = $("global-note");
  note.hidden = true;
  if (o) {
    setText("stat-users", o.users);
    setText("stat-servers", o.servers);
    setText("stat-traffic", displayBytes(o.traffic));
    setText("stat-traffic-split", o.up === null ? "" : `↑ ${displayBytes(o.up)}  ↓ ${displayBytes(o.down)}`);
    setText("stat-connections", o.connections);
    return;
  }
  for (const id of ["stat-users", "stat-servers", "stat-traffic", "stat-connections"]) setText(id, "–");
  setText("stat-traffic-split", "");
  note.textContent = "not available";
  if (keyCount !== null) {
    setText("stat-users", keyCount);
    setText("stat-servers", 1);
    note.textContent = "Usage across servers is not available from this daemon: this server's keys only.";
  }
  note.hidden = false;
}

function renderDatabase(o) {
  const db = o && o.db;
  $("db-facts").hidden = !db;
  $("db-note").hidden = !!db;
  if (!db) return;
  setText("db-records", db.records);
  setText("db-users", db.uniqueUsers);
  setText("db-servers", db.uniqueServers);
  setText("db-size", displayBytes(db.size));
  setText("db-retention", db.retentionDays === null ? "–" : `${db.retentionDays} days`);
}

// A row of the table: the user's usage on every server, with the key here (if any).
function userRow(user) {
  const key = user.key || { port: null, status: "remote", limit: null, used: 0, connections: null };
  return {
    ...key, name: user.name, up: user.up, down: user.down, total: user.total,
    servers: user.servers, lastUsed: user.lastUsed,
    connections: typeof user.connections === "number" ? user.connections : key.connections,
  };
}

function renderPager() {
  const { offset, matched } = page;
  const pages = Math.max(1, Math.ceil(matched / PAGE_SIZE));
  const shown = page.users.length;
  setText("page-info", matched
    ? `Page ${offset / PAGE_SIZE + 1} of ${pages}: users ${offset + 1}–${offset + shown} of ${matched}`
    : (page.search ? "No user matches the filter" : "No users"));
  $("first").disabled = $("prev").disabled = offset === 0;
  $("last").disabled = $("next").disabled = offset + PAGE_SIZE >= matched;
}

function turn(to) {
  page.offset = Math.min(Math.max(0, to), lastOffset(page.matched));
  navigate();
}

// The overview may not carry "last used": ask per user of the page, a few at a time.
async function fillLastUsed(o, serial) {
  if (!o) return;
  const queue = page.users.filter((u) => u.lastUsed === undefined);
  const worker = async () => {
    for (let user = queue.shift(); user && serial === page.loads; user = queue.shift()) {
      try {
        user.lastUsed = await api.lastUsed(user.name);
      } catch {
        user.lastUsed = undefined;
        continue;
      }
      const cell = document.querySelector(`tr.user[data-user="${CSS.escape(user.name)}"] .c-last`);
      if (cell) cell.replaceChildren(ago(user.lastUsed));
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
}

// --- users table -------------------------------------------------------------------------

function limitBar(user) {
  if (user.limit === null || user.limit === undefined) return el("span", { class: "muted" }, "no limit");
  const percent = user.limit > 0 ? (100 * user.used) / user.limit : 100;
  const level = percent >= 100 ? "over" : percent > 80 ? "warn" : "ok";
  const fill = el("span", { class: `fill ${level}` });
  fill.style.width = `${Math.min(100, percent).toFixed(1)}%`;
  return el("div", { class: "limit", title: `${percent.toFixed(1)}% of the limit used` },
    el("div", { class: "bar" }, fill),
    el("span", { class: "limit-text" }, `${displayBytes(user.used)} / ${displayBytes(user.limit)}`));
}

// Speed, connection and device limits (README "Speed, connection and device limits"): one line,
// only for a key that has one.
function kernelLimits(user) {
  const parts = [];
  if (user.speed) parts.push(`${user.speed / 1e6} Mbit/s`);
  if (user.maxConns) parts.push(`${user.maxConns} conns`);
  if (user.maxIps) parts.push(`${user.maxIps} IPs`);
  if (!parts.length) return null;
  if (user.refused) parts.push(`${user.refused} refused`);
  return el("div", { class: "muted kernel-limits" }, parts.join(" · "));
}

function renderUsers() {
  const body = $("users-body");
  if (!page.users.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 11, class: "muted" }, "no users yet")));
    return;
  }
  const rows = [];
  for (const user of page.users) {
    const open = page.expanded.has(user.name);
    rows.push(el("tr", { class: "user", "data-user": user.name },
      el("td", {}, el("button", {
        type: "button", class: "expand", "aria-expanded": String(open),
        "aria-label": `details of ${user.name}`, onclick: () => toggle(user.name),
      }, open ? "▾" : "▸")),
      el("td", { class: "c-name" }, user.name),
      el("td", { class: "c-port" }, user.port ?? "–"),
      el("td", { class: "c-status" }, el("span", { class: `badge ${user.status}` }, user.status)),
      el("td", { class: "num c-servers" }, user.servers),
      el("td", { class: "num c-up" }, displayBytes(user.up)),
      el("td", { class: "num c-down" }, displayBytes(user.down)),
      el("td", { class: "num c-total" }, displayBytes(user.total)),
      el("td", { class: "num c-conn" }, user.connections ?? "–"),
      el("td", { class: "c-last" }, user.lastUsed === undefined
        ? el("span", { class: "muted" }, page.overviewOk ? "…" : "–") : ago(user.lastUsed)),
      el("td", { class: "c-limit" }, limitBar(user), kernelLimits(user)),
    ));
    if (open) {
      rows.push(el("tr", { class: "details", "data-details": user.name },
        el("td", { colspan: 11 }, el("div", { class: "details-box muted" }, "loading…"))));
    }
  }
  body.replaceChildren(...rows);
}

function toggle(name) {
  if (page.expanded.has(name)) page.expanded.delete(name); else page.expanded.add(name);
  renderUsers();
  if (page.expanded.has(name)) loadDetails(name);
}

function detailsBox(name) {
  return document.querySelector(`tr.details[data-details="${CSS.escape(name)}"] .details-box`);
}

async function loadDetails(name) {
  let data;
  try {
    data = await api.detailed(name);
  } catch (error) {
    const box = detailsBox(name);
    if (box) box.replaceChildren(error.missing ? "Per-server details: not available from this daemon" : describe(error));
    return;
  }
  const box = detailsBox(name);
  if (!box) return;
  box.className = "details-box";
  box.replaceChildren(serverTable(data.servers), chartBlock(name, data),
    el("div", { class: "details-actions" },
      el("button", { type: "button", class: "danger reset-user", onclick: () => resetUser(name) },
        `Reset ${name}`)));
}

function serverTable(servers) {
  if (!servers.length) return el("p", { class: "muted" }, "no servers");
  return el("table", { class: "servers" },
    el("thead", {}, el("tr", {},
      ["Server", "Source", "Port", "Uploaded", "Downloaded", "Total", "Connections", "Last used"]
        .map((h, i) => el("th", { class: i >= 3 && i <= 6 ? "num" : null }, h)))),
    el("tbody", {}, servers.map((s) => el("tr", { class: "server", "data-server": s.server },
      el("td", {}, s.server), el("td", {}, s.source), el("td", {}, s.port ?? "–"),
      el("td", { class: "num s-up" }, displayBytes(s.up)),
      el("td", { class: "num s-down" }, displayBytes(s.down)),
      el("td", { class: "num s-total" }, displayBytes(s.total)),
      el("td", { class: "num s-conn" }, s.connections ?? "–"),
      el("td", {}, ago(s.lastUsed))))));
}

// --- chart -------------------------------------------------------------------------------

function chartBlock(name, data) {
  const mode = page.chart.get(name) || "hourly";
  const holder = el("div", { class: "chart" });
  const draw = (which) => {
    page.chart.set(name, which);
    for (const b of switcher.querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.value === which));
    holder.replaceChildren(drawChart(data[which], which));
  };
  const switcher = el("div", { class: "switch", role: "group", "aria-label": "chart period" },
    el("button", { type: "button", value: "hourly", onclick: () => draw("hourly") }, "24 h"),
    el("button", { type: "button", value: "daily", onclick: () => draw("daily") }, "30 d"));
  const block = el("div", { class: "chart-block" },
    el("div", { class: "chart-head" }, el("strong", {}, "Usage"), switcher,
      el("span", { class: "legend" }, el("i", { class: "up" }), "uploaded ", el("i", { class: "down" }), "downloaded")),
    holder);
  draw(mode);
  return block;
}

function label(start, which) {
  const d = new Date(start);
  const pad = (n) => String(n).padStart(2, "0");
  return which === "hourly" ? `${pad(d.getHours())}:00` : `${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
}

function drawChart(points, which) {
  const W = 720, H = 170, left = 64, bottom = 22, top = 8;
  const plotW = W - left - 4, plotH = H - top - bottom;
  const max = Math.max(0, ...points.map((p) => p.up + p.down));
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: `usage ${which}`, role: "img",
    "aria-label": `${which === "hourly" ? "last 24 hours" : "last 30 days"}: ${displayBytes(max)} at most` });
  for (const f of [0, 0.5, 1]) {
    const y = top + plotH * (1 - f);
    chart.append(svg("line", { x1: left, x2: W - 4, y1: y, y2: y, class: "grid" }),
      svg("text", { x: left - 6, y: y + 4, class: "axis", "text-anchor": "end" },
        f === 0 ? "0" : displayBytes(max * f)));
  }
  const step = plotW / Math.max(1, points.length);
  const every = which === "hourly" ? 6 : 5;
  points.forEach((p, i) => {
    const x = left + i * step;
    const scale = max ? plotH / max : 0;
    const hUp = p.up * scale, hDown = p.down * scale;
    const bar = svg("g", { class: "bar" },
      svg("title", {}, `${label(p.start, which)}  ↑ ${displayBytes(p.up)}  ↓ ${displayBytes(p.down)}`),
      svg("rect", { x: x + 1, width: Math.max(1, step - 2), y: top + plotH - hUp, height: hUp, class: "up" }),
      svg("rect", { x: x + 1, width: Math.max(1, step - 2), y: top + plotH - hUp - hDown, height: hDown, class: "down" }));
    chart.append(bar);
    if (i % every === 0) {
      chart.append(svg("text", { x: x + step / 2, y: H - 6, class: "axis", "text-anchor": "middle" },
        label(p.start, which)));
    }
  });
  if (!max) {
    chart.append(svg("text", { x: left + plotW / 2, y: top + plotH / 2, class: "empty", "text-anchor": "middle" },
      "no traffic in this period"));
  }
  return chart;
}

// --- actions -----------------------------------------------------------------------------

function confirmDialog(text, action) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = action;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

async function resetAll() {
  const count = page.allUsers;
  if (!count) return say("info", "There are no users to reset.");
  const ok = await confirmDialog(
    `Reset the traffic of all ${count} users? Their usage starts again from zero; ` +
    "the history is kept.", "Reset all");
  if (!ok) return;
  await busy(async () => {
    const done = await api.resetAll();
    const users = `${done.users} user${done.users === 1 ? "" : "s"}`;
    if (await load()) say("info", `Reset the traffic of ${users}.`);
  });
}

async function resetUser(name) {
  if (!(await confirmDialog(`Reset the traffic of ${name}? The history is kept.`, "Reset"))) return;
  await busy(async () => {
    await api.resetUser(name);
    if (await load()) say("info", `Reset the traffic of ${name}.`);
  });
}

async function cleanup() {
  await busy(async () => {
    const done = await api.cleanup();
    const ok = await load();
    const left = done.records === null ? "" :
      `; ${done.records} records left${done.size === null ? "" : ` (${displayBytes(done.size)})`}`;
    const keep = done.retentionDays === null ? "" : ` older than ${done.retentionDays} days`;
    if (ok) say("info", `Cleanup done: removed ${done.removed} records${keep}${left}.`);
  });
}

function start() {
  $("api-key").value = api.apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    api.setApiKey($("api-key").value.trim());
    busy(load);
  });
  $("refresh").addEventListener("click", () => busy(load));
  $("reset-all").addEventListener("click", resetAll);
  $("cleanup").addEventListener("click", cleanup);
  $("first").addEventListener("click", () => turn(0));
  $("prev").addEventListener("click", () => turn(page.offset - PAGE_SIZE));
  $("last").addEventListener("click", () => turn(lastOffset(page.matched)));
  $("next").addEventListener("click", () => turn(page.offset + PAGE_SIZE));
  let timer = 0;
  $("search").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      page.search = $("search").value.trim();
      turn(0);
    }, FILTER_DELAY);
  });
  window.portmeter = { displayBytes, load };
  busy(load);
}

start();
