//! `roomcast publish`: one event, through a node's HTTP API or (with
//! `--redis`) straight into Redis.

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use roomcast_broker_redis::{publish_direct, RedisConfig, RedisMode, RedisTls};
use roomcast_protocol::{Event, EventDefaults};

use crate::cli::PublishArgs;

pub(crate) async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let data: Value = serde_json::from_str(&args.data).context("--data must be JSON")?;
    let mut event = json!({ "rooms": args.rooms, "type": args.kind, "data": data });
    let obj = event.as_object_mut().expect("built as an object");
    if let Some(t) = &args.tenant {
        obj.insert("tenant".into(), json!(t));
    }
    if let Some(a) = &args.actor {
        obj.insert("actor".into(), json!(a));
    }
    if let Some(v) = args.version {
        obj.insert("version".into(), json!(v));
    }
    if !args.audience.is_empty() {
        obj.insert("audience".into(), json!(args.audience));
    }
    if !args.exclude_users.is_empty() {
        obj.insert("exclude_users".into(), json!(args.exclude_users));
    }
    let mode = match (&args.redis, args.redis_cluster.is_empty()) {
        (Some(url), _) => Some(RedisMode::Standalone { url: url.clone() }),
        (None, false) => Some(RedisMode::Cluster {
            urls: args.redis_cluster.clone(),
        }),
        (None, true) => None,
    };
    if let Some(mode) = mode {
        let mut config = RedisConfig::new(mode);
        config.prefix = args.redis_prefix.clone();
        let tls = &args.redis_tls;
        config.tls = RedisTls {
            ca_file: tls.redis_tls_ca_file.clone(),
            cert_file: tls.redis_tls_cert_file.clone(),
            key_file: tls.redis_tls_key_file.clone(),
        };
        config.validate()?;
        let defaults = EventDefaults {
            tenant: None,
            now_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64,
        };
        let event =
            Event::decode(event.to_string().as_bytes(), &defaults).context("invalid event")?;
        let published = publish_direct(&config, event).await?;
        let ids: serde_json::Map<String, Value> = published
            .ids
            .iter()
            .map(|(room, id)| (room.to_string(), Value::String(id.to_string())))
            .collect();
        println!("{}", json!({ "ids": ids }));
        return Ok(());
    }
    let token = args
        .token
        .as_deref()
        .context("--token (a publisher token or API key) is required to post to a node")?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url = format!("{}/v1/publish", args.url.trim_end_matches('/'));
    let req = http::Request::post(&url)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(event.to_string())))
        .context("building the request")?;
    let resp = client
        .request(req)
        .await
        .with_context(|| format!("posting to {url}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading the response")?
        .to_bytes();
    println!("{}", String::from_utf8_lossy(&body));
    if !status.is_success() {
        bail!("publish failed: HTTP {status}");
    }
    Ok(())
}
