// Seed 004 proof: the document's RoadmapWebSocket class (e2e/seed004-client.js,
// as written) in headless Chromium, against two roomcast nodes. Driven by
// crates/roomcast/tests/seed004.rs, which passes:
//   NODE_A, NODE_B                      host:port of two nodes
//   COOKIE_NAME                         the session cookie's name
//   COOKIE_VOTER, COOKIE_ADMIN, COOKIE_VIEWER  session cookie values
//   API_KEY, TENANT                     for POST /v1/publish
// The class connects to ws://${window.location.host}/api/roadmap/ws, so this
// script serves the page itself and relays that path to NODE_A (NODE_B once
// NODE_A refuses connections). Three identities need three cookie jars:
// cookies are per host, so each user's page is on its own loopback address
// (127.0.0.1/2/3) of the same port.
// To stop NODE_A it prints "CONTROL stop-a" and waits for "stopped-a" on stdin.
import http from "node:http";
import net from "node:net";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { launchBrowser } from "./browser.mjs";

const env = process.env;
const PATIENCE_MS = 5000;
const here = new URL(".", import.meta.url);
const page_html = readFileSync(new URL("seed004.html", here));
const client_js = readFileSync(new URL("seed004-client.js", here));

function fail(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

function canonical(v) {
  if (Array.isArray(v)) return `[${v.map(canonical).join(",")}]`;
  if (v && typeof v === "object") {
    return `{${Object.keys(v).sort().map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`).join(",")}}`;
  }
  return JSON.stringify(v);
}

function same(actual, expected, what) {
  const a = canonical(actual);
  const e = canonical(expected);
  if (a !== e) fail(`${what}:\n  expected ${e}\n  got      ${a}`);
  console.log(`ok: ${what}`);
}

// --- the page server and WebSocket relay ------------------------------------
let targets = [env.NODE_A, env.NODE_B];

function relay(req, client, head) {
  if (req.url !== "/api/roadmap/ws") return client.destroy();
  const tryTarget = (i) => {
    if (i >= targets.length) return client.destroy();
    const [host, port] = targets[i].split(":");
    const upstream = net.connect(Number(port), host);
    upstream.once("error", () => tryTarget(i + 1));
    upstream.once("connect", () => {
      upstream.removeAllListeners("error");
      let raw = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let h = 0; h < req.rawHeaders.length; h += 2) raw += `${req.rawHeaders[h]}: ${req.rawHeaders[h + 1]}\r\n`;
      upstream.write(raw + "\r\n");
      if (head.length) upstream.write(head);
      upstream.pipe(client).pipe(upstream);
      upstream.on("error", () => client.destroy());
      client.on("error", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
      client.on("close", () => upstream.destroy());
    });
  };
  tryTarget(0);
}

function serve(host, port) {
  const server = http.createServer((req, res) => {
    const [type, body] =
      req.url === "/seed004-client.js" ? ["text/javascript", client_js] : req.url === "/" ? ["text/html", page_html] : [null, null];
    if (!body) return res.writeHead(404).end();
    res.writeHead(200, { "Content-Type": type }).end(body);
  });
  server.on("upgrade", relay);
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve(server.address().port));
  });
}

// --- publishing ---------------------------------------------------------------
const agent = new http.Agent({ keepAlive: true });
function publish(event, node = targets[0]) {
  const body = JSON.stringify({ tenant: env.TENANT, ...event });
  const [host, port] = node.split(":");
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host, port, path: "/v1/publish", method: "POST", agent, headers: { Authorization: `Bearer ${env.API_KEY}`, "Content-Type": "application/json" } },
      (res) => {
        let text = "";
        res.on("data", (c) => (text += c));
        res.on("end", () => (res.statusCode === 200 ? resolve(JSON.parse(text)) : reject(new Error(`publish: ${res.statusCode} ${text}`))));
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

const featureUpdate = (featureId, changes, rooms = ["roadmap:all", `feature:${featureId}`]) => ({
  rooms,
  type: "FEATURE_UPDATE",
  data: { featureId, changes },
});

// --- pages ------------------------------------------------------------------------
const users = {};

async function openUser(context, name, host, port, cookie) {
  await context.addCookies([{ name: env.COOKIE_NAME, value: cookie, domain: host, path: "/" }]);
  const page = await context.newPage();
  const u = { name, page, logs: [], seen: 0, waiters: [] };
  users[name] = u;
  page.on("console", (m) => {
    u.logs.push(m.text());
    for (const wake of u.waiters.splice(0)) wake();
  });
  page.on("pageerror", (e) => fail(`${name}: page error ${e}`));
  await page.goto(`http://${host}:${port}/`);
}

// Messages the user's handlers received since the last take().
async function take(u) {
  const all = await u.page.evaluate(() => window.received);
  const fresh = all.slice(u.seen);
  u.seen = all.length;
  return fresh;
}

// Waits until the user's handlers received a message matching `pred`.
async function received(u, pred, what) {
  try {
    await u.page.waitForFunction(
      ([src, from]) => window.received.slice(from).some(new Function("m", `return (${src})(m)`)),
      [pred.toString(), u.seen],
      { timeout: PATIENCE_MS, polling: "raf" },
    );
  } catch {
    fail(`${u.name}: never received ${what}; got ${JSON.stringify(await take(u))}`);
  }
}

// Waits until a console line of the class matching `re` appears (after `from`).
async function logged(u, re, from = 0) {
  const deadline = Date.now() + 3 * PATIENCE_MS;
  for (;;) {
    const i = u.logs.findIndex((l, j) => j >= from && re.test(l));
    if (i >= 0) return i;
    const left = deadline - Date.now();
    if (left <= 0) fail(`${u.name}: no console line ${re}; logs ${JSON.stringify(u.logs)}`);
    await new Promise((wake) => {
      u.waiters.push(wake);
      setTimeout(wake, left);
    });
  }
}

// Until every session is in its rooms: publish a marker until all pages got
// one, then one fence, and drop everything up to the fence.
async function sync(label) {
  const names = Object.values(users);
  const got = (u) => u.page.evaluate((l) => window.received.some((m) => m.featureId === `sync-${l}`), label);
  const deadline = Date.now() + 3 * PATIENCE_MS;
  for (;;) {
    await publish(featureUpdate(`sync-${label}`, { title: label }, ["roadmap:all"]));
    if ((await Promise.all(names.map(got))).every(Boolean)) break;
    if (Date.now() > deadline) fail(`sync ${label}: not every page is receiving`);
    await new Promise((r) => setTimeout(r, 100));
  }
  await fence(`sync-end-${label}`);
}

// Publishes a fence and waits for it on every page; returns what each page
// got before it (the fence excluded).
async function fence(label, rooms = ["roadmap:all"]) {
  await publish(featureUpdate(`fence-${label}`, { title: label }, rooms));
  const before = {};
  for (const u of Object.values(users)) {
    await received(u, `(m) => m.featureId === "fence-${label}"`, `fence ${label}`);
    const msgs = await take(u);
    const at = msgs.findIndex((m) => m.featureId === `fence-${label}`);
    before[u.name] = msgs.slice(0, at).filter((m) => !String(m.featureId).startsWith("sync-"));
  }
  return before;
}

const strip = (m) => {
  const { timestamp, ...rest } = m;
  if (typeof timestamp !== "string" || Number.isNaN(Date.parse(timestamp))) fail(`no ISO timestamp in ${JSON.stringify(m)}`);
  return rest;
};

// --- the scenario --------------------------------------------------------------------
async function main() {
  const port = await serve("127.0.0.1", 0);
  await serve("127.0.0.2", port);
  await serve("127.0.0.3", port);
  const { context, close } = await launchBrowser();
  await openUser(context, "voter", "127.0.0.1", port, env.COOKIE_VOTER);
  await openUser(context, "admin", "127.0.0.2", port, env.COOKIE_ADMIN);
  await openUser(context, "viewer", "127.0.0.3", port, env.COOKIE_VIEWER);
  for (const u of Object.values(users)) await logged(u, /^\[RoadmapWS\] Connected$/);
  await sync("start");

  // Five votes for one feature within the window: one VOTE_UPDATE, the last
  // count, and none to the voter.
  const t0 = Date.now();
  for (let n = 1; n <= 5; n++) {
    await publish({
      rooms: ["roadmap:all", "feature:f1"],
      type: "VOTE_UPDATE",
      actor: "u-voter",
      exclude_users: ["u-voter"],
      data: { featureId: "f1", voteCount: n, voterId: "u-voter", action: "add" },
    });
  }
  const took = Date.now() - t0;
  console.log(`published 5 votes in ${took} ms`);
  if (took > 90) fail(`publishing 5 votes took ${took} ms, more than the 100 ms window: inconclusive`);
  for (const u of [users.admin, users.viewer]) await received(u, `(m) => m.type === "VOTE_UPDATE"`, "VOTE_UPDATE");
  let got = await fence("votes");
  const vote = { type: "VOTE_UPDATE", featureId: "f1", voteCount: 5, voterId: "u-voter", action: "add" };
  same(got.viewer.map(strip), [vote], "viewer: one coalesced VOTE_UPDATE with the last count");
  same(got.admin.map(strip), [vote], "admin: one coalesced VOTE_UPDATE with the last count");
  same(got.voter, [], "voter: its own vote is not echoed");

  await publish(featureUpdate("f1", { status: "IN_PROGRESS" }));
  got = await fence("update");
  const update = { type: "FEATURE_UPDATE", featureId: "f1", changes: { status: "IN_PROGRESS" } };
  for (const u of Object.values(users)) same(got[u.name].map(strip), [update], `${u.name}: FEATURE_UPDATE with the changed fields`);

  // Admin-only messages, published WITHOUT an audience: the dialect enforces it.
  const feature = { id: "f9", title: "Mobile app", description: "iOS and Android", status: "TODO", voteCount: 0, createdById: "u-admin", createdBy: { name: "Jane Admin" }, createdAt: "2025-10-20T15:40:00.000Z", updatedAt: "2025-10-20T15:40:00.000Z" };
  await publish({ rooms: ["roadmap:all", "feature:f9"], type: "FEATURE_CREATED", data: { feature } });
  await publish({ rooms: ["roadmap:all", "feature:f8"], type: "FEATURE_DELETED", data: { featureId: "f8" } });
  got = await fence("admin");
  same(got.admin.map(strip), [{ type: "FEATURE_CREATED", feature }, { type: "FEATURE_DELETED", featureId: "f8" }], "admin: FEATURE_CREATED and FEATURE_DELETED");
  same(got.viewer, [], "viewer: no admin-only messages");
  same(got.voter, [], "voter: no admin-only messages");

  // SUBSCRIBE narrows the viewer to f2. The document's server does not answer
  // SUBSCRIBE; an empty subscribe (INVALID_MESSAGE) marks it as processed.
  const barrier = async (u, what) => {
    await u.page.evaluate(() => window.roadmap.subscribe([]));
    await received(u, `(m) => m.type === "ERROR" && m.code === "INVALID_MESSAGE"`, `${what} barrier`);
    const errs = await take(u);
    same(errs.map((m) => m.code), ["INVALID_MESSAGE"], `${u.name}: ${what} processed, nothing else`);
  };
  await users.viewer.page.evaluate(() => window.roadmap.subscribe(["f2"]));
  await barrier(users.viewer, "SUBSCRIBE f2");
  await publish(featureUpdate("f1", { title: "one" }));
  await publish(featureUpdate("f2", { title: "two" }));
  got = await fence("narrow", ["roadmap:all", "feature:f2"]);
  same(got.viewer.map((m) => m.featureId), ["f2"], "viewer subscribed to f2 gets only f2");
  same(got.admin.map((m) => m.featureId), ["f1", "f2"], "admin without subscriptions gets every feature");

  await users.viewer.page.evaluate(() => window.roadmap.subscribe(["a", "b", "c"]));
  await received(users.viewer, `(m) => m.type === "ERROR"`, "SUBSCRIPTION_LIMIT");
  const limit = await take(users.viewer);
  same([limit[0].code, limit[0].context], ["SUBSCRIPTION_LIMIT", { limit: 3 }], "viewer: SUBSCRIPTION_LIMIT past the cap");

  await users.viewer.page.evaluate(() => window.roadmap.unsubscribe(["f2"]));
  await barrier(users.viewer, "UNSUBSCRIBE f2");
  await publish(featureUpdate("f1", { title: "again" }));
  got = await fence("widen");
  same(got.viewer.map((m) => m.featureId), ["f1"], "viewer back to every update after UNSUBSCRIBE");

  // Stop node A: it drains with 1001 and the class reconnects, through the
  // relay, to node B.
  const marks = Object.fromEntries(Object.values(users).map((u) => [u.name, u.logs.length]));
  console.log("CONTROL stop-a");
  await nextStdinLine("stopped-a");
  targets = [env.NODE_B];
  for (const u of Object.values(users)) {
    const closed = await logged(u, /^\[RoadmapWS\] Closed: 1001/, marks[u.name]);
    await logged(u, /^\[RoadmapWS\] Connected$/, closed);
  }
  console.log("ok: every page closed with 1001 and reconnected");
  await sync("after-restart");
  await publish(featureUpdate("f1", { status: "SHIPPED" }));
  got = await fence("after-restart");
  for (const u of Object.values(users)) same(got[u.name].map((m) => m.changes), [{ status: "SHIPPED" }], `${u.name}: updates flow again after reconnecting`);

  // Flooding: ERROR RATE_LIMIT_EXCEEDED, then close 1008.
  const mark = users.voter.logs.length;
  await users.voter.page.evaluate(() => {
    for (let i = 0; i < 60; i++) window.roadmap.unsubscribe(["zz"]);
  });
  await received(users.voter, `(m) => m.type === "ERROR"`, "RATE_LIMIT_EXCEEDED");
  const flood = await take(users.voter);
  same([flood[0].code, flood[0].context.limit], ["RATE_LIMIT_EXCEEDED", 10], "voter: throttled with RATE_LIMIT_EXCEEDED");
  await logged(users.voter, /^\[RoadmapWS\] Closed: 1008/, mark);
  console.log("ok: voter closed with 1008 after flooding");

  await close();
  console.log("seed004: all good");
  process.exit(0);
}

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function nextStdinLine(expected) {
  const { value, done } = await stdinLines.next();
  if (done || value.trim() !== expected) fail(`expected "${expected}" on stdin, got ${JSON.stringify(value)}`);
}

main().catch((e) => fail(e.stack || String(e)));
