// Shared helpers of the roomcast k6 scripts: settings from the environment,
// HS256 client tokens minted in the script, a publisher, and the native JSON
// protocol on /v1/ws (docs/protocol.md).
//
// Environment (all optional except JWT_SECRET and API_KEY):
//   ROOMCAST_URL  http base of a node or load balancer   (http://127.0.0.1:8080)
//   WS_URL        WebSocket base                          (ROOMCAST_URL with ws://)
//   JWT_SECRET    the nodes' HS256 secret (auth.jwt_secret): tokens are minted here
//   API_KEY       a publish API key (publish.api_keys)
//   TENANT        tenant of every token and event         (loadtest)
//   ROOMS         rooms team:1..team:ROOMS                 (10)

import http from 'k6/http';
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';
import { check } from 'k6';

export const BASE_URL = (__ENV.ROOMCAST_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
export const WS_URL = (__ENV.WS_URL || BASE_URL.replace(/^http/, 'ws')).replace(/\/+$/, '');
export const JWT_SECRET = __ENV.JWT_SECRET || '';
export const API_KEY = __ENV.API_KEY || '';
export const TENANT = __ENV.TENANT || 'loadtest';
export const ROOMS = intEnv('ROOMS', 10);

export function intEnv(name, fallback) {
  const v = __ENV[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`${name}=${v} is not a number`);
  return n;
}

export function requireSecrets() {
  if (!JWT_SECRET || !API_KEY) {
    throw new Error('set JWT_SECRET (the nodes\' HS256 secret) and API_KEY (a publish API key)');
  }
}

export function roomName(i) {
  return `team:${(i % ROOMS) + 1}`;
}

export function allTeams() {
  const teams = [];
  for (let i = 1; i <= ROOMS; i++) teams.push(String(i));
  return teams;
}

function b64url(s) {
  return encoding.b64encode(s, 'rawurl');
}

/** An HS256 client token for `sub`, granting every loadtest room (team claim). */
export function mintToken(sub, ttlSeconds = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const payload = b64url(JSON.stringify({
    sub, tenant: TENANT, teams: allTeams(), iat: now, exp: now + ttlSeconds,
  }));
  const sig = crypto.hmac('sha256', JWT_SECRET, `${header}.${payload}`, 'base64rawurl');
  return `${header}.${payload}.${sig}`;
}

/** Publishes one event into `room` through POST /v1/publish; `data.sent_ms` is the client clock. */
export function publish(room, seq, tags = {}) {
  const body = JSON.stringify({
    tenant: TENANT,
    rooms: [room],
    type: 'loadtest.tick',
    actor: 'k6',
    data: { seq, sent_ms: Date.now() },
  });
  const res = http.post(`${BASE_URL}/v1/publish`, body, {
    headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' },
    tags: Object.assign({ name: 'publish' }, tags),
  });
  check(res, { 'publish: 200': (r) => r.status === 200 });
  return res;
}

/** Compares two event ids `<ms>-<seq>`: negative, 0 or positive. */
export function compareIds(a, b) {
  const [ams, aseq] = a.split('-').map(Number);
  const [bms, bseq] = b.split('-').map(Number);
  return ams !== bms ? ams - bms : aseq - bseq;
}

/** Milliseconds from an event's publish time to now (`ts` of the event frame). */
export function eventAgeMs(ev) {
  if (typeof ev.ts === 'number') return Date.now() - ev.ts;
  if (ev.data && typeof ev.data.sent_ms === 'number') return Date.now() - ev.data.sent_ms;
  return null;
}

/**
 * Parses a text/event-stream body (possibly cut off mid-event) into
 * [{id, event, data}] of the complete events.
 */
export function parseSse(body) {
  const out = [];
  if (!body) return out;
  const blocks = String(body).replace(/\r\n?/g, '\n').split('\n\n');
  blocks.pop(); // the last block is incomplete (or empty)
  for (const block of blocks) {
    const ev = { id: null, event: 'message', data: '' };
    let hasData = false;
    for (const line of block.split('\n')) {
      if (line === '' || line.startsWith(':')) continue;
      const i = line.indexOf(':');
      const field = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? '' : line.slice(i + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'id') ev.id = value;
      else if (field === 'event') ev.event = value;
      else if (field === 'data') {
        ev.data += (hasData ? '\n' : '') + value;
        hasData = true;
      }
    }
    if (hasData) out.push(ev);
  }
  return out;
}
