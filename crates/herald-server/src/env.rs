//! `HERALD_*` environment variables as a configuration layer (a figment provider over a given list of
//! pairs, so that tests and the binary share one code path). Knows key names, not the configuration's
//! types: it depends on no other module of this crate.

/// Reads `HERALD_*` variables from a given list instead of the process environment, so tests and the
/// binary share one code path.
pub(crate) struct EnvPairs {
    pub(crate) pairs: Vec<(String, String)>,
}

impl figment::Provider for EnvPairs {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("environment variable(s)")
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let mut dict = figment::value::Dict::new();
        for (name, value) in &self.pairs {
            let Some(key) = key_of(name) else { continue };
            let path: Vec<&str> = key.split("__").collect();
            let raw = figment::value::Value::from(value.clone());
            // API keys stay strings even when they look like numbers.
            let value = if key == "api_keys" { raw } else { parse_env_value(raw) };
            insert_path(&mut dict, &path, value);
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

/// The configuration key a `HERALD_*` variable sets, nested keys joined by `__`
/// (`HERALD_REDIS__URL` -> `redis__url`); `None` for any other variable.
pub(crate) fn key_of(name: &str) -> Option<String> {
    let key = name.strip_prefix("HERALD_")?.to_ascii_lowercase();
    Some(CONTRACT_ALIASES.iter().find(|(alias, _)| *alias == key).map_or(key, |(_, k)| (*k).to_owned()))
}

/// Environment names the public contract (`docs/protocol.md`) gives with one underscore, for nested keys.
const CONTRACT_ALIASES: [(&str, &str); 2] =
    [("redis_durability", "redis__durability"), ("redis_min_replicas", "redis__min_replicas")];

fn insert_path(dict: &mut figment::value::Dict, path: &[&str], value: figment::value::Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry((*first).to_owned())
                .or_insert_with(|| figment::value::Value::from(figment::value::Dict::new()));
            if let figment::value::Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

/// Environment values are strings; numbers and booleans are parsed so typed keys accept them.
fn parse_env_value(value: figment::value::Value) -> figment::value::Value {
    use figment::value::Value;
    let Some(text) = value.as_str() else { return value };
    if let Ok(number) = text.parse::<u64>() {
        return Value::from(number);
    }
    if let Ok(number) = text.parse::<i64>() {
        return Value::from(number);
    }
    match text {
        "true" => Value::from(true),
        "false" => Value::from(false),
        _ => value,
    }
}
