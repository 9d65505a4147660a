//! The publish script: append to a room's history stream and publish on the
//! room's channel, atomically, on the room's shard.

use std::sync::OnceLock;

use roomcast_broker::{BrokerError, HistoryCap, Published};
use roomcast_protocol::{Event, EventId, RoomKey};

use crate::commands::Commands;
use crate::config::RedisConfig;
use crate::names::Names;

/// The script every publisher runs, once per room of an event. Shipped
/// verbatim in docs/redis.md so any Redis client can publish.
///
/// * `KEYS[1]` the room's history stream, `KEYS[2]` the room's channel,
///   `KEYS[3]` the room's trim mark (the newest id trimmed from the stream);
///   one hash tag, so one Cluster slot.
/// * `ARGV[1]` the id: `*` (Redis assigns `<ms>-<seq>`) or an explicit id,
///   which must be greater than the stream's last one.
/// * `ARGV[2]` the envelope (protobuf or JSON) without an id.
/// * `ARGV[3]` most entries kept (`0`: keep none; ids still increase).
/// * `ARGV[4]` slack: trim only once the stream is this many entries over
///   `ARGV[3]` (`0`: exact), so trimming runs once per `slack` publishes.
/// * `ARGV[5]` oldest age kept in ms (`0`: no age cap), measured on the
///   Redis server's clock, the same clock that makes the ids.
/// * `ARGV[6]` `PUBLISH` (standalone) or `SPUBLISH` (Cluster).
///
/// The channel message is `<id>\n<envelope>`; the script returns the id.
/// (Redis 7.0 does not advance a stream's `max-deleted-entry-id` when it
/// trims, so the script keeps its own mark for `history_since`.)
pub const PUBLISH_SCRIPT: &str = include_str!("publish.lua");

/// The script's SHA1, for EVALSHA.
pub fn publish_script_sha() -> &'static str {
    static SHA: OnceLock<String> = OnceLock::new();
    SHA.get_or_init(|| redis::Script::new(PUBLISH_SCRIPT).get_hash().to_owned())
}

/// Publishes `event` on each of its rooms with the script. Rooms are
/// published one after the other; each room's append+publish is atomic.
pub(crate) async fn publish(
    commands: &Commands,
    names: &Names,
    config: &RedisConfig,
    sharded: bool,
    mut event: Event,
) -> Result<Published, BrokerError> {
    let explicit = event.id;
    event.id = EventId::ZERO;
    let envelope = event.encode_envelope();
    let id_arg = if explicit == EventId::ZERO {
        "*".to_owned()
    } else {
        explicit.to_string()
    };
    let mut ids = Vec::with_capacity(event.rooms.len());
    for room in &event.rooms {
        let key = RoomKey::new(event.tenant.clone(), room.clone());
        let cap = config.history.cap_for(room.kind());
        let args = ScriptArgs {
            stream: names.stream(&key),
            channel: names.channel(&key),
            trim_mark: names.trim_mark(&key),
            id: &id_arg,
            envelope: &envelope,
            cap,
            exact: config.exact_trim,
            sharded,
        };
        let id: String = run(commands, &args).await.map_err(|e| map_error(e, &key))?;
        let id: EventId = id.parse().map_err(|e| {
            BrokerError::unavailable(format!("redis returned a bad stream id for {key}"), e)
        })?;
        ids.push((room.clone(), id));
    }
    Ok(Published { ids })
}

/// Publishes `event` on each of its rooms' channels without storing it. The
/// message's id part is `0-0`, so subscribers deliver it with
/// [`EventId::ZERO`] and it never moves a room's resume position.
pub(crate) async fn publish_ephemeral(
    commands: &Commands,
    names: &Names,
    sharded: bool,
    mut event: Event,
) -> Result<(), BrokerError> {
    event.id = EventId::ZERO;
    let mut message = b"0-0\n".to_vec();
    message.extend_from_slice(&event.encode_envelope());
    for room in &event.rooms {
        let key = RoomKey::new(event.tenant.clone(), room.clone());
        let mut cmd = redis::cmd(if sharded { "SPUBLISH" } else { "PUBLISH" });
        cmd.arg(names.channel(&key)).arg(&message);
        commands
            .query::<i64>(&cmd)
            .await
            .map_err(|e| map_error(e, &key))?;
    }
    Ok(())
}

struct ScriptArgs<'a> {
    stream: String,
    channel: String,
    trim_mark: String,
    id: &'a str,
    envelope: &'a [u8],
    cap: HistoryCap,
    exact: bool,
    sharded: bool,
}

impl ScriptArgs<'_> {
    fn apply(&self, cmd: &mut redis::Cmd) {
        // Approximate trimming lets a room run up to 1/8 over its cap, so
        // the trim (and its mark) happens once per max_len/8 publishes.
        let slack = if self.exact { 0 } else { self.cap.max_len / 8 };
        cmd.arg(3)
            .arg(&self.stream)
            .arg(&self.channel)
            .arg(&self.trim_mark)
            .arg(self.id)
            .arg(self.envelope)
            .arg(self.cap.max_len)
            .arg(slack)
            .arg(self.cap.max_age.as_millis() as u64)
            .arg(if self.sharded { "SPUBLISH" } else { "PUBLISH" });
    }
}

/// EVALSHA, falling back to EVAL when the server does not know the script
/// (fresh or restarted Redis, a new Cluster master).
async fn run(commands: &Commands, args: &ScriptArgs<'_>) -> redis::RedisResult<String> {
    let mut evalsha = redis::cmd("EVALSHA");
    evalsha.arg(publish_script_sha());
    args.apply(&mut evalsha);
    match commands.query(&evalsha).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            let mut eval = redis::cmd("EVAL");
            eval.arg(PUBLISH_SCRIPT);
            args.apply(&mut eval);
            commands.query(&eval).await
        }
        other => other,
    }
}

fn map_error(e: redis::RedisError, room: &RoomKey) -> BrokerError {
    let text = e.to_string();
    if text.contains("equal or smaller than the target stream top item") {
        BrokerError::Conflict(format!(
            "event id is not greater than the last id of room {}",
            room.room
        ))
    } else {
        BrokerError::unavailable(format!("publishing to room {room}"), e)
    }
}
