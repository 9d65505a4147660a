// Seed 003 proof: the official socket.io-client (v4) against two roomcast
// nodes. Driven by crates/roomcast/tests/seed003.rs, which starts Redis, the
// nodes and an HTTP authorization callback, and passes:
//   NODE_A, NODE_B             http://host:port of two nodes
//   TOKEN_U1, TOKEN_U2, TOKEN_U3  JWTs (no tenant claim) of users u1, u2, u3;
//                              the callback lets u1 and u2 into conversation:c1
//   TOKEN_EXPIRED              an expired JWT of u1
//   API_KEY, TENANT            for POST /v1/publish
// Exits 0 when every expectation holds; prints what failed otherwise.
import { io } from "socket.io-client";

const { NODE_A, NODE_B, TOKEN_U1, TOKEN_U2, TOKEN_U3, TOKEN_EXPIRED, API_KEY, TENANT } =
  process.env;
const PATIENCE_MS = 5000;

function fail(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

function check(cond, what, detail) {
  if (!cond) fail(`${what}${detail === undefined ? "" : `: ${JSON.stringify(detail)}`}`);
  console.log(`ok: ${what}`);
}

// A socket whose every event is recorded, in order.
function connect(base, token, opts = {}) {
  const socket = io(`${base}/ws/app`, {
    auth: { token },
    reconnection: false,
    forceNew: true,
    ...opts,
  });
  socket.seen = [];
  socket.onAny((name, data) => socket.seen.push([name, data]));
  return socket;
}

// Resolves with the first recorded event matching `pred` (past or future).
function waitEvent(socket, what, pred) {
  return new Promise((resolve) => {
    const t = setTimeout(
      () => fail(`${what}: not seen in time; seen ${JSON.stringify(socket.seen)}`),
      PATIENCE_MS,
    );
    const look = () => {
      const hit = socket.seen.find(([n, d]) => pred(n, d));
      if (hit) {
        clearTimeout(t);
        socket.offAny(look);
        resolve(hit[1]);
        return true;
      }
      return false;
    };
    if (!look()) socket.onAny(look);
  });
}

function waitFor(emitter, event, what) {
  return new Promise((resolve) => {
    const t = setTimeout(() => fail(`${what}: no ${event} in time`), PATIENCE_MS);
    emitter.once(event, (v) => {
      clearTimeout(t);
      resolve(v);
    });
  });
}

async function connected(socket, what) {
  if (!socket.connected) {
    const err = new Promise((_, rej) => socket.once("connect_error", rej));
    await Promise.race([waitFor(socket, "connect", what), err]).catch((e) =>
      fail(`${what}: connect_error ${e.message} ${JSON.stringify(e.data)}`),
    );
  }
  console.log(`ok: ${what} connected (${socket.io.engine.transport.name})`);
}

async function publish(rooms, type, data) {
  const res = await fetch(`${NODE_A}/v1/publish`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify({ tenant: TENANT, rooms, type, data }),
  });
  if (res.status !== 200) fail(`publish ${type}: HTTP ${res.status} ${await res.text()}`);
}

const count = (socket, name, pred = () => true) =>
  socket.seen.filter(([n, d]) => n === name && pred(d)).length;

// 1. Default transports (polling, then the upgrade) on node A.
const s1 = connect(NODE_A, TOKEN_U1);
await connected(s1, "u1 with default transports on A");
const ready = await waitEvent(s1, "notifications:ready", (n) => n === "notifications:ready");
check(ready.userId === "u1" && typeof ready.message === "string", "notifications:ready", ready);
if (s1.io.engine.transport.name !== "websocket") {
  await waitFor(s1.io.engine, "upgrade", "polling → websocket upgrade");
}
check(s1.io.engine.transport.name === "websocket", "u1 upgraded to websocket");

// 2. WebSocket only, on node B; polling only, on node B.
const s2 = connect(NODE_B, TOKEN_U2, { transports: ["websocket"] });
await connected(s2, "u2 with transports [websocket] on B");
const s3 = connect(NODE_B, TOKEN_U3, { transports: ["polling"], upgrade: false });
await connected(s3, "u3 with transports [polling] on B");
check(s3.io.engine.transport.name === "polling", "u3 stays on polling");

// 3. Presence across nodes: u1 (on A) sees u2 come online (on B).
const p2 = await waitEvent(
  s1,
  "presence:update of u2 on A",
  (n, d) => n === "presence:update" && d.userId === "u2" && d.isOnline,
);
check(
  p2.sockets.length === 1 &&
    p2.sockets[0].socketId &&
    typeof p2.sockets[0].connectedAt === "number" &&
    typeof p2.lastSeen === "number" &&
    "userAgent" in p2.sockets[0] &&
    "ip" in p2.sockets[0],
  "presence snapshot shape",
  p2,
);
// The node reports the TCP peer's address (no X-Forwarded-For trusted).
check(p2.sockets[0].ip === "127.0.0.1", "presence ip is the loopback address", p2);

// 4. Joins with acks: members succeed, u3 is refused.
check((await s1.emitWithAck("conversations:join", { conversationId: "c1" })).success === true, "u1 joins c1");
check((await s2.emitWithAck("conversations:join", { conversationId: "c1" })).success === true, "u2 joins c1");
const refused = await s3.emitWithAck("conversations:join", { conversationId: "c1" });
check(refused.success === false && typeof refused.message === "string", "u3 refused from c1", refused);
const invalid = await s1.emitWithAck("conversations:join", {});
check(invalid.success === false, "join without conversationId refused", invalid);

// 5. messages:new to the conversation and every participant's room: once each.
const message = { conversationId: "c1", message: { id: "m1", body: "hi" }, senderId: "u1", recipients: ["u1", "u2"] };
await publish(["conversation:c1", "user:u1", "user:u2"], "messages:new", message);
await publish(["user:u1", "user:u2", "user:u3"], "notifications:new", { eventKey: "fence.1", notification: {} });
for (const [s, who] of [[s1, "u1"], [s2, "u2"], [s3, "u3"]]) {
  await waitEvent(s, `fence.1 at ${who}`, (n, d) => n === "notifications:new" && d.eventKey === "fence.1");
}
check(count(s1, "messages:new") === 1, "u1 got messages:new once", s1.seen);
check(count(s2, "messages:new") === 1, "u2 got messages:new once", s2.seen);
check(count(s3, "messages:new") === 0, "u3 got no messages:new", s3.seen);
const got = s1.seen.find(([n]) => n === "messages:new")[1];
check(JSON.stringify(got) === JSON.stringify(message), "messages:new payload is the published data", got);

// 6. Leave: u2 no longer gets the conversation's broadcasts.
s2.emit("conversations:leave", { conversationId: "c1" });
check((await s2.emitWithAck("presence:heartbeat")).success === true, "heartbeat ack (orders the leave before the publish)");
await publish(["conversation:c1"], "messages:updated", { conversationId: "c1", message: { id: "m1" } });
await publish(["user:u1", "user:u2"], "notifications:new", { eventKey: "fence.2", notification: {} });
await waitEvent(s1, "fence.2 at u1", (n, d) => n === "notifications:new" && d.eventKey === "fence.2");
await waitEvent(s2, "fence.2 at u2", (n, d) => n === "notifications:new" && d.eventKey === "fence.2");
check(count(s1, "messages:updated") === 1, "u1 got messages:updated");
check(count(s2, "messages:updated") === 0, "u2 left c1: no messages:updated");

// 7. Heartbeat: a snapshot of u2 reaches u1 on the other node.
await waitEvent(s1, "presence:update after u2's heartbeat", (n, d) => n === "presence:update" && d.userId === "u2" && d.sockets.length === 1 && d.lastSeen > p2.lastSeen - 1 && s1.seen.filter(([m, e]) => m === "presence:update" && e.userId === "u2").length >= 2);

// 8. Errors: expired and invalid tokens, another namespace.
for (const [token, code] of [[TOKEN_EXPIRED, "socket_error:token_expired"], ["not-a-jwt", "socket_error:unauthorized"]]) {
  for (const transports of [["websocket"], ["polling", "websocket"]]) {
    const bad = connect(NODE_A, token, { transports });
    const err = await waitFor(bad, "connect_error", code);
    check(err.message === code && err.data && err.data.code === code, `${code} over ${transports[0]}`, { message: err.message, data: err.data });
    bad.close();
  }
}
const other = io(`${NODE_A}/other`, { auth: { token: TOKEN_U1 }, reconnection: false, forceNew: true });
const nsErr = await waitFor(other, "connect_error", "another namespace");
check(nsErr.message === "Invalid namespace", "another namespace is refused", nsErr.message);
other.close();

// 9. A polling sid is only known to its node (sticky sessions).
const sid = s3.io.engine.id;
const wrongNode = await fetch(`${NODE_A}/socket.io/?EIO=4&transport=polling&sid=${sid}`);
const body = await wrongNode.json();
check(wrongNode.status === 400 && body.code === 1 && body.message === "Session ID unknown", "unknown sid → 400 code 1", body);

// 10. Payload cap: an inbound message over maxPayload ends the socket.
const big = connect(NODE_A, TOKEN_U1, { transports: ["websocket"] });
await connected(big, "u1 second socket");
big.emit("presence:heartbeat", "x".repeat(6000));
const why = await waitFor(big, "disconnect", "over maxPayload");
check(why.startsWith("transport"), "oversized message closes the socket", why);

// 11. Disconnect: u1 sees u2 go offline.
s2.close();
await waitEvent(s1, "u2 offline", (n, d) => n === "presence:update" && d.userId === "u2" && d.isOnline === false && d.sockets.length === 0);
check(true, "presence:update isOnline=false after disconnect");

// Polling-only u3 leaves: its close packet goes out in a POST.
s3.close();
await waitEvent(s1, "u3 offline", (n, d) => n === "presence:update" && d.userId === "u3" && d.isOnline === false);
s1.close();
console.log("all seed003 expectations hold");
