// Connect storm: CONNECTIONS clients open a WebSocket within RAMP_S seconds,
// authenticate, subscribe to a room, hold the socket for HOLD_S seconds and
// close. Measures the handshake, the time to the `welcome` frame and to the
// `subscribed` reply.
//
//   k6 run --no-usage-report -e JWT_SECRET=... -e API_KEY=... \
//     -e ROOMCAST_URL=http://127.0.0.1:8080 -e CONNECTIONS=300 loadtest/k6/connect-storm.js
//
// Knobs: CONNECTIONS (300), RAMP_S (3), HOLD_S (5), ROOMS (10),
//        P95_WELCOME_MS (1000), P95_SUBSCRIBE_MS (500).

import { check } from 'k6';
import { Rate, Trend } from 'k6/metrics';
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout, clearTimeout } from 'k6/timers';
import { WS_URL, intEnv, mintToken, requireSecrets, roomName } from './lib/roomcast.js';

const CONNECTIONS = intEnv('CONNECTIONS', 300);
const RAMP_S = intEnv('RAMP_S', 3);
const HOLD_S = intEnv('HOLD_S', 5);

const welcomeMs = new Trend('roomcast_connect_to_welcome_ms', true);
const subscribeMs = new Trend('roomcast_subscribe_ack_ms', true);
const sessionOk = new Rate('roomcast_session_ok');

export const options = {
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  scenarios: {
    storm: {
      executor: 'per-vu-iterations',
      vus: CONNECTIONS,
      iterations: 1,
      maxDuration: `${RAMP_S + HOLD_S + 30}s`,
    },
  },
  thresholds: {
    roomcast_session_ok: ['rate>0.99'],
    roomcast_connect_to_welcome_ms: [`p(95)<${intEnv('P95_WELCOME_MS', 1000)}`],
    roomcast_subscribe_ack_ms: [`p(95)<${intEnv('P95_SUBSCRIBE_MS', 500)}`],
    ws_connecting: [`p(95)<${intEnv('P95_WELCOME_MS', 1000)}`],
    checks: ['rate>0.99'],
  },
};

export function setup() {
  requireSecrets();
}

export default function () {
  const vu = __VU;
  const room = roomName(vu);
  const token = mintToken(`storm-${vu}`);
  // Spread the connects over the ramp so the storm has a shape, not one instant.
  const delay = RAMP_S > 0 ? Math.floor(Math.random() * RAMP_S * 1000) : 0;
  setTimeout(() => connect(vu, room, token), delay);
}

function connect(vu, room, token) {
  const started = Date.now();
  let welcomed = false;
  let subscribeSent = 0;
  let done = false;
  const finish = (ok) => {
    if (done) return;
    done = true;
    sessionOk.add(ok);
  };
  const ws = new WebSocket(`${WS_URL}/v1/ws`, null, {
    headers: { Authorization: `Bearer ${token}` },
    tags: { name: 'ws' },
  });
  let opened = false;
  ws.onopen = () => {
    opened = true;
  };
  const giveUp = setTimeout(() => {
    console.warn(`client ${vu}: gave up after ${HOLD_S + 15}s: opened=${opened} welcomed=${welcomed}`);
    finish(false);
    ws.close();
  }, (HOLD_S + 15) * 1000);

  ws.onmessage = (m) => {
    const f = JSON.parse(m.data);
    if (f.op === 'welcome' && !welcomed) {
      welcomed = true;
      welcomeMs.add(Date.now() - started);
      subscribeSent = Date.now();
      ws.send(JSON.stringify({ op: 'subscribe', ref: `s${vu}`, rooms: [room] }));
    } else if (f.op === 'subscribed' && !done) {
      subscribeMs.add(Date.now() - subscribeSent);
      finish(check(f, {
        'subscribed: ref echoed': (x) => x.ref === `s${vu}`,
        'subscribed: room granted': (x) => Array.isArray(x.rooms) && x.rooms.includes(room),
        'subscribed: nothing denied': (x) => Array.isArray(x.denied) && x.denied.length === 0,
      }));
      clearTimeout(giveUp);
      setTimeout(() => ws.close(), HOLD_S * 1000);
    } else if (f.op === 'error') {
      check(f, { 'no error frames': () => false });
    }
  };
  ws.onerror = (e) => {
    check(e, { 'websocket: no error': () => false });
    console.warn(`client ${vu}: websocket error: ${e && e.error}`);
  };
  ws.onclose = (e) => {
    clearTimeout(giveUp);
    if (!done) console.warn(`client ${vu}: closed (${e && e.code} ${e && e.reason}) before subscribed`);
    finish(false); // no-op when the session already succeeded
  };
}
