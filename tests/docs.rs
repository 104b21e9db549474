//! The documentation stays in step with the code: every configuration key and
//! environment variable is in ralph-qchat.toml(5), every option in
//! ralph-qchat(8), the shipped config shows every key with its default, and
//! nothing documented is missing from the code.

mod common;
use common::*;
use std::collections::BTreeSet;

fn root(p: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p)).unwrap()
}

/// `section.key` of every configuration key the code knows.
fn code_keys() -> BTreeSet<String> {
    let t = toml::Table::try_from(ralph_qchat::config::Config::default()).unwrap();
    let mut keys = BTreeSet::new();
    for (section, v) in &t {
        for k in v.as_table().unwrap().keys() {
            keys.insert(format!("{section}.{k}"));
        }
    }
    // Optional in the struct (the profile decides), so absent from the defaults.
    keys.insert("adapter.args".into());
    keys.insert("adapter.preflight".into());
    keys
}

/// Keys documented in ralph-qchat.toml(5): `.B key` after `.TP` under `.SH "[section]"`.
fn man_keys() -> BTreeSet<String> {
    let text = root("man/ralph-qchat.toml.5");
    let mut keys = BTreeSet::new();
    let mut section = None;
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if let Some(s) = l
            .strip_prefix(".SH \"[")
            .and_then(|s| s.strip_suffix("]\""))
        {
            section = Some(s.to_string());
        } else if l.starts_with(".SH ") {
            section = None;
        } else if let (Some(s), Some(k)) = (&section, l.strip_prefix(".B ")) {
            if i > 0 && lines[i - 1] == ".TP" {
                keys.insert(format!("{s}.{k}"));
            }
        }
    }
    keys
}

fn env_vars_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in ["QCHAT_", "HEALTH_CHECK_"] {
        let mut rest = text;
        while let Some(i) = rest.find(prefix) {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit()))
                .unwrap_or(tail.len());
            // A whole word only: RALPH_QCHAT_TASK_ID is not a QCHAT_ variable.
            let word_start = rest[..i]
                .chars()
                .last()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            if word_start {
                out.insert(tail[..end].trim_end_matches('_').to_string());
            }
            rest = &tail[end..];
        }
    }
    out
}

fn code_env_vars() -> BTreeSet<String> {
    let mut v: BTreeSet<String> = ralph_qchat::config::ENV_KEYS
        .iter()
        .map(|(v, _)| v.to_string())
        .collect();
    v.insert("QCHAT_DEBUG".into());
    v
}

#[test]
fn every_config_key_is_in_the_man_page_and_the_reverse() {
    let code = code_keys();
    let man = man_keys();
    let missing: Vec<_> = code.difference(&man).collect();
    let extra: Vec<_> = man.difference(&code).collect();
    assert!(
        missing.is_empty(),
        "keys not in ralph-qchat.toml(5): {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "ralph-qchat.toml(5) documents keys the code does not have: {extra:?}"
    );
}

#[test]
fn every_environment_variable_is_documented_and_the_reverse() {
    let code = code_env_vars();
    for page in ["man/ralph-qchat.toml.5", "man/ralph-qchat.8"] {
        let mut text = root(page).replace("\\-", "-");
        for font in ["\\fB", "\\fI", "\\fR", "\\fP"] {
            text = text.replace(font, " ");
        }
        let documented = env_vars_in(&text);
        let missing: Vec<_> = code.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&code).collect();
        assert!(missing.is_empty(), "{page} lacks {missing:?}");
        assert!(
            extra.is_empty(),
            "{page} names variables the code does not read: {extra:?}"
        );
    }
    assert!(root("man/ralph-qchat.8").contains(".B RUST_LOG"));
}

#[test]
fn every_option_is_in_the_manual() {
    let text = root("man/ralph-qchat.8").replace("\\-", "-");
    let mut flags: Vec<&str> = ralph_qchat::cli::VALUE_FLAGS
        .iter()
        .map(|(f, _)| *f)
        .collect();
    flags.extend(ralph_qchat::cli::SWITCHES.iter().map(|(f, _, _)| *f));
    flags.extend([
        "config", "workdir", "dry-run", "standby", "json", "url", "timeout", "id",
    ]);
    for f in flags {
        assert!(
            text.contains(&format!("--{f}")),
            "--{f} is not in ralph-qchat(8)"
        );
    }
}

#[test]
fn shipped_config_is_valid_and_shows_every_key_with_its_default() {
    let sb = Sandbox::new("shipped");
    let shipped = root("packaging/qchat.toml");
    let p = sb.write("qchat.toml", &shipped);
    let r = run(sb.cmd(&["check-config", "--config", p.to_str().unwrap()]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    // Uncommenting every `# key = value` line gives the built-in defaults.
    let uncommented: String = shipped
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split(' ').nth(1) == Some("=")
                    && rest.chars().next().is_some_and(|c| c.is_ascii_lowercase()) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let parsed: ralph_qchat::config::Config = toml::from_str(&uncommented).unwrap();
    let mut expected = ralph_qchat::config::Config::default();
    expected.adapter.command = "q".into();
    expected.adapter.args = Some(ralph_qchat::config::AgentName::Qchat.default_args());
    expected.adapter.preflight = Some(vec!["q".into(), "whoami".into()]);
    assert_eq!(parsed, expected);
    let table: toml::Table = toml::from_str(&uncommented).unwrap();
    let mut shown = BTreeSet::new();
    for (s, v) in &table {
        for k in v.as_table().unwrap().keys() {
            shown.insert(format!("{s}.{k}"));
        }
    }
    assert_eq!(shown, code_keys());
}

/// Every `cargo run` line of the README runs as written: with more than one
/// binary in the package (the daemon and the benchmark), cargo refuses a bare
/// `cargo run` ("could not determine which binary to run") unless the package
/// names its default binary, and that must be the daemon's.
#[test]
fn readme_cargo_run_lines_pick_the_daemon_binary() {
    let readme = root("README.md");
    let runs: Vec<&str> = readme
        .lines()
        .filter(|l| l.contains("cargo run") && !l.contains("--bin"))
        .collect();
    assert!(!runs.is_empty(), "the README shows no `cargo run` line");
    let manifest: toml::Table = toml::from_str(&root("Cargo.toml")).unwrap();
    let package = manifest["package"].as_table().unwrap();
    let name = package["name"].as_str().unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut binaries = 0;
    if dir.join("src/main.rs").is_file() {
        binaries += 1;
    }
    if let Ok(rd) = std::fs::read_dir(dir.join("src/bin")) {
        binaries += rd.flatten().count();
    }
    binaries += manifest
        .get("bin")
        .and_then(|b| b.as_array())
        .map_or(0, |b| b.len());
    if binaries > 1 {
        assert_eq!(
            package.get("default-run").and_then(|v| v.as_str()),
            Some(name),
            "{binaries} binaries and no default-run = {name:?} in Cargo.toml: these README lines fail with \
             \"could not determine which binary to run\":\n{}",
            runs.join("\n")
        );
    }
}

/// Every profile is in ralph-qchat.toml(5)'s PROFILES section, with the
/// command line it runs.
#[test]
fn every_profile_is_documented_with_what_it_runs() {
    let man = root("man/ralph-qchat.toml.5");
    let start = man.find(".SH PROFILES").expect("a PROFILES section");
    let end = man[start..]
        .find(".SH \"OUTCOME")
        .map_or(man.len(), |e| start + e);
    let section = man[start..end].replace("\\-", "-").replace("\n", " ");
    for p in ralph_qchat::agent::profile::PROFILES {
        assert!(
            section.contains(&format!(".B {} ", p.name)),
            "profile {} is not in PROFILES",
            p.name
        );
        if !p.command.is_empty() {
            let line = format!("{} {}", p.command, p.args.join(" "));
            assert!(
                section.contains(&line),
                "PROFILES does not show `{line}` for {}",
                p.name
            );
        }
        for (k, v) in p.env.iter().chain(p.root_env) {
            assert!(
                section.contains(&format!("{k}={v}")),
                "PROFILES does not show {k}={v} for {}",
                p.name
            );
        }
        if !p.preflight.is_empty() {
            let pre = format!("{} {}", p.command, p.preflight.join(" "));
            assert!(
                section.contains(&pre),
                "PROFILES does not show the preflight `{pre}`"
            );
        }
    }
}

#[test]
fn the_benchmark_prints_its_help_instead_of_running() {
    let bench = env!("CARGO_BIN_EXE_ralph-qchat-bench");
    let sb = Sandbox::new("bench-help");
    for arg in ["--help", "-h"] {
        let mut c = std::process::Command::new(bench);
        c.arg(arg).current_dir(&sb.dir);
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let r = run(c);
        assert_eq!(r.code(), 0, "{}", r.stderr);
        assert!(
            r.stdout.contains("usage: ralph-qchat-bench"),
            "{}",
            r.stdout
        );
        assert!(
            !sb.path("BENCHMARKS.md").exists(),
            "{arg} ran the benchmark"
        );
    }
    for bad in [&["--bogus"][..], &["--only", "nosuch"], &["--only"]] {
        let mut c = std::process::Command::new(bench);
        c.args(bad).current_dir(&sb.dir);
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let r = run(c);
        assert_eq!(r.code(), 64, "{bad:?}: {}", r.stderr);
    }
}
