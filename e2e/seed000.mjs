// Seed 000 with real browser clients: a page in headless Chromium uses the
// browser's own WebSocket (authenticated by the cookie) on node A and its
// own EventSource on /api/events (proxied same-origin to node B, as a
// frontend sits behind one origin), then polls /api/events?since= for the
// events it missed. Events are published through the contract
// (POST /v1/publish). Env: NODE_A, NODE_B (host:port), API_KEY, TENANT,
// TOKEN_W123 (worker w123, no tenant claim).
import http from "node:http";
import { launchBrowser } from "./browser.mjs";

const { NODE_A, NODE_B, API_KEY, TENANT, TOKEN_W123 } = process.env;
const fail = (msg) => {
  throw new Error(msg);
};
const eq = (a, b, what) => {
  const [x, y] = [JSON.stringify(a), JSON.stringify(b)];
  if (x !== y) fail(`${what}:\n  got      ${x}\n  expected ${y}`);
};

async function publish(rooms, type, data, ts) {
  const res = await fetch(`http://${NODE_A}/v1/publish`, {
    method: "POST",
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: JSON.stringify({ tenant: TENANT, rooms, type, data, ts }),
  });
  if (res.status !== 200) fail(`publish ${type}: ${res.status} ${await res.text()}`);
  return res.json();
}

const PAGE = `<!doctype html><html><body><script>
window.got = { ws: [], sse: [], errors: [] };
window.openWs = (url) => new Promise((resolve, reject) => {
  const ws = new WebSocket(url);
  window.ws = ws;
  ws.onmessage = (m) => window.got.ws.push(JSON.parse(m.data));
  ws.onopen = () => resolve();
  ws.onerror = () => reject(new Error("websocket error"));
});
window.wsNext = (type) => new Promise((resolve) => {
  const t = setInterval(() => {
    const m = window.got.ws.find((m) => m.type === type && !m.seen);
    if (m) { m.seen = true; clearInterval(t); resolve(m); }
  }, 5);
});
window.openSse = (url) => new Promise((resolve, reject) => {
  const es = new EventSource(url);
  window.es = es;
  es.onmessage = (m) => window.got.sse.push({ id: m.lastEventId, env: JSON.parse(m.data) });
  es.onopen = () => resolve();
  es.onerror = () => { if (es.readyState === EventSource.CLOSED) reject(new Error("eventsource closed")); };
});
</script></body></html>`;

// The page's own origin: serves the page and proxies /api/ to node B.
const server = http.createServer((req, res) => {
  if (req.url === "/") {
    res.writeHead(200, { "content-type": "text/html" });
    return res.end(PAGE);
  }
  const [host, port] = NODE_B.split(":");
  const up = http.request(
    { host, port, path: req.url, method: req.method, headers: req.headers },
    (r) => {
      res.writeHead(r.statusCode, r.headers);
      r.pipe(res);
    },
  );
  up.on("error", () => res.destroy());
  req.pipe(up);
  res.on("close", () => up.destroy());
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const origin = `http://127.0.0.1:${server.address().port}`;

const { context, close } = await launchBrowser();
try {
  await context.addCookies([{ name: "token", value: TOKEN_W123, domain: "127.0.0.1", path: "/" }]);
  const page = await context.newPage();
  page.on("console", (m) => console.log("page:", m.text()));
  await page.goto(origin + "/");

  // WebSocket: cookie-authenticated, subscribe, then a foreign worker channel.
  await page.evaluate((u) => window.openWs(u), `ws://${NODE_A}/api/realtime`);
  await page.evaluate(() =>
    window.ws.send(JSON.stringify({ action: "subscribe", channels: ["worker:w123", "board:zoo"] })),
  );
  const ack = await page.evaluate(() => window.wsNext("subscribed"));
  eq(ack.payload, { channels: ["worker:w123", "board:zoo"] }, "subscribe ack");
  await page.evaluate(() =>
    window.ws.send(JSON.stringify({ action: "subscribe", channels: ["worker:w999"] })),
  );
  const denied = await page.evaluate(() => window.wsNext("error"));
  eq([denied.payload.code, denied.payload.channel], ["FORBIDDEN", "worker:w999"], "foreign worker channel");
  await page.evaluate(() => window.ws.send("{not json"));
  eq((await page.evaluate(() => window.wsNext("error"))).payload.code, "BAD_MESSAGE", "bad JSON");
  await page.evaluate(() => window.ws.send(JSON.stringify({ action: "dance" })));
  eq((await page.evaluate(() => window.wsNext("error"))).payload.code, "UNKNOWN_ACTION", "unknown action");

  // EventSource: the token's channels (its own worker channel + the board).
  await page.evaluate(() => window.openSse("/api/events"));

  const base = Date.parse("2025-12-05T10:15:00Z");
  const sent = [
    [["worker:w123"], "task.updated", { ticket: { id: "t123", version: 7, status: "in_progress", assigneeId: "w123" } }],
    [["board:zoo"], "board.refreshHint", { since: "2025-12-05T10:00:00Z" }],
    [["worker:w999"], "task.updated", { ticket: { id: "t999", version: 1 } }],
    [["worker:w123"], "worker.statsUpdated", { workerId: "w123", sprintId: "2025-48", remainingStoryPoints: 12 }],
    [["board:zoo"], "task.removed", { ticketId: "t123" }],
  ];
  const expected = [];
  for (const [i, [rooms, type, payload]] of sent.entries()) {
    const ts = base + i * 1001;
    await publish(rooms, type, payload, ts);
    if (!rooms.includes("worker:w999")) {
      expected.push({ type, timestamp: new Date(ts).toISOString(), payload });
    }
  }
  // One event in both rooms arrives once, and fences the stream.
  await publish(["worker:w123", "board:zoo"], "test.fence", {}, base);
  const fenced = (list) => list.findIndex((e) => e.type === "test.fence") >= 0;
  await page.waitForFunction(
    () => window.got.ws.some((m) => m.type === "test.fence") && window.got.sse.some((m) => m.env.type === "test.fence"),
    null,
    { timeout: 10000 },
  );
  const got = await page.evaluate(() => window.got);
  const wsEvents = got.ws
    .filter((m) => !["subscribed", "error"].includes(m.type))
    .map(({ type, timestamp, payload }) => ({ type, timestamp, payload }));
  const sseEvents = got.sse.map((m) => m.env);
  const withFence = [...expected, { type: "test.fence", timestamp: new Date(base).toISOString(), payload: {} }];
  eq(wsEvents, withFence, "WebSocket envelopes");
  eq(sseEvents, withFence, "EventSource envelopes");
  if (!fenced(wsEvents) || got.sse.some((m) => !/^\d+-\d+$/.test(m.id))) fail("SSE ids are event ids");

  // The client goes away; two events are published meanwhile; polling
  // with `since` (a time after everything it saw) returns exactly them.
  await page.evaluate(() => { window.ws.close(); window.es.close(); });
  const t0 = Date.now();
  while (Date.now() <= t0 + 1) await new Promise((r) => setTimeout(r, 1));
  const missed = [
    [["worker:w123"], "task.updated", { ticket: { id: "t124", version: 1 } }],
    [["worker:w999"], "task.updated", { ticket: { id: "t998", version: 1 } }],
    [["board:zoo"], "board.refreshHint", { since: "2025-12-05T11:00:00Z" }],
  ];
  const expectMissed = [];
  for (const [i, [rooms, type, payload]] of missed.entries()) {
    const ts = base + 60000 + i;
    await publish(rooms, type, payload, ts);
    if (!rooms.includes("worker:w999")) expectMissed.push({ type, timestamp: new Date(ts).toISOString(), payload });
  }
  const since = new Date(t0).toISOString();
  const polled = await page.evaluate(async (s) => {
    const r = await fetch("/api/events?since=" + encodeURIComponent(s));
    return { status: r.status, body: await r.json() };
  }, since);
  eq(polled.status, 200, "poll status");
  eq(polled.body, expectMissed, "polled envelopes");
  const forbidden = await page.evaluate(async (s) => {
    const r = await fetch("/api/events?channels=worker:w999&since=" + encodeURIComponent(s));
    return { status: r.status, body: await r.json() };
  }, since);
  eq([forbidden.status, forbidden.body.type, forbidden.body.payload.code], [403, "error", "FORBIDDEN"], "poll of a foreign channel");
  console.log("seed000 e2e ok:", wsEvents.length, "ws,", sseEvents.length, "sse,", polled.body.length, "polled");
} finally {
  await close();
  server.close();
}
