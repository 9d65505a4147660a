//! Presence on Redis: [`roomcast_broker::Presence`] for [`RedisBroker`],
//! shared by every node (see docs/redis.md, "Presence").
//!
//! Per room, three keys under the room's hash tag (one Cluster slot):
//!
//! ```text
//! <prefix>{<tenant>/<room>}:p    HASH session → entry  (1\t<user>\t<node>\t<connected_at>\t<last_seen>[\t<user agent>],
//!                                                        or with an IP: 2\t<user>\t<node>\t<connected_at>\t<last_seen>\t<ip>[\t<user agent>])
//! <prefix>{<tenant>/<room>}:pz   ZSET session → expiry (unix ms, the writer's clock)
//! <prefix>{<tenant>/<room>}:pu   HASH user → number of entries of that user in :p
//! <prefix>{<tenant>/<room>}:pr   STRING mark: the room is listed in the registry
//! ```
//!
//! Every upsert/remove/expiry decision is one Lua script on those keys, so
//! it is atomic per room: `:pu` counts a user's entries, and the change is
//! `UserJoined` when a count goes 0 → 1 and `UserLeft` when it goes 1 → 0.
//! Whoever's script removes the last entry reports the left, so concurrent
//! sweeps never report one lapse twice.
//!
//! To find rooms with lapsed entries, a registry sharded over
//! [`PRESENCE_REGISTRY_SHARDS`] hash tags (`{presence:<n>}`, so in Cluster
//! the shards spread over the masters):
//!
//! ```text
//! <prefix>{presence:<n>}:rooms   ZSET <tenant>/<room> → due (ms): no entry lapses before it
//! <prefix>{presence:<n>}:gen     HASH <tenant>/<room> → generation (bumped by every registration)
//! <prefix>{presence:<n>}:seq     STRING counter the generations come from
//! ```
//!
//! The registry lives in other slots than the rooms, so it is kept by
//! separate scripts whose ordering makes it safe: an upsert registers the
//! room *after* its room script whenever the room was empty, its earliest
//! expiry went down, or it lacks the `:pr` mark (`ZADD LT` + a new
//! generation; then the mark is set, so a failed registration is retried
//! by the next heartbeat), and a sweep moves a
//! room's due time (or deregisters an emptied room) only if neither the
//! due time nor the generation changed since it read them. A due time may
//! be early (a harmless visit), never late; an emptied room is never
//! deregistered past a concurrent first join.

use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::FromRedisValue;
use roomcast_broker::{BrokerError, Presence, PresenceChange, PresenceEntry};
use roomcast_protocol::{RoomKey, RoomName, SessionId, TenantId, UserId};

use crate::broker::RedisBroker;
use crate::commands::Commands;
use crate::names::{slot_of, Names};

/// Number of presence registry shards (`<prefix>{presence:<n>}:…`,
/// `n < 16`). Part of the contract: every node of a deployment must agree.
pub const PRESENCE_REGISTRY_SHARDS: u16 = 16;

/// Presence keys of a room outlive its latest entry's expiry by this much
/// (a Redis TTL refreshed by every upsert): a safety net that frees a room
/// nobody swept (every node down), never the normal path.
pub const PRESENCE_KEY_GRACE: Duration = Duration::from_secs(3600);

/// Rooms a sweep takes from one registry shard per round, and lapsed
/// entries one room script drops per call.
const SWEEP_BATCH: usize = 256;
/// Rounds per registry shard per `expire` call (a busy backlog is finished
/// by the next call).
const SWEEP_ROUNDS: usize = 16;

/// Entry encoding version (the first field): 1 without an IP, 2 with one.
/// An entry without an IP is still written as 1, so nodes that only read 1
/// (before the IP) keep seeing those during a rolling upgrade.
const ENTRY_VERSION: &str = "1";
const ENTRY_VERSION_IP: &str = "2";

/// `KEYS` = `:p`, `:pz`, `:pu`, `:pr`; `ARGV` = session, user, encoded
/// entry, expiry ms, now ms, key grace ms. Returns `{joined (0|1), register
/// (0|1)}`: `register` when the room was empty, its earliest expiry went
/// down, or it is not marked as registered.
const UPSERT: &str = r#"local function user_of(v) return string.match(v, '^[^\t]*\t([^\t]*)') end
local expires = tonumber(ARGV[4])
local low = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local register = 0
if low[1] == nil or expires < tonumber(low[2]) or redis.call('EXISTS', KEYS[4]) == 0 then
  register = 1
end
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
local joined = 0
local prev = nil
if old then prev = user_of(old) end
if prev ~= ARGV[2] then
  if prev and redis.call('HINCRBY', KEYS[3], prev, -1) <= 0 then
    redis.call('HDEL', KEYS[3], prev)
  end
  if redis.call('HINCRBY', KEYS[3], ARGV[2], 1) == 1 then joined = 1 end
end
local high = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
local keep = tonumber(high[2]) - tonumber(ARGV[5]) + tonumber(ARGV[6])
if keep < 1000 then keep = 1000 end
keep = string.format('%.0f', keep)
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], keep) end
return {joined, register}
"#;

/// `KEYS` = `:p`, `:pz`, `:pu`, `:pr`; `ARGV` = session. Returns 1 when the
/// session's user has no entry left (`UserLeft`), else 0.
const REMOVE: &str = r#"local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('DEL', KEYS[4]) end
local user = string.match(old, '^[^\t]*\t([^\t]*)')
if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
  redis.call('HDEL', KEYS[3], user)
  return 1
end
return 0
"#;

/// `KEYS` = `:p`, `:pz`; `ARGV` = now ms. Returns `{{session, entry}, …}`
/// of the entries expiring after now.
const MEMBERS: &str = r#"local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')
local out = {}
for _, s in ipairs(live) do
  local v = redis.call('HGET', KEYS[1], s)
  if v then out[#out + 1] = {s, v} end
end
return out
"#;

/// `KEYS` = `:p`, `:pz`, `:pu`, `:pr`; `ARGV` = now ms, most entries to
/// drop. Drops entries expiring at or before now; returns `{next_due,
/// user…}`: the earliest remaining expiry (`''` when the room is empty: the
/// mark is deleted, the sweep deregisters the room) and the users whose
/// last entry was dropped.
const EXPIRE: &str = r#"local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {''}
for _, s in ipairs(gone) do
  redis.call('ZREM', KEYS[2], s)
  local v = redis.call('HGET', KEYS[1], s)
  if v then
    redis.call('HDEL', KEYS[1], s)
    local user = string.match(v, '^[^\t]*\t([^\t]*)')
    if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
      redis.call('HDEL', KEYS[3], user)
      out[#out + 1] = user
    end
  end
end
local low = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if low[1] then out[1] = low[2] else redis.call('DEL', KEYS[4]) end
return out
"#;

/// `KEYS` = registry `:rooms`, `:gen`, `:seq`; `ARGV` = `<tenant>/<room>`,
/// due ms. Lowers (or sets) the room's due time and gives it a new generation.
const REGISTER: &str = r#"redis.call('ZADD', KEYS[1], 'LT', ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], redis.call('INCR', KEYS[3]))
return 1
"#;

/// `KEYS` = `:pz`, `:pr`. After a registration: marks the room as listed,
/// if it still has entries, with the same TTL as `:pz`.
const MARK: &str = r#"local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return 0 end
if ttl > 0 then redis.call('SET', KEYS[2], '1', 'PX', ttl) else redis.call('SET', KEYS[2], '1') end
return 1
"#;

/// `KEYS` = registry `:rooms`, `:gen`; `ARGV` = now ms, most rooms.
/// Returns `{{room, due, generation}, …}` of the rooms due by now.
const DUE: &str = r#"local r = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
local out = {}
for i = 1, #r, 2 do
  out[#out + 1] = {r[i], r[i + 1], redis.call('HGET', KEYS[2], r[i]) or ''}
end
return out
"#;

/// `KEYS` = registry `:rooms`, `:gen`; `ARGV` = room, due and generation
/// as read by [`DUE`], next due (`''`: the room was empty). Applies only if
/// neither changed meanwhile; returns 1 when applied.
const SETTLE: &str = r#"local g = redis.call('HGET', KEYS[2], ARGV[1]) or ''
if g ~= ARGV[3] then return 0 end
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
end
return 1
"#;

/// A script run with EVALSHA, falling back to EVAL on NOSCRIPT.
struct Lua {
    src: &'static str,
    sha: OnceLock<String>,
}

impl Lua {
    const fn new(src: &'static str) -> Self {
        Self {
            src,
            sha: OnceLock::new(),
        }
    }

    fn sha(&self) -> &str {
        self.sha
            .get_or_init(|| redis::Script::new(self.src).get_hash().to_owned())
    }

    async fn run<T: FromRedisValue>(
        &self,
        commands: &Commands,
        keys: &[&str],
        args: &[&str],
    ) -> redis::RedisResult<T> {
        let build = |verb: &str, body: &str| {
            let mut cmd = redis::cmd(verb);
            cmd.arg(body).arg(keys.len()).arg(keys).arg(args);
            cmd
        };
        match commands.query(&build("EVALSHA", self.sha())).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                commands.query(&build("EVAL", self.src)).await
            }
            other => other,
        }
    }
}

static UPSERT_LUA: Lua = Lua::new(UPSERT);
static REMOVE_LUA: Lua = Lua::new(REMOVE);
static MEMBERS_LUA: Lua = Lua::new(MEMBERS);
static EXPIRE_LUA: Lua = Lua::new(EXPIRE);
static REGISTER_LUA: Lua = Lua::new(REGISTER);
static MARK_LUA: Lua = Lua::new(MARK);
static DUE_LUA: Lua = Lua::new(DUE);
static SETTLE_LUA: Lua = Lua::new(SETTLE);

/// The stored form of an entry (the session is the hash field):
/// `1\t<user>\t<node>\t<connected_at>\t<last_seen>` plus `\t<user agent>`
/// when there is one; with an IP, version `2` and `\t<ip>` before the user
/// agent. Ids and IPs never contain a tab; the user agent is last, so it may.
fn encode(entry: &PresenceEntry) -> String {
    let mut s = match entry.ip.as_deref().filter(|ip| !ip.contains('\t')) {
        None => format!(
            "{ENTRY_VERSION}\t{}\t{}\t{}\t{}",
            entry.user, entry.node, entry.connected_at, entry.last_seen
        ),
        Some(ip) => format!(
            "{ENTRY_VERSION_IP}\t{}\t{}\t{}\t{}\t{ip}",
            entry.user, entry.node, entry.connected_at, entry.last_seen
        ),
    };
    if let Some(ua) = &entry.user_agent {
        s.push('\t');
        s.push_str(ua);
    }
    s
}

fn decode(session: &str, value: &str) -> Option<PresenceEntry> {
    let (version, rest) = value.split_once('\t')?;
    let with_ip = match version {
        ENTRY_VERSION => false,
        ENTRY_VERSION_IP => true,
        _ => return None,
    };
    let mut f = rest.splitn(if with_ip { 6 } else { 5 }, '\t');
    let session = session.parse().ok()?;
    let user = f.next()?.parse().ok()?;
    let node = f.next()?.parse().ok()?;
    let connected_at = f.next()?.parse().ok()?;
    let last_seen = f.next()?.parse().ok()?;
    let ip = if with_ip {
        Some(f.next()?.into())
    } else {
        None
    };
    Some(PresenceEntry {
        session,
        user,
        node,
        connected_at,
        last_seen,
        user_agent: f.next().map(Into::into),
        ip,
    })
}

/// The registry member of a room, and back.
fn room_member(room: &RoomKey) -> String {
    format!("{}/{}", room.tenant, room.room)
}

fn parse_member(member: &str) -> Option<RoomKey> {
    let (tenant, room) = member.split_once('/')?;
    let tenant: TenantId = tenant.parse().ok()?;
    let room: RoomName = room.parse().ok()?;
    Some(RoomKey::new(tenant, room))
}

/// The registry shard that lists a room.
fn shard_of(room: &RoomKey) -> u16 {
    slot_of(room_member(room).as_bytes()) % PRESENCE_REGISTRY_SHARDS
}

fn unavailable(what: &str, room: &RoomKey, e: redis::RedisError) -> BrokerError {
    BrokerError::unavailable(format!("presence {what} in room {room}"), e)
}

struct RoomKeys {
    entries: String,
    expiry: String,
    users: String,
    mark: String,
}

impl RoomKeys {
    fn of(names: &Names, room: &RoomKey) -> Self {
        Self {
            entries: names.presence_entries(room),
            expiry: names.presence_expiry(room),
            users: names.presence_users(room),
            mark: names.presence_mark(room),
        }
    }
}

/// Registers `room` in its registry shard with due time `due`, then marks
/// the room as registered.
async fn register(
    commands: &Commands,
    names: &Names,
    room: &RoomKey,
    due: u64,
) -> Result<(), BrokerError> {
    let [rooms, gen, seq] = names.presence_registry(shard_of(room));
    REGISTER_LUA
        .run::<i64>(
            commands,
            &[&rooms, &gen, &seq],
            &[&room_member(room), &due.to_string()],
        )
        .await
        .map_err(|e| unavailable("registration", room, e))?;
    let keys = RoomKeys::of(names, room);
    MARK_LUA
        .run::<i64>(commands, &[&keys.expiry, &keys.mark], &[])
        .await
        .map_err(|e| unavailable("registration mark", room, e))?;
    Ok(())
}

/// Sweeps one registry shard: runs the room script on each due room and
/// settles its registry entry; appends the (room, user) pairs that left.
async fn sweep_shard(
    commands: &Commands,
    names: &Names,
    shard: u16,
    now_ms: u64,
    left: &mut Vec<(RoomKey, UserId)>,
) -> Result<(), BrokerError> {
    let [rooms, gen, _] = names.presence_registry(shard);
    let now = now_ms.to_string();
    let batch = SWEEP_BATCH.to_string();
    for _ in 0..SWEEP_ROUNDS {
        let due: Vec<(String, String, String)> = DUE_LUA
            .run(commands, &[&rooms, &gen], &[&now, &batch])
            .await
            .map_err(|e| {
                BrokerError::unavailable(format!("reading presence registry shard {shard}"), e)
            })?;
        let full = due.len() >= SWEEP_BATCH;
        let mut progress = false;
        for (member, seen_due, seen_gen) in due {
            let Some(room) = parse_member(&member) else {
                tracing::warn!(%member, "dropping a malformed presence registry entry");
                SETTLE_LUA
                    .run::<i64>(
                        commands,
                        &[&rooms, &gen],
                        &[&member, &seen_due, &seen_gen, ""],
                    )
                    .await
                    .map_err(|e| {
                        BrokerError::unavailable(format!("settling presence of {member}"), e)
                    })?;
                continue;
            };
            let keys = RoomKeys::of(names, &room);
            let out: Vec<String> = EXPIRE_LUA
                .run(
                    commands,
                    &[&keys.entries, &keys.expiry, &keys.users, &keys.mark],
                    &[&now, &batch],
                )
                .await
                .map_err(|e| unavailable("expiry", &room, e))?;
            let mut out = out.into_iter();
            let next_due = out.next().unwrap_or_default();
            for user in out {
                match user.parse::<UserId>() {
                    Ok(user) => left.push((room.clone(), user)),
                    Err(_) => tracing::warn!(%room, %user, "malformed user in presence"),
                }
            }
            let applied: i64 = SETTLE_LUA
                .run(
                    commands,
                    &[&rooms, &gen],
                    &[&member, &seen_due, &seen_gen, &next_due],
                )
                .await
                .map_err(|e| unavailable("settling", &room, e))?;
            // A room still due (its backlog exceeded one batch) or one
            // whose registration changed is taken again next round.
            progress |= applied == 1;
        }
        if !full || !progress {
            break;
        }
    }
    Ok(())
}

/// Presence shared by every node through Redis. Decisions are made by the
/// room scripts with the caller's `now_ms` (the node's clock): nodes'
/// clocks are assumed to agree within a small fraction of the TTL (NTP);
/// a node whose clock is ahead by `d` expires others' entries `d` early.
#[async_trait]
impl Presence for RedisBroker {
    /// Adds or refreshes the entry. `UserJoined` when the user had no entry
    /// in the room (counting entries that lapsed but were not swept yet:
    /// their sweep then reports no `UserLeft`, so joined/left stay paired).
    async fn upsert(
        &self,
        room: &RoomKey,
        entry: PresenceEntry,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<PresenceChange, BrokerError> {
        let commands = self.commands();
        let names = self.names();
        let keys = RoomKeys::of(names, room);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let expires = now_ms.saturating_add(ttl_ms);
        let (joined, needs_register): (i64, i64) = UPSERT_LUA
            .run(
                commands,
                &[&keys.entries, &keys.expiry, &keys.users, &keys.mark],
                &[
                    entry.session.as_str(),
                    entry.user.as_str(),
                    &encode(&entry),
                    &expires.to_string(),
                    &now_ms.to_string(),
                    &PRESENCE_KEY_GRACE.as_millis().to_string(),
                ],
            )
            .await
            .map_err(|e| unavailable("upsert", room, e))?;
        if needs_register == 1 {
            register(commands, names, room, expires).await?;
        }
        Ok(if joined == 1 {
            PresenceChange::UserJoined
        } else {
            PresenceChange::Unchanged
        })
    }

    /// Removes the entry. `UserLeft` when it was the user's last entry in
    /// the room (lapsed or not); removing an unknown session is `Unchanged`.
    async fn remove(
        &self,
        room: &RoomKey,
        session: &SessionId,
        _now_ms: u64,
    ) -> Result<PresenceChange, BrokerError> {
        let keys = RoomKeys::of(self.names(), room);
        let left: i64 = REMOVE_LUA
            .run(
                self.commands(),
                &[&keys.entries, &keys.expiry, &keys.users, &keys.mark],
                &[session.as_str()],
            )
            .await
            .map_err(|e| unavailable("remove", room, e))?;
        // The room stays registered; the next sweep past its due time
        // finds it empty and deregisters it.
        Ok(if left == 1 {
            PresenceChange::UserLeft
        } else {
            PresenceChange::Unchanged
        })
    }

    async fn members(
        &self,
        room: &RoomKey,
        now_ms: u64,
    ) -> Result<Vec<PresenceEntry>, BrokerError> {
        let keys = RoomKeys::of(self.names(), room);
        let raw: Vec<(String, String)> = MEMBERS_LUA
            .run(
                self.commands(),
                &[&keys.entries, &keys.expiry],
                &[&now_ms.to_string()],
            )
            .await
            .map_err(|e| unavailable("members", room, e))?;
        let mut live: Vec<PresenceEntry> = raw
            .iter()
            .filter_map(|(session, value)| {
                let entry = decode(session, value);
                if entry.is_none() {
                    tracing::warn!(%room, %session, "skipping an undecodable presence entry");
                }
                entry
            })
            .collect();
        live.sort_by(|a, b| (a.connected_at, &a.session).cmp(&(b.connected_at, &b.session)));
        Ok(live)
    }

    /// Sweeps every registry shard for rooms due by `now_ms`. Each lapse is
    /// reported by exactly one caller, whichever node's room script dropped
    /// the user's last entry.
    async fn expire(&self, now_ms: u64) -> Result<Vec<(RoomKey, UserId)>, BrokerError> {
        let mut left = Vec::new();
        for shard in 0..PRESENCE_REGISTRY_SHARDS {
            sweep_shard(self.commands(), self.names(), shard, now_ms, &mut left).await?;
        }
        Ok(left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let mut e = PresenceEntry {
            session: "s-1".parse().unwrap(),
            user: "u@x".parse().unwrap(),
            node: "node-a".parse().unwrap(),
            connected_at: 1_717_000_000_000,
            last_seen: 1_717_000_000_500,
            user_agent: None,
            ip: None,
        };
        assert_eq!(decode("s-1", &encode(&e)), Some(e.clone()));
        for ip in [None, Some("127.0.0.1"), Some("2001:db8::1")] {
            e.ip = ip.map(Into::into);
            for ua in ["", "Mozilla/5.0 (X11)\todd", "a\nb"] {
                e.user_agent = Some(ua.into());
                assert_eq!(decode("s-1", &encode(&e)), Some(e.clone()));
            }
        }
        // Entries written before the IP was kept still decode.
        let old = decode("s-1", "1\tu\tn\t1\t2\tMozilla/5.0 (X11)").unwrap();
        assert_eq!(
            (old.ip.as_deref(), old.user_agent.as_deref()),
            (None, Some("Mozilla/5.0 (X11)"))
        );
        assert_eq!(
            encode(&PresenceEntry { ip: None, ..old }),
            "1\tu\tn\t1\t2\tMozilla/5.0 (X11)"
        );
        assert_eq!(
            decode("s-1", "2\tu\tn\t1\t2"),
            None,
            "version 2 has an ip field"
        );
        assert_eq!(decode("s-1", "3\tu\tn\t1\t2"), None);
        assert_eq!(decode("s-1", "1\tu\tn\tx\t2"), None);
    }

    #[test]
    fn registry_members_round_trip() {
        let room = RoomKey::new("acme".parse().unwrap(), "work_item:a:b".parse().unwrap());
        assert_eq!(room_member(&room), "acme/work_item:a:b");
        assert_eq!(parse_member(&room_member(&room)), Some(room.clone()));
        assert_eq!(parse_member("acme"), None);
        assert!(shard_of(&room) < PRESENCE_REGISTRY_SHARDS);
    }
}
