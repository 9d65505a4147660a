//! docs/redis.md ships the publish script for publishers in other languages;
//! it must be the script the broker runs. (Read at run time: the Docker build
//! context holds the crates, not the docs.)

use roomcast_broker_redis::PUBLISH_SCRIPT;

#[test]
fn docs_ship_the_publish_script_verbatim() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/redis.md");
    let docs = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        docs.contains(&format!("```lua\n{PUBLISH_SCRIPT}```")),
        "docs/redis.md must hold crates/broker-redis/src/publish.lua verbatim"
    );
}
