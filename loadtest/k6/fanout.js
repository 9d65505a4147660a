// Steady fan-out: SUBSCRIBERS clients each hold one WebSocket subscribed to
// ROOMS_PER_CLIENT of ROOMS rooms, while a publisher posts PUBLISH_RATE
// events/s through POST /v1/publish (round-robin over the nodes behind a load
// balancer, so most events cross nodes through Redis). Every received event's
// age is measured from its `ts` (the publish time the node stamped) to
// arrival: publish -> Redis -> fan-out -> socket -> client.
//
//   k6 run --no-usage-report -e JWT_SECRET=... -e API_KEY=... \
//     -e ROOMCAST_URL=http://127.0.0.1:8080 loadtest/k6/fanout.js
//
// Knobs: SUBSCRIBERS (200), ROOMS (10), ROOMS_PER_CLIENT (2), PUBLISH_RATE (50/s),
//        DURATION_S (10), WARMUP_S (3), P99_MS (250), P50_MS (50).
// Publisher and clients share a clock here; across machines `ts` includes skew.

import { check } from 'k6';
import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout, clearTimeout } from 'k6/timers';
import {
  ROOMS, WS_URL, compareIds, eventAgeMs, intEnv, mintToken, publish, requireSecrets, roomName,
} from './lib/roomcast.js';

const SUBSCRIBERS = intEnv('SUBSCRIBERS', 200);
const ROOMS_PER_CLIENT = Math.min(intEnv('ROOMS_PER_CLIENT', 2), ROOMS);
const PUBLISH_RATE = intEnv('PUBLISH_RATE', 50);
const DURATION_S = intEnv('DURATION_S', 10);
const WARMUP_S = intEnv('WARMUP_S', 3);

const latency = new Trend('roomcast_publish_to_receive_ms', true);
const received = new Counter('roomcast_events_received');
const inOrder = new Rate('roomcast_event_order_ok');
const subscriberGotEvents = new Rate('roomcast_subscriber_got_events');
const sessionOk = new Rate('roomcast_session_ok');

export const options = {
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  scenarios: {
    subscribers: {
      executor: 'per-vu-iterations',
      exec: 'subscriber',
      vus: SUBSCRIBERS,
      iterations: 1,
      maxDuration: `${WARMUP_S + DURATION_S + 30}s`,
    },
    publisher: {
      executor: 'constant-arrival-rate',
      exec: 'publisher',
      rate: PUBLISH_RATE,
      timeUnit: '1s',
      duration: `${DURATION_S}s`,
      startTime: `${WARMUP_S}s`,
      preAllocatedVUs: 5,
      maxVUs: 50,
    },
  },
  thresholds: {
    roomcast_publish_to_receive_ms: [
      `p(99)<${intEnv('P99_MS', 250)}`,
      `p(50)<${intEnv('P50_MS', 50)}`,
    ],
    roomcast_events_received: ['count>0'],
    roomcast_event_order_ok: ['rate>0.999'],
    roomcast_subscriber_got_events: ['rate>0.99'],
    roomcast_session_ok: ['rate>0.99'],
    'http_req_failed{scenario:publisher}': ['rate<0.01'],
    'http_req_duration{scenario:publisher}': ['p(95)<200'],
    checks: ['rate>0.99'],
  },
};

export function setup() {
  requireSecrets();
}

export function subscriber() {
  const vu = __VU;
  const rooms = [];
  for (let i = 0; i < ROOMS_PER_CLIENT; i++) rooms.push(roomName(vu + i));
  const lastId = {};
  let count = 0;
  let subscribed = false;
  const ws = new WebSocket(`${WS_URL}/v1/ws`, null, {
    headers: { Authorization: `Bearer ${mintToken(`fan-${vu}`)}` },
    tags: { name: 'ws' },
  });
  // Hold the socket through the publishing window, plus time for the tail.
  const stop = setTimeout(() => ws.close(), (WARMUP_S + DURATION_S + 2) * 1000);

  ws.onmessage = (m) => {
    const f = JSON.parse(m.data);
    if (f.op === 'welcome') {
      ws.send(JSON.stringify({ op: 'subscribe', ref: '1', rooms }));
    } else if (f.op === 'subscribed') {
      subscribed = check(f, {
        'subscribed: every room granted': (x) => rooms.every((r) => x.rooms.includes(r)),
      });
      sessionOk.add(subscribed);
    } else if (f.op === 'event') {
      count++;
      received.add(1);
      const age = eventAgeMs(f);
      if (age !== null) latency.add(age);
      if (lastId[f.room] !== undefined) inOrder.add(compareIds(f.id, lastId[f.room]) > 0);
      lastId[f.room] = f.id;
    } else if (f.op === 'error') {
      check(f, { 'no error frames': () => false });
    }
  };
  ws.onerror = (e) => {
    check(null, { 'websocket: no error': () => false });
    console.warn(`subscriber ${vu}: websocket error: ${e && e.error}`);
  };
  ws.onclose = (e) => {
    clearTimeout(stop);
    if (!subscribed) sessionOk.add(false);
    subscriberGotEvents.add(count > 0);
    if (!subscribed || count === 0) {
      console.warn(`subscriber ${vu}: closed (${e && e.code} ${e && e.reason}) subscribed=${subscribed} events=${count}`);
    }
  };
}

// Round-robin over the rooms, so every room gets PUBLISH_RATE / ROOMS events/s.
export function publisher() {
  const seq = exec.scenario.iterationInTest;
  publish(roomName(seq), seq);
}
