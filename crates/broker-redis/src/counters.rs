//! Cluster-wide counters on Redis: [`roomcast_broker::Counters`] for
//! [`RedisBroker`] (see docs/redis.md).
//!
//! One key per (counter, window), under its own hash tag so a counter lives
//! in one Cluster slot:
//!
//! ```text
//! <prefix>{ctr:<key>}:<window index>   STRING count; expires after its window
//! ```
//!
//! A hit is [`HIT_SCRIPT`]: `INCR`, and a `PEXPIRE` whenever the key has no
//! TTL yet, in one script so a count never outlives its window.

use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use roomcast_broker::{fixed_window, BrokerError, Counters};

use crate::broker::RedisBroker;
use crate::commands::Commands;

/// `KEYS[1]` the window's key; `ARGV[1]` its TTL in ms. Returns the count.
pub const HIT_SCRIPT: &str = r#"local n = redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"#;

/// How long a window's key outlives the window's end (clock skew between
/// nodes: a late node still counts into the same key).
const KEY_GRACE_MS: u64 = 1000;

fn sha() -> &'static str {
    static SHA: OnceLock<String> = OnceLock::new();
    SHA.get_or_init(|| redis::Script::new(HIT_SCRIPT).get_hash().to_owned())
}

/// The Redis key of `key`'s window `index` under `prefix`.
pub fn counter_key(prefix: &str, key: &str, index: u64) -> String {
    format!("{prefix}{{ctr:{key}}}:{index}")
}

async fn run(commands: &Commands, name: &str, ttl_ms: u64) -> redis::RedisResult<u64> {
    let build = |verb: &str, script: &str| {
        let mut cmd = redis::cmd(verb);
        cmd.arg(script).arg(1).arg(name).arg(ttl_ms);
        cmd
    };
    match commands.query(&build("EVALSHA", sha())).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            commands.query(&build("EVAL", HIT_SCRIPT)).await
        }
        other => other,
    }
}

#[async_trait]
impl Counters for RedisBroker {
    async fn hit(&self, key: &str, window: Duration, now_ms: u64) -> Result<u64, BrokerError> {
        let (index, end) = fixed_window(window, now_ms);
        let name = counter_key(&self.config().prefix, key, index);
        let ttl_ms = end.saturating_sub(now_ms) + KEY_GRACE_MS;
        run(self.commands(), &name, ttl_ms)
            .await
            .map_err(|e| BrokerError::unavailable(format!("counting {key}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_and_tagged() {
        assert_eq!(counter_key("rc:", "u:acme/u1", 7), "rc:{ctr:u:acme/u1}:7");
        assert_eq!(
            crate::names::slot_of(counter_key("rc:", "k", 1).as_bytes()),
            crate::names::slot_of(counter_key("rc:", "k", 2).as_bytes())
        );
    }
}
