//! Where the daemon and its clients find the configuration and the state
//! directory when the operator does not say.

use crate::config::{Loaded, Source};
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/ralph-qchat/qchat.toml";

/// `--config` if given (must exist), else the system file if it exists.
pub fn config_file(flag: Option<&Path>) -> (Option<PathBuf>, bool) {
    match flag {
        Some(p) => (Some(p.to_path_buf()), true),
        None => (Some(PathBuf::from(DEFAULT_CONFIG)), false),
    }
}

/// The service's state directory: `--state-dir`, else `$STATE_DIRECTORY`
/// (systemd), else `[paths] state_dir`, else /var/lib/ralph-qchat for root and
/// the XDG state directory for anyone else.
pub fn daemon_state_dir(loaded: &Loaded, env: &[(String, String)]) -> PathBuf {
    let d = pick_daemon_state_dir(loaded, env);
    std::path::absolute(&d).unwrap_or(d)
}

fn pick_daemon_state_dir(loaded: &Loaded, env: &[(String, String)]) -> PathBuf {
    let configured = &loaded.config.paths.state_dir;
    if matches!(loaded.source_of("paths.state_dir"), Source::Flag(_)) {
        return PathBuf::from(configured);
    }
    if let Some((_, v)) = env.iter().find(|(k, _)| k == "STATE_DIRECTORY") {
        // systemd lists one directory per StateDirectory= entry, colon-separated.
        if let Some(first) = v.split(':').find(|s| !s.is_empty()) {
            return PathBuf::from(first);
        }
    }
    if !configured.is_empty() {
        return PathBuf::from(configured);
    }
    user_default(env)
}

fn user_default(env: &[(String, String)]) -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/ralph-qchat");
    }
    let get = |k: &str| {
        env.iter()
            .find(|(n, v)| n == k && !v.is_empty())
            .map(|(_, v)| PathBuf::from(v))
    };
    if let Some(x) = get("XDG_STATE_HOME").filter(|p| p.is_absolute()) {
        return x.join("ralph-qchat");
    }
    match get("HOME") {
        Some(h) => h.join(".local/state/ralph-qchat"),
        None => PathBuf::from("/var/lib/ralph-qchat"),
    }
}

/// For `status`: an explicit or configured directory, else the `run` state
/// in the current directory when there is one, else the service's.
pub fn client_state_dir(loaded: &Loaded, env: &[(String, String)], prefer_local: bool) -> PathBuf {
    let configured = &loaded.config.paths.state_dir;
    if !configured.is_empty() {
        return PathBuf::from(configured);
    }
    if prefer_local && Path::new(".ralph-qchat").is_dir() {
        return PathBuf::from(".ralph-qchat");
    }
    user_default(env)
}
