//! Layering: built-in defaults < TOML file < environment < command-line flags,
//! remembering where every key's value came from.

use super::types::{AgentName, Config};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use toml::{Spanned, Table, Value};

/// Where a key's effective value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Default,
    File { path: PathBuf, line: usize },
    Env(String),
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "built-in default"),
            // Line 0: about the file as a whole (it cannot be read).
            Source::File { path, line: 0 } => write!(f, "{}", path.display()),
            Source::File { path, line } => write!(f, "{} line {}", path.display(), line),
            Source::Env(v) => write!(f, "environment variable {v}"),
            Source::Flag(fl) => write!(f, "flag {fl}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// `section.key`, or empty when the error is about the file as a whole.
    pub key: String,
    pub source: Source,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(
                f,
                "configuration error in {}: {}",
                self.source, self.message
            )
        } else {
            write!(
                f,
                "configuration error in {}: key `{}`: {}",
                self.source, self.key, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// A value set from outside the file: an environment variable or a flag.
#[derive(Debug, Clone)]
pub struct Override {
    pub source: Source,
    pub key: String,
    pub raw: String,
}

/// Everything the loader reads besides the built-in defaults.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    pub file: Option<PathBuf>,
    /// A missing file is an error only when the operator named it.
    pub file_required: bool,
    pub env: Vec<(String, String)>,
    pub flags: Vec<Override>,
}

#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub sources: BTreeMap<String, Source>,
    pub file: Option<PathBuf>,
    /// Things worth a warning once logging is up (e.g. an unusable RUST_LOG).
    pub warnings: Vec<String>,
}

impl Loaded {
    /// Where a key came from; `adapter.rules[2].match` is where rule 2 is.
    pub fn source_of(&self, key: &str) -> Source {
        let mut k = key;
        loop {
            if let Some(s) = self.sources.get(k) {
                return s.clone();
            }
            match k.rsplit_once('.') {
                Some((head, _)) if head.contains('.') => k = head,
                _ => return Source::Default,
            }
        }
    }
}

/// Environment variables and the key each sets. Kept in one table so the man
/// page test can compare it with the documentation.
pub const ENV_KEYS: &[(&str, &str)] = &[
    ("QCHAT_TIMEOUT", "adapter.timeout"),
    ("QCHAT_MAX_RETRIES", "adapter.max_retries"),
    ("QCHAT_RETRY_DELAY", "adapter.retry_delay"),
    ("QCHAT_BUFFER_SIZE", "performance.buffer_size"),
    ("QCHAT_POLL_INTERVAL", "performance.poll_interval"),
    ("QCHAT_MAX_CONCURRENT", "performance.max_concurrent"),
    ("QCHAT_CONTAINMENT", "limits.containment"),
    ("QCHAT_MAX_MEMORY_MB", "limits.max_memory_mb"),
    ("QCHAT_MAX_OUTPUT_SIZE", "limits.max_output_size"),
    ("QCHAT_VERBOSE", "logging.verbose"),
    ("HEALTH_CHECK_ENABLED", "monitoring.health_check_enabled"),
    ("HEALTH_CHECK_INTERVAL", "monitoring.health_check_interval"),
];

const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

pub fn load(layers: &Layers) -> Result<Loaded, ConfigError> {
    let defaults = Table::try_from(Config::default()).map_err(|e| ConfigError {
        key: String::new(),
        source: Source::Default,
        message: format!("internal: defaults do not serialise: {e}"),
    })?;
    let mut merged = defaults.clone();
    let mut sources = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut file_used = None;

    if let Some(path) = &layers.file {
        match std::fs::read(path) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| ConfigError {
                    key: String::new(),
                    source: Source::File {
                        path: path.clone(),
                        line: 1,
                    },
                    message: "the file is not valid UTF-8 (TOML files must be UTF-8)".into(),
                })?;
                apply_file(path, &text, &mut merged, &mut sources)?;
                file_used = Some(path.clone());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !layers.file_required => {}
            Err(e) => {
                return Err(ConfigError {
                    key: String::new(),
                    source: Source::File {
                        path: path.clone(),
                        line: 0,
                    },
                    message: format!("cannot read the configuration file: {e}"),
                });
            }
        }
    }

    let mut overrides = Vec::new();
    for (var, value) in &layers.env {
        if value.is_empty() {
            continue;
        }
        if let Some((_, key)) = ENV_KEYS.iter().find(|(v, _)| v == var) {
            overrides.push(Override {
                source: Source::Env(var.clone()),
                key: key.to_string(),
                raw: value.clone(),
            });
        }
    }
    // RUST_LOG first so that QCHAT_DEBUG, set explicitly for this program, wins.
    if let Some((_, v)) = layers.env.iter().find(|(k, _)| k == "RUST_LOG") {
        let lv = v.trim().to_ascii_lowercase();
        if LOG_LEVELS.contains(&lv.as_str()) {
            overrides.push(Override {
                source: Source::Env("RUST_LOG".into()),
                key: "logging.level".into(),
                raw: lv,
            });
        } else if !lv.is_empty() {
            warnings.push(format!(
                "RUST_LOG={v:?} is not a plain level ({}); ignored",
                LOG_LEVELS.join(", ")
            ));
        }
    }
    if let Some((_, v)) = layers.env.iter().find(|(k, _)| k == "QCHAT_DEBUG") {
        let on = parse_bool(v).ok_or_else(|| ConfigError {
            key: "logging.level".into(),
            source: Source::Env("QCHAT_DEBUG".into()),
            message: format!("expected 1/0, true/false, yes/no or on/off, found {v:?}"),
        })?;
        if on {
            overrides.push(Override {
                source: Source::Env("QCHAT_DEBUG".into()),
                key: "logging.level".into(),
                raw: "debug".into(),
            });
        }
    }
    overrides.extend(layers.flags.iter().cloned());

    // Repeated --agent-arg flags together replace the profile's arguments.
    let agent_args: Vec<Value> = overrides
        .iter()
        .filter(|o| o.key == "adapter.args")
        .map(|o| Value::String(o.raw.clone()))
        .collect();
    if let Some(o) = overrides.iter().find(|o| o.key == "adapter.args") {
        if let Some(Value::Table(t)) = merged.get_mut("adapter") {
            t.insert("args".into(), Value::Array(agent_args));
        }
        sources.insert(o.key.clone(), o.source.clone());
    }
    for o in overrides.iter().filter(|o| o.key != "adapter.args") {
        let value = typed_value(&defaults, o)?;
        let (section, key) = split_key(&o.key);
        if let Some(Value::Table(t)) = merged.get_mut(section) {
            t.insert(key.to_string(), value);
        }
        sources.insert(o.key.clone(), o.source.clone());
    }

    let config: Config = Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError {
            key: String::new(),
            source: overrides
                .last()
                .map(|o| o.source.clone())
                .unwrap_or(Source::Default),
            message: e.message().to_string(),
        })?;
    let loaded = Loaded {
        config,
        sources,
        file: file_used,
        warnings,
    };
    super::validate::validate(&loaded.config).map_err(|(key, message)| ConfigError {
        source: loaded.source_of(&key),
        key,
        message,
    })?;
    Ok(loaded)
}

fn split_key(key: &str) -> (&str, &str) {
    key.split_once('.').unwrap_or(("", key))
}

fn apply_file(
    path: &Path,
    text: &str,
    merged: &mut Table,
    sources: &mut BTreeMap<String, Source>,
) -> Result<(), ConfigError> {
    let at = |line: usize| Source::File {
        path: path.to_path_buf(),
        line,
    };
    // Each key on its own first: every unknown key and wrong type of the
    // file is reported at once, with its key and line, in words.
    let errors = key_errors(text);
    if let Some((key, line, message)) = errors.first() {
        let mut message = message.clone();
        for (k, l, m) in &errors[1..] {
            message.push_str(&format!(
                "\n  also {} line {l}: key `{k}`: {m}",
                path.display()
            ));
        }
        return Err(ConfigError {
            key: key.clone(),
            source: at(*line),
            message,
        });
    }
    // The strict pass: unknown keys and wrong types, with the line they are on.
    if let Err(e) = toml::from_str::<Config>(text) {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
        let mut message = e.message().trim().to_string();
        if looks_like_yaml(path, text) {
            message = format!(
                "{message}. This looks like YAML; ralph-qchat reads TOML (`[section]` headers, \
                 `key = value` lines). Every key is documented in ralph-qchat.toml(5)"
            );
        }
        return Err(ConfigError {
            key: String::new(),
            source: at(line),
            message,
        });
    }
    type Spans = BTreeMap<String, BTreeMap<String, Spanned<Value>>>;
    let spans: Spans = toml::from_str(text).map_err(|e| ConfigError {
        key: String::new(),
        source: at(e.span().map(|s| line_of(text, s.start)).unwrap_or(1)),
        message: format!(
            "{}: only [section] tables belong at the top level",
            e.message().trim()
        ),
    })?;
    for (section, keys) in spans {
        for (key, spanned) in keys {
            let line = line_of(text, spanned.span().start);
            let mut value = spanned.into_inner();
            if section == "adapter"
                && key == "name"
                && let Value::String(s) = &value
                && let Some(n) = AgentName::parse(s)
            {
                value = Value::String(n.as_str().into());
            }
            if let Some(Value::Table(t)) = merged.get_mut(&section) {
                t.insert(key.clone(), value);
            }
            sources.insert(format!("{section}.{key}"), at(line));
        }
    }
    rule_lines(text, path, sources);
    Ok(())
}

/// (key, line, what is wrong) of every key of the file that is unknown or
/// of the wrong type, each deserialised on its own. Empty when the file does
/// not parse as tables of keys (the caller's strict pass says why).
fn key_errors(text: &str) -> Vec<(String, usize, String)> {
    type Spans = BTreeMap<String, BTreeMap<String, Spanned<Value>>>;
    let Ok(spans) = toml::from_str::<Spans>(text) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (section, keys) in spans {
        for (key, spanned) in keys {
            let line = line_of(text, spanned.span().start);
            let mut one = Table::new();
            let mut inner = Table::new();
            inner.insert(key.clone(), spanned.into_inner());
            one.insert(section.clone(), Value::Table(inner));
            if let Err(e) = one.try_into::<Config>() {
                let e = e.to_string();
                if e.contains(&format!("unknown field `{section}`")) {
                    let m = in_words(&e).replacen("unknown key", "unknown section", 1);
                    let m = m.replacen("the keys here are", "the sections are", 1);
                    if !out.iter().any(|(k, _, _)| *k == format!("[{section}]")) {
                        out.push((format!("[{section}]"), line, m));
                    }
                } else {
                    out.push((format!("{section}.{key}"), line, in_words(&e)));
                }
            }
        }
    }
    out.sort_by_key(|(_, line, _)| *line);
    out
}

/// serde's wording for a type error, in the words of the configuration:
/// "invalid type: string \"sixty\", expected f64" → "must be a number, found
/// the text \"sixty\"".
fn in_words(message: &str) -> String {
    let m = message.trim().trim_end_matches('.');
    let m = m.lines().next().unwrap_or(m);
    // "unknown field `timout`, expected one of `name`, `timeout`, …"
    if let Some(rest) = m.strip_prefix("unknown field `")
        && let Some((word, known)) = rest.split_once('`')
    {
        let known: Vec<&str> = known.split('`').skip(1).step_by(2).collect();
        return match super::nearest(word, known.iter().copied()) {
            Some(k) => format!("unknown key; did you mean `{k}`?"),
            None => format!("unknown key; the keys here are {}", known.join(", ")),
        };
    }
    let Some((found, expected)) = m
        .strip_prefix("invalid type: ")
        .or_else(|| m.strip_prefix("invalid value: "))
        .and_then(|r| r.rsplit_once(", expected "))
    else {
        return m.to_string();
    };
    let expected = match expected {
        "f32" | "f64" => "a number".to_string(),
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number, 0 or more".to_string(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".to_string(),
        "a boolean" => "true or false".to_string(),
        "a sequence" => "an array, [ … ]".to_string(),
        "a string" => "a string in quotes".to_string(),
        other => other.to_string(),
    };
    let found = if let Some(v) = found.strip_prefix("string ") {
        format!("the text {v}")
    } else if let Some(v) = found
        .strip_prefix("integer ")
        .or_else(|| found.strip_prefix("floating point "))
    {
        v.trim_matches('`').to_string()
    } else if let Some(v) = found.strip_prefix("boolean ") {
        v.trim_matches('`').to_string()
    } else if found == "sequence" {
        "an array".to_string()
    } else if found == "map" {
        "a table".to_string()
    } else {
        found.to_string()
    };
    format!("must be {expected}, found {found}")
}

/// The line of each `[[adapter.rules]]` table, as `adapter.rules[N]`.
fn rule_lines(text: &str, path: &Path, sources: &mut BTreeMap<String, Source>) {
    #[derive(serde::Deserialize)]
    struct File {
        adapter: Option<Section>,
    }
    #[derive(serde::Deserialize)]
    struct Section {
        #[serde(default)]
        rules: Vec<Spanned<Table>>,
    }
    if let Ok(File {
        adapter: Some(Section { rules }),
    }) = toml::from_str::<File>(text)
    {
        for (i, r) in rules.iter().enumerate() {
            sources.insert(
                format!("adapter.rules[{}]", i + 1),
                Source::File {
                    path: path.to_path_buf(),
                    line: line_of(text, r.span().start),
                },
            );
        }
    }
}

fn looks_like_yaml(path: &Path, text: &str) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext.eq_ignore_ascii_case("yaml") || ext.eq_ignore_ascii_case("yml") {
        return true;
    }
    text.lines().any(|l| {
        let l = l.trim_end();
        !l.starts_with('#') && !l.contains('=') && (l.ends_with(':') || l.contains(": "))
    })
}

/// 1-based line number of a byte offset.
/// The process environment as the configuration's environment layer reads
/// it (variables that are not UTF-8 are left out).
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Turns an override's text into a value of the type the key has by default.
fn typed_value(defaults: &Table, o: &Override) -> Result<Value, ConfigError> {
    let err = |message: String| ConfigError {
        key: o.key.clone(),
        source: o.source.clone(),
        message,
    };
    let (section, key) = split_key(&o.key);
    let current = defaults
        .get(section)
        .and_then(|t| t.as_table())
        .and_then(|t| t.get(key));
    let raw = o.raw.trim();
    if o.key == "logging.format" {
        let f = raw.to_ascii_lowercase();
        return if f == "text" || f == "json" {
            Ok(Value::String(f))
        } else {
            Err(err(format!("unknown log format {raw:?} (text or json)")))
        };
    }
    if o.key == "adapter.name" {
        return AgentName::parse(raw)
            .map(|n| Value::String(n.as_str().into()))
            .ok_or_else(|| {
                err(format!(
                    "unknown agent {raw:?} (expected one of {})",
                    super::types::AgentName::ALL
                        .iter()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            });
    }
    match current {
        Some(Value::Integer(_)) => raw
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| err(format!("expected a whole number, found {raw:?}"))),
        Some(Value::Float(_)) => match raw.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Value::Float(f)),
            _ => Err(err(format!("expected a number of seconds, found {raw:?}"))),
        },
        Some(Value::Boolean(_)) => parse_bool(raw).map(Value::Boolean).ok_or_else(|| {
            err(format!(
                "expected 1/0, true/false, yes/no or on/off, found {raw:?}"
            ))
        }),
        Some(Value::String(_)) => Ok(Value::String(o.raw.clone())),
        _ => Err(err(
            "this key cannot be set from the environment or a flag".into()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(text: &str) -> (tempdir::Dir, PathBuf) {
        let d = tempdir::Dir::new();
        let p = d.0.join("qchat.toml");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        (d, p)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "ralph-qchat-cfg-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn layers(path: &Path) -> Layers {
        Layers {
            file: Some(path.to_path_buf()),
            file_required: true,
            ..Layers::default()
        }
    }

    #[test]
    fn precedence_is_default_file_env_flag() {
        let (_d, p) = file_with("[adapter]\ntimeout = 10\nmax_retries = 7\nretry_delay = 4.0\n");
        let mut l = layers(&p);
        l.env = vec![
            ("QCHAT_MAX_RETRIES".into(), "8".into()),
            ("QCHAT_RETRY_DELAY".into(), "5".into()),
        ];
        l.flags = vec![Override {
            source: Source::Flag("--retry-delay".into()),
            key: "adapter.retry_delay".into(),
            raw: "6".into(),
        }];
        let c = load(&l).unwrap();
        assert_eq!(c.config.adapter.timeout, 10.0);
        assert_eq!(c.config.adapter.max_retries, 8);
        assert_eq!(c.config.adapter.retry_delay, 6.0);
        assert_eq!(c.config.adapter.kill_grace, 3.0);
        assert_eq!(
            c.source_of("adapter.timeout"),
            Source::File {
                path: p.clone(),
                line: 2
            }
        );
        assert_eq!(
            c.source_of("adapter.max_retries"),
            Source::Env("QCHAT_MAX_RETRIES".into())
        );
        assert_eq!(c.source_of("adapter.kill_grace"), Source::Default);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let (_d, p) = file_with("[adapter]\ntimeout = 10\n\n[performance]\nbufer_size = 5\n");
        let e = load(&layers(&p)).unwrap_err();
        assert_eq!(e.source, Source::File { path: p, line: 5 });
        // The key is named (now in `key`), and the nearest known one offered.
        assert_eq!(e.key, "performance.bufer_size", "{e}");
        assert!(e.message.contains("did you mean `buffer_size`?"), "{e}");
    }

    #[test]
    fn every_type_error_of_a_file_is_named_at_once_in_words() {
        let (_d, p) = file_with(
            "[adapter]\ntimeout = \"sixty\"\nmax_retries = -1\n[orchestrator]\nmax_iterations = \"x\"\n[bogus]\na = 1\nb = 2\n",
        );
        let e = load(&layers(&p)).unwrap_err();
        assert_eq!(e.key, "adapter.timeout");
        assert_eq!(
            e.source,
            Source::File {
                path: p.clone(),
                line: 2
            }
        );
        let text = e.to_string();
        for want in [
            "key `adapter.timeout`: must be a number, found the text \"sixty\"",
            "line 3: key `adapter.max_retries`: must be a whole number, 0 or more, found -1",
            "line 5: key `orchestrator.max_iterations`: must be a whole number, 0 or more",
            "key `[bogus]`: unknown section",
        ] {
            assert!(text.contains(want), "{want:?} not in: {text}");
        }
        assert_eq!(text.matches("[bogus]").count(), 1, "{text}");
        assert!(!text.contains("f64") && !text.contains("u32"), "{text}");
    }

    #[test]
    fn a_missing_file_is_not_at_line_0() {
        let p = std::path::PathBuf::from("/nonexistent/ralph-qchat.toml");
        let mut l = layers(&p);
        l.file_required = true;
        let e = load(&l).unwrap_err().to_string();
        assert!(
            e.starts_with("configuration error in /nonexistent/ralph-qchat.toml: cannot read"),
            "{e}"
        );
        assert!(!e.contains("line 0"), "{e}");
    }

    #[test]
    fn wrong_type_names_line() {
        let (_d, p) = file_with("[adapter]\ntimeout = \"soon\"\n");
        let e = load(&layers(&p)).unwrap_err();
        assert_eq!(e.source, Source::File { path: p, line: 2 });
    }

    #[test]
    fn out_of_range_names_key_and_line() {
        let (_d, p) = file_with("# c\n[performance]\nmax_concurrent = 0\n");
        let e = load(&layers(&p)).unwrap_err();
        assert_eq!(e.key, "performance.max_concurrent");
        assert_eq!(e.source, Source::File { path: p, line: 3 });
    }

    #[test]
    fn bad_env_names_variable() {
        let l = Layers {
            env: vec![("QCHAT_TIMEOUT".into(), "-5".into())],
            ..Layers::default()
        };
        let e = load(&l).unwrap_err();
        assert_eq!(e.source, Source::Env("QCHAT_TIMEOUT".into()));
        let l = Layers {
            env: vec![("QCHAT_BUFFER_SIZE".into(), "big".into())],
            ..Layers::default()
        };
        let e = load(&l).unwrap_err();
        assert_eq!(e.source, Source::Env("QCHAT_BUFFER_SIZE".into()));
    }

    #[test]
    fn yaml_gets_a_hint() {
        let (_d, p) = file_with("adapter:\n  name: qchat\n  timeout: 300\n");
        let e = load(&layers(&p)).unwrap_err();
        assert!(e.message.contains("TOML"), "{e}");
        assert!(e.message.contains("ralph-qchat.toml(5)"), "{e}");
    }

    #[test]
    fn debug_env_and_agent_alias() {
        let (_d, p) = file_with("[adapter]\nname = \"q\"\n");
        let mut l = layers(&p);
        l.env = vec![
            ("QCHAT_DEBUG".into(), "1".into()),
            ("RUST_LOG".into(), "warn".into()),
        ];
        let c = load(&l).unwrap();
        assert_eq!(c.config.adapter.name, AgentName::Qchat);
        assert_eq!(c.config.logging.level, "debug");
    }

    #[test]
    fn missing_optional_file_is_defaults() {
        let l = Layers {
            file: Some("/nonexistent/ralph.toml".into()),
            file_required: false,
            ..Layers::default()
        };
        assert_eq!(load(&l).unwrap().config, Config::default());
        let l = Layers {
            file_required: true,
            ..l
        };
        assert!(load(&l).is_err());
    }
}
