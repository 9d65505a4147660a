// A Socket.IO 4 server on the official Redis adapter: the peer that
// `roomcast-bench --peer socketio` measures against roomcast on the same
// machine, clients and publisher (docs/performance.md, run 19).
//
//   node server.js --listen 127.0.0.2:4000 --redis redis://127.0.0.1:6379
//
// A client joins the room named in its handshake query (`?room=team:7`)
// before the connect ack, as a roomcast client subscribes; events reach it
// through the adapter's Redis channel `socket.io#/#<room>#`, where the bench
// publishes them in the adapter's own format (as @socket.io/redis-emitter
// does). GET /readyz answers 200 once the adapter's Redis links are up.
import http from "node:http";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";

const arg = (name) => {
  const i = process.argv.indexOf(name);
  if (i < 0 || i + 1 >= process.argv.length) throw new Error(`missing ${name}`);
  return process.argv[i + 1];
};
const [host, port] = arg("--listen").split(":");
const redisUrl = arg("--redis");

let ready = false;
const httpServer = http.createServer((req, res) => {
  if (req.url === "/readyz") {
    res.writeHead(ready ? 200 : 503).end(ready ? "ready" : "starting");
  } else {
    res.writeHead(404).end();
  }
});
const pub = createClient({ url: redisUrl });
const sub = pub.duplicate();
await Promise.all([pub.connect(), sub.connect()]);
const io = new Server(httpServer, {
  adapter: createAdapter(pub, sub),
  transports: ["websocket"],
  // The bench's readers only read: no pings within a run (Socket.IO's
  // default would close them after 45 s without a pong).
  pingInterval: 600_000,
  pingTimeout: 600_000,
  maxHttpBufferSize: 64 * 1024,
});
io.use((socket, next) => {
  const room = socket.handshake.query.room;
  if (typeof room !== "string" || room === "") return next(new Error("room required"));
  socket.join(room);
  next();
});
httpServer.listen(Number(port), host, () => {
  ready = true;
});
for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => process.exit(0));
