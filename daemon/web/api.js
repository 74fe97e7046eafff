// Every request the page makes, and every field name it reads, is in this file: the rest of the
// page sees only the plain objects returned here. Paths are relative, so the page also works
// behind a reverse proxy under a sub-path.

const KEY_STORE = "portmeter.apiKey";

export class ApiError extends Error {
  constructor(status, detail, missing = false, path = "") {
    super(missing ? `${path}: not available from this daemon` : detail);
    this.status = status;
    this.path = path;
    // The daemon has no such route (an older or newer daemon): the section says "not available".
    this.missing = missing;
  }
}

export function apiKey() {
  try { return localStorage.getItem(KEY_STORE) || ""; } catch { return ""; }
}

export function setApiKey(value) {
  try {
    if (value) localStorage.setItem(KEY_STORE, value); else localStorage.removeItem(KEY_STORE);
  } catch { /* storage disabled: the key lasts until the page is closed */ }
  sessionKey = value;
}

let sessionKey = apiKey();

async function call(method, path) {
  const headers = { Accept: "application/json" };
  if (sessionKey) headers["X-API-Key"] = sessionKey;
  let response;
  try {
    response = await fetch(path, { method, headers, cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, `cannot reach the daemon (${error.message})`);
  }
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  if (!response.ok) {
    let detail = body && body.detail;
    if (detail && typeof detail !== "string") detail = JSON.stringify(detail);
    detail = detail || `${response.status} ${response.statusText}`;
    const missing = (response.status === 404 && detail === "Not Found") || response.status === 405;
    throw new ApiError(response.status, detail, missing, path);
  }
  if (body === null) throw new ApiError(response.status, `${path}: the answer is not JSON`);
  return body;
}

const user = (name) => encodeURIComponent(name);
const num = (value) => (typeof value === "number" ? value : 0);
const first = (...values) => values.find((v) => v !== undefined && v !== null);

// A key of this server as the table shows it: name, port, status, limit, its own counts.
function keyOf(k) {
  return {
    id: k.id, name: k.name, port: k.port, status: k.status,
    up: num(k.rx_bytes), down: num(k.tx_bytes),
    used: num(k.used_bytes), limit: k.data_limit_bytes ?? null,
    speed: k.speed_limit_bps ?? null, maxConns: k.max_connections ?? null,
    maxIps: k.max_ips ?? null, refused: num(k.refused_connections),
    connections: k.connections ?? null,
  };
}

// One page of this server's keys, by port (for a daemon without the usage routes).
export async function keysPage(offset, limit) {
  const body = await call("GET", `api/keys?limit=${limit}&offset=${offset}`);
  return { total: num(body.total), keys: body.keys.map(keyOf) };
}

function database(db) {
  if (!db) return null;
  return {
    records: num(db.records),
    uniqueUsers: num(db.unique_users),
    uniqueServers: num(db.unique_servers),
    size: num(first(db.size_bytes, db.size)),
    retentionDays: first(db.retention_days, db.retention) ?? null,
  };
}

// Usage across all servers, and one page of the users (by name, those whose name contains
// `search`), each with its key here: the page never fetches more than `limit` users.
export async function usersPage(offset, limit, search) {
  const query = new URLSearchParams({ limit, offset });
  if (search) query.set("search", search);
  const body = await call("GET", `api/admin/usage?${query}`);
  const traffic = num(first(body.traffic_used, body.total_bytes));
  return {
    users: num(body.total_users),
    matched: num(first(body.users_matched, body.total_users)),
    servers: num(body.total_servers),
    traffic,
    up: first(body.bytes_uploaded, null),
    down: first(body.bytes_downloaded, null),
    connections: num(body.total_connections),
    perUser: (body.users || []).map((u) => ({
      name: first(u.username, u.name),
      up: num(u.bytes_uploaded),
      down: num(u.bytes_downloaded),
      total: num(first(u.total_bytes, num(u.bytes_uploaded) + num(u.bytes_downloaded))),
      servers: typeof u.servers === "number" ? u.servers : (u.servers || []).length,
      lastUsed: u.last_used,  // undefined when the overview does not carry it
      connections: u.connections,
      key: u.key ? keyOf(u.key) : null,
    })),
    db: database(first(body.database, body.db)),
  };
}

// When a user was last seen on any server (ISO text or null).
export async function lastUsed(name) {
  const body = await call("GET", `api/admin/usage/${user(name)}`);
  const moments = [
    ...((body.local && body.local.keys) || []).map((k) => k.last_used),
    ...(body.reported || []).map((r) => first(r.last_used, r.last_seen)),
  ].filter(Boolean);
  return moments.length ? moments.reduce((a, b) => (Date.parse(a) > Date.parse(b) ? a : b)) : null;
}

function series(points) {
  return (points || []).map((p) => ({
    start: first(p.start, p.hour, p.day),
    up: num(first(p.bytes_uploaded, p.rx_bytes)),
    down: num(first(p.bytes_downloaded, p.tx_bytes)),
  }));
}

// Per server: traffic, connections, last used; and the user's hourly (24 h) and daily (30 d) series.
export async function detailed(name) {
  const body = await call("GET", `api/admin/usage/${user(name)}/detailed`);
  return {
    servers: (body.servers || []).map((s) => ({
      server: s.server,
      source: s.source || "",
      port: s.port ?? null,
      up: num(s.bytes_uploaded),
      down: num(s.bytes_downloaded),
      total: num(first(s.total_bytes, num(s.bytes_uploaded) + num(s.bytes_downloaded))),
      connections: s.connections ?? null,
      lastUsed: first(s.last_used, null),
    })),
    hourly: series(body.hourly),
    daily: series(body.daily),
  };
}

export async function resetUser(name) {
  return call("POST", `api/admin/usage/reset/${user(name)}`);
}

// Reset every user's usage (history is kept). Returns how many were reset.
export async function resetAll() {
  const body = await call("POST", "api/admin/usage/reset");
  const reset = first(body.users_reset, body.users, body.reset, []);
  return { users: Array.isArray(reset) ? reset.length : num(reset) };
}

// Apply retention now: the rows removed, and what is left.
export async function cleanup() {
  const body = await call("POST", "api/admin/usage/cleanup");
  return {
    removed: num(first(body.removed, body.deleted)),
    retentionDays: first(body.retention_days, null),
    records: first(body.records, null),
    size: first(body.size_bytes, null),
  };
}
