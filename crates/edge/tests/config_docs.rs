//! Keeps docs/roomcast.example.toml honest: it must parse as a [`Config`],
//! equal `Config::default()`, and spell out every field that has a value by
//! default (fields that default to `None` stay commented out in the file).

use std::path::PathBuf;

use roomcast_edge::Config;

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/roomcast.example.toml")
}

fn example_text() -> String {
    let path = example_path();
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn example_config_parses_and_equals_the_defaults() {
    let parsed: Config = toml::from_str(&example_text())
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", example_path().display()));
    assert_eq!(
        parsed,
        Config::default(),
        "docs/roomcast.example.toml and Config::default() disagree; update the doc"
    );
}

/// Every key of the serialised defaults, as `section.key` paths.
fn key_paths(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    if let toml::Value::Table(table) = value {
        for (key, v) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            if v.is_table() {
                key_paths(v, &path, out);
            } else {
                out.push(path);
            }
        }
    }
}

fn lookup<'a>(value: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    path.split('.').try_fold(value, |v, key| v.get(key))
}

#[test]
fn example_config_spells_out_every_field() {
    let defaults = toml::Value::try_from(Config::default()).expect("the default config serialises");
    let example: toml::Value = toml::from_str(&example_text()).expect("the example parses");
    let mut paths = Vec::new();
    key_paths(&defaults, "", &mut paths);
    assert!(!paths.is_empty());
    let missing: Vec<&String> = paths
        .iter()
        .filter(|p| lookup(&example, p).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "docs/roomcast.example.toml leaves out {missing:?}; add them with their defaults"
    );
}

/// Every integer the chart's schema lists, with the minimum it gives.
fn schema_integers(node: &serde_json::Value, path: &str, out: &mut Vec<(String, u64)>) {
    if node["type"] == "integer" {
        let min = node["minimum"]
            .as_u64()
            .expect("every integer has a minimum");
        out.push((path.to_owned(), min));
    }
    if let Some(props) = node["properties"].as_object() {
        for (key, child) in props {
            let child_path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            schema_integers(child, &child_path, out);
        }
    }
}

/// The defaults with `path` set to `value`, checked as a node checks it.
fn validate_with(path: &str, value: u64) -> Result<(), String> {
    let mut doc = toml::Value::try_from(Config::default()).unwrap();
    let (parents, key) = path.rsplit_once('.').unwrap_or(("", path));
    let mut table = &mut doc;
    for part in parents.split('.').filter(|p| !p.is_empty()) {
        table = table
            .get_mut(part)
            .unwrap_or_else(|| panic!("{path}: no table {part}"));
    }
    table
        .as_table_mut()
        .unwrap()
        .insert(key.into(), toml::Value::Integer(value as i64));
    let mut config: Config = doc.try_into().map_err(|e| format!("does not parse: {e}"))?;
    config.auth.jwt_secret = Some("a-secret-long-enough-for-hs256-0123".into());
    // The chart always runs nodes on Redis, and some broker settings only
    // apply there.
    config.broker.redis = Some("redis://redis:6379".into());
    config.validate().map_err(|e| e.to_string())
}

/// helm/roomcast/values.schema.json (deploy/lib/values_schema.py) must
/// refuse exactly the integers a node refuses: each at its minimum passes,
/// one below fails.
#[test]
fn the_chart_schema_minimums_are_the_nodes() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../helm/roomcast/values.schema.json");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut integers = Vec::new();
    schema_integers(&schema["properties"]["config"], "", &mut integers);
    assert!(integers.len() > 10, "found {integers:?}");
    for (key, min) in integers {
        if let Err(e) = validate_with(&key, min) {
            panic!("{key} = {min} (the schema's minimum) is refused by the node: {e}");
        }
        if min > 0 {
            assert!(
                validate_with(&key, min - 1).is_err(),
                "{key} = {} is accepted by the node, but the schema's minimum is {min}",
                min - 1
            );
        }
    }
}
