//! `check-config` output: the effective configuration as TOML, each value that
//! is not the built-in default followed by a comment naming where it came from.

use super::load::{Loaded, Source};
use std::fmt::Write;
use toml::{Table, Value};

const SECTIONS: &[&str] = &[
    "adapter",
    "orchestrator",
    "performance",
    "limits",
    "logging",
    "monitoring",
    "circuit_breaker",
    "cache",
    "hooks",
    "paths",
];

pub fn render(loaded: &Loaded) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Effective ralph-qchat configuration ({})",
        match &loaded.file {
            Some(p) => format!("file {}", p.display()),
            None => "no configuration file".into(),
        }
    );
    let mut table = Table::try_from(&loaded.config).unwrap_or_default();
    let adapter = &loaded.config.adapter;
    if let Some(Value::Table(t)) = table.get_mut("adapter") {
        t.insert("command".into(), Value::String(adapter.effective_command()));
        t.insert("timeout".into(), Value::Float(adapter.effective_timeout()));
        if let Some(p) = adapter.effective_preflight() {
            t.insert(
                "preflight".into(),
                Value::Array(p.into_iter().map(Value::String).collect()),
            );
        }
        t.insert(
            "args".into(),
            Value::Array(
                adapter
                    .effective_args()
                    .into_iter()
                    .map(Value::String)
                    .collect(),
            ),
        );
    }
    for section in SECTIONS {
        let Some(Value::Table(keys)) = table.get(*section) else {
            continue;
        };
        let _ = writeln!(out, "\n[{section}]");
        for (key, value) in keys {
            let path = format!("{section}.{key}");
            let shown = if path == "adapter.env" {
                inline_masked(value)
            } else {
                value.to_string()
            };
            let note = match loaded.source_of(&path) {
                Source::Default if path == "adapter.command" && adapter.command.is_empty() => {
                    format!("  # default of the {} profile", adapter.name.as_str())
                }
                Source::Default if path == "adapter.args" && adapter.args.is_none() => {
                    format!("  # default of the {} profile", adapter.name.as_str())
                }
                Source::Default if path == "adapter.timeout" && adapter.timeout == 0.0 => {
                    format!("  # default of the {} profile", adapter.name.as_str())
                }
                Source::Default if path == "adapter.preflight" && adapter.preflight.is_none() => {
                    format!("  # default of the {} profile", adapter.name.as_str())
                }
                Source::Default => String::new(),
                src => format!("  # from {src}"),
            };
            let _ = writeln!(out, "{key} = {shown}{note}");
        }
    }
    out
}

/// Agent environment values are often credentials: show the names only.
fn inline_masked(value: &Value) -> String {
    let Value::Table(t) = value else {
        return value.to_string();
    };
    let inner: Vec<String> = t
        .keys()
        .map(|k| format!("{} = \"(hidden)\"", Value::String(k.clone())))
        .collect();
    if inner.is_empty() {
        "{}".into()
    } else {
        format!("{{ {} }}", inner.join(", "))
    }
}
