// Seed 002 proof: a plain WebSocket client (the `ws` package) against two
// roomcast nodes. Driven by crates/roomcast/tests/seed002.rs, which starts
// Redis, the nodes and an HTTP authorization callback, and passes:
//   NODE_A, NODE_B        host:port of two nodes
//   TOKEN_MEMBER          JWT of user u1, member of team t1
//   TOKEN_OUTSIDER        JWT of user u2, member of team t2 only
//   API_KEY, TENANT       for POST /v1/publish
// Exits 0 when every expectation holds; prints what failed otherwise.
import WebSocket from "ws";

const { NODE_A, NODE_B, TOKEN_MEMBER, TOKEN_OUTSIDER, API_KEY, TENANT } = process.env;
const PATIENCE_MS = 5000;

function fail(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

// JSON with object keys sorted: objects are unordered.
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
  if (a !== e) fail(`${what}: expected ${e}, got ${a}`);
  console.log(`ok: ${what}`);
}

// A client whose incoming messages queue up, read one at a time.
function open(node, token) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://${node}/realtime?token=${encodeURIComponent(token)}`);
    const queue = [];
    const waiters = [];
    ws.on("message", (data) => {
      const msg = JSON.parse(data.toString());
      const w = waiters.shift();
      if (w) w(msg);
      else queue.push(msg);
    });
    ws.on("unexpected-response", (_req, res) => reject(new Error(`HTTP ${res.statusCode}`)));
    ws.on("error", reject);
    ws.on("open", () =>
      resolve({
        ws,
        send: (v) => ws.send(JSON.stringify(v)),
        next: () =>
          queue.length
            ? Promise.resolve(queue.shift())
            : new Promise((res, rej) => {
                const t = setTimeout(() => rej(new Error("no message in time")), PATIENCE_MS);
                waiters.push((m) => {
                  clearTimeout(t);
                  res(m);
                });
              }),
      }),
    );
  });
}

async function publish(node, rooms, type, data, actor) {
  const res = await fetch(`http://${node}/v1/publish`, {
    method: "POST",
    headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ tenant: TENANT, rooms, type, actor, data }),
  });
  if (res.status !== 200) fail(`publish ${type} to ${rooms}: HTTP ${res.status} ${await res.text()}`);
  return (await res.json()).ids;
}

// The next message must be the activity `fenceData` marks; nothing before it.
async function expectOnly(client, fenceData, what) {
  const m = await client.next();
  same(m.type === "activity" ? m.activity.data : m, fenceData, what);
}

async function main() {
  // A bad token is refused before the upgrade.
  try {
    await open(NODE_A, "not-a-jwt");
    fail("a bad token was accepted");
  } catch (e) {
    same(e.message, "HTTP 401", "bad token refused with 401");
  }

  const member = await open(NODE_A, TOKEN_MEMBER);
  const outsider = await open(NODE_B, TOKEN_OUTSIDER);

  member.send({ type: "subscribe", teamId: "t1" });
  same(await member.next(), { type: "subscribed", teamId: "t1" }, "member subscribed to t1");

  outsider.send({ type: "subscribe", teamId: "t1" });
  const denied = await outsider.next();
  same([denied.type, denied.code, denied.teamId], ["error", "AUTHORIZATION_FAILED", "t1"], "non-member denied t1");
  outsider.send({ type: "subscribe", teamId: "t2" });
  same(await outsider.next(), { type: "subscribed", teamId: "t2" }, "outsider subscribed to its own t2");

  // A team-wide event, published on the other node.
  await publish(NODE_B, ["team:t1"], "task.created", { id: "k1", teamId: "t1", title: "Ship it" }, "u9");
  const created = await member.next();
  same(created.type, "activity", "member gets an activity");
  same(
    { ...created.activity, ts: typeof created.activity.ts },
    { type: "task.created", teamId: "t1", actorUserId: "u9", ts: "number", data: { id: "k1", teamId: "t1", title: "Ship it" } },
    "activity carries type, teamId, actorUserId, ts, data",
  );
  // Fence: the outsider's next message is its own team's event, so nothing of t1 reached it.
  await publish(NODE_A, ["team:t2"], "task.updated", { fence: "outsider-1" }, "u9");
  await expectOnly(outsider, { fence: "outsider-1" }, "non-member got the error and nothing of t1");

  // Task rooms: team membership plus the authorization callback.
  member.send({ type: "subscribe", teamId: "t1", taskId: "k1" });
  same(await member.next(), { type: "subscribed", teamId: "t1", taskId: "k1" }, "task room k1 allowed by the callback");
  member.send({ type: "subscribe", teamId: "t1", taskId: "k2" });
  const k2 = await member.next();
  same([k2.type, k2.code, k2.taskId], ["error", "AUTHORIZATION_FAILED", "k2"], "task room k2 denied by the callback");
  member.send({ type: "subscribe", teamId: "t2", taskId: "k1" });
  const t2 = await member.next();
  same([t2.type, t2.code], ["error", "AUTHORIZATION_FAILED"], "task of a team the user is not in is denied");
  member.send({ type: "subscribe" });
  same((await member.next()).code, "INVALID_MESSAGE", "a malformed message gets INVALID_MESSAGE");

  // Narrow events go to the task room; the team room does not see them.
  await publish(NODE_B, ["task:k1"], "comment.created", { taskId: "k1", teamId: "t1", text: "hi" }, "u3");
  const comment = await member.next();
  same(
    [comment.activity.type, comment.activity.teamId, comment.activity.actorUserId, comment.activity.data.text],
    ["comment.created", "t1", "u3", "hi"],
    "comment.created arrives through task:k1",
  );
  await publish(NODE_B, ["task:k2"], "comment.created", { taskId: "k2", teamId: "t1", text: "secret" }, "u3");
  await publish(NODE_B, ["task:k1"], "presence.joined", { taskId: "k1", teamId: "t1", userId: "u3" }, "u3");
  const joined = await member.next();
  same([joined.activity.type, joined.activity.data.userId], ["presence.joined", "u3"], "presence.joined on task:k1, nothing of k2");

  member.send({ type: "unsubscribe", teamId: "t1", taskId: "k1" });
  same(await member.next(), { type: "unsubscribed", teamId: "t1", taskId: "k1" }, "unsubscribed from task k1");
  await publish(NODE_B, ["task:k1"], "presence.left", { taskId: "k1", teamId: "t1" }, "u3");
  await publish(NODE_B, ["team:t1"], "task.updated", { fence: "member-1" }, "u3");
  await expectOnly(member, { fence: "member-1" }, "nothing of task:k1 after unsubscribe");

  member.send({ type: "unsubscribe", teamId: "t1" });
  same(await member.next(), { type: "unsubscribed", teamId: "t1" }, "unsubscribed from t1");

  member.ws.close();
  outsider.ws.close();
  console.log("seed002: all good");
  process.exit(0);
}

main().catch((e) => fail(e.stack || String(e)));
