//! Where the daemon and its clients find the configuration and the state
//! directory when the operator does not say.

use super::load::{Loaded, Source};
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
    default_for(unsafe { libc::geteuid() }, env)
}

fn default_for(euid: u32, env: &[(String, String)]) -> PathBuf {
    if euid == 0 {
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

/// For `status`: `$STATE_DIRECTORY` (systemd, as the daemon reads it), else
/// a configured directory, else the `run` state in the current directory when
/// there is one, else the service's.
pub fn client_state_dir(loaded: &Loaded, env: &[(String, String)], prefer_local: bool) -> PathBuf {
    if let Some((_, v)) = env.iter().find(|(k, _)| k == "STATE_DIRECTORY")
        && let Some(first) = v.split(':').find(|s| !s.is_empty())
    {
        return PathBuf::from(first);
    }
    let configured = &loaded.config.paths.state_dir;
    if !configured.is_empty() {
        return PathBuf::from(configured);
    }
    if prefer_local && Path::new(".ralph-qchat").is_dir() {
        return PathBuf::from(".ralph-qchat");
    }
    user_default(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layers;

    fn loaded(flag: Option<&str>, file_value: &str) -> Loaded {
        let mut l = crate::config::load(&Layers::default()).unwrap();
        l.config.paths.state_dir = flag.unwrap_or(file_value).to_string();
        if flag.is_some() {
            l.sources
                .insert("paths.state_dir".into(), Source::Flag("--state-dir".into()));
        }
        l
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn state_dir_precedence() {
        let sd = env(&[("STATE_DIRECTORY", "/var/lib/from-systemd:/var/lib/other")]);
        assert_eq!(
            daemon_state_dir(&loaded(Some("/flag"), ""), &sd),
            PathBuf::from("/flag")
        );
        assert_eq!(
            daemon_state_dir(&loaded(None, "/conf"), &sd),
            PathBuf::from("/var/lib/from-systemd")
        );
        assert_eq!(
            daemon_state_dir(&loaded(None, "/conf"), &[]),
            PathBuf::from("/conf")
        );
    }

    #[test]
    fn default_is_var_lib_for_root_and_xdg_for_a_normal_user() {
        let e = env(&[("XDG_STATE_HOME", "/x/state"), ("HOME", "/h")]);
        assert_eq!(default_for(0, &e), PathBuf::from("/var/lib/ralph-qchat"));
        assert_eq!(default_for(1000, &e), PathBuf::from("/x/state/ralph-qchat"));
        assert_eq!(
            default_for(1000, &env(&[("HOME", "/h")])),
            PathBuf::from("/h/.local/state/ralph-qchat")
        );
    }
}
