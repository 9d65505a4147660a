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
