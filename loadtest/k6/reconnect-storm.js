// Reconnect-and-resume storm: CLIENTS clients stay subscribed to a room while
// events are published, and every CYCLE_S seconds ALL of them drop their
// socket at the same moment (a node dying, a deploy without drain jitter) and
// reconnect at once (plus up to JITTER_MS), resubscribing with
// `since: {room: last id seen}`. Measures reconnect time (close -> welcome) and
// checks the server answers `recovered` for every resumed room.
//
// Resume from history is not implemented in the native handler yet: every
// resumed room answers `recovered: false` (the client must refetch). The
// script counts both answers; with REQUIRE_RESUME=1 it also requires
// recovered=true and no event at or before the resume point.
//
//   k6 run --no-usage-report -e JWT_SECRET=... -e API_KEY=... \
//     -e ROOMCAST_URL=http://127.0.0.1:8080 loadtest/k6/reconnect-storm.js
//
// Knobs: CLIENTS (100), CYCLES (3), CYCLE_S (3), JITTER_MS (0), ROOMS (10),
//        PUBLISH_RATE (20/s), P95_RECONNECT_MS (1000), REQUIRE_RESUME (0).

import { check } from 'k6';
import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout, clearTimeout } from 'k6/timers';
import {
  ROOMS, WS_URL, compareIds, intEnv, mintToken, publish, requireSecrets, roomName,
} from './lib/roomcast.js';

const CLIENTS = intEnv('CLIENTS', 100);
const CYCLES = intEnv('CYCLES', 3);
const CYCLE_S = intEnv('CYCLE_S', 3);
const JITTER_MS = intEnv('JITTER_MS', 0);
const PUBLISH_RATE = intEnv('PUBLISH_RATE', 20);
const REQUIRE_RESUME = intEnv('REQUIRE_RESUME', 0) === 1;
const TOTAL_S = CYCLES * CYCLE_S;

const reconnectMs = new Trend('roomcast_reconnect_ms', true);
const resumeAnswered = new Rate('roomcast_resume_answered');
const resumeRecovered = new Rate('roomcast_resume_recovered');
const resumeReplayOk = new Rate('roomcast_resume_replay_ok');
const sessionOk = new Rate('roomcast_session_ok');
const reconnects = new Counter('roomcast_reconnects');

const thresholds = {
  roomcast_session_ok: ['rate>0.99'],
  roomcast_reconnect_ms: [`p(95)<${intEnv('P95_RECONNECT_MS', 1000)}`],
  roomcast_resume_answered: ['rate>0.99'],
  roomcast_reconnects: [`count>=${Math.floor(CLIENTS * (CYCLES - 1) * 0.95)}`],
  'http_req_failed{scenario:publisher}': ['rate<0.01'],
  checks: ['rate>0.99'],
};
if (REQUIRE_RESUME) {
  thresholds.roomcast_resume_recovered = ['rate>0.99'];
  thresholds.roomcast_resume_replay_ok = ['rate>0.999'];
}

export const options = {
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  scenarios: {
    clients: {
      executor: 'per-vu-iterations',
      exec: 'client',
      vus: CLIENTS,
      iterations: 1,
      maxDuration: `${TOTAL_S + 30}s`,
    },
    publisher: {
      executor: 'constant-arrival-rate',
      exec: 'publisher',
      rate: PUBLISH_RATE,
      timeUnit: '1s',
      duration: `${TOTAL_S}s`,
      preAllocatedVUs: 3,
      maxVUs: 30,
    },
  },
  thresholds,
};

export function setup() {
  requireSecrets();
  // Every client drops at the same wall-clock instants: the storm.
  return { t0: Date.now() + 2000 };
}

export function client(data) {
  const vu = __VU;
  const room = roomName(vu);
  const token = mintToken(`rc-${vu}`);
  const state = { lastId: null, cycle: 0 };
  connect(vu, room, token, state, data.t0, null);
}

function connect(vu, room, token, state, t0, droppedAt) {
  const cycle = state.cycle;
  const resumeFrom = state.lastId;
  let subscribed = false;
  const ws = new WebSocket(`${WS_URL}/v1/ws`, null, {
    headers: { Authorization: `Bearer ${token}` },
    tags: { name: 'ws' },
  });
  const endOfCycle = t0 + (cycle + 1) * CYCLE_S * 1000;
  const drop = setTimeout(() => ws.close(), Math.max(0, endOfCycle - Date.now()));

  ws.onmessage = (m) => {
    const f = JSON.parse(m.data);
    if (f.op === 'welcome') {
      if (droppedAt !== null) {
        reconnectMs.add(Date.now() - droppedAt);
        reconnects.add(1);
      }
      const sub = { op: 'subscribe', ref: `c${cycle}`, rooms: [room] };
      if (resumeFrom) sub.since = { [room]: resumeFrom };
      ws.send(JSON.stringify(sub));
    } else if (f.op === 'subscribed') {
      subscribed = check(f, { 'subscribed: room granted': (x) => x.rooms.includes(room) });
      sessionOk.add(subscribed);
      if (resumeFrom) {
        const answered = !!f.recovered && typeof f.recovered[room] === 'boolean';
        resumeAnswered.add(answered);
        if (answered) resumeRecovered.add(f.recovered[room]);
      }
    } else if (f.op === 'event') {
      if (resumeFrom && state.lastId === resumeFrom) {
        // first event after a resume: must be newer than the resume point
        resumeReplayOk.add(compareIds(f.id, resumeFrom) > 0);
      }
      if (state.lastId === null || compareIds(f.id, state.lastId) > 0) state.lastId = f.id;
    } else if (f.op === 'error') {
      check(f, { 'no error frames': () => false });
    }
  };
  ws.onerror = (e) => {
    check(null, { 'websocket: no error': () => false });
    console.warn(`client ${vu} cycle ${cycle}: websocket error: ${e && e.error}`);
  };
  ws.onclose = (e) => {
    clearTimeout(drop);
    if (!subscribed) {
      sessionOk.add(false);
      console.warn(`client ${vu} cycle ${cycle}: closed (${e && e.code} ${e && e.reason}) before subscribed`);
    }
    state.cycle++;
    if (state.cycle < CYCLES) {
      const at = Date.now();
      setTimeout(() => connect(vu, room, token, state, t0, at), JITTER_MS > 0 ? Math.random() * JITTER_MS : 0);
    }
  };
}

// Round-robin over the rooms, so every room gets PUBLISH_RATE / ROOMS events/s.
export function publisher() {
  const seq = exec.scenario.iterationInTest;
  publish(roomName(seq), seq);
}
