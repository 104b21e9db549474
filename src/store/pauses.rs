//! Account pauses on disk: `<state_dir>/pauses.json`, one entry per
//! profile that is out of quota or logged out, so a restart does not spend
//! the next hour's requests on the same error. Written atomically by the
//! scheduler whenever a pause begins or ends (rarely).

use super::atomic::write_atomic;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseKind {
    /// Ends at `until`.
    Quota,
    /// Ends when the profile's preflight passes (or, without one, a probe
    /// attempt succeeds).
    Auth,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pause {
    pub kind: PauseKind,
    /// Unix seconds when a quota pause ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// The CLI's own words.
    pub message: String,
    /// What the operator can do about it.
    pub remedy: String,
    /// Unix seconds when the pause began.
    pub since: i64,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("pauses.json")
}

/// The pauses an earlier process left; a damaged file is reported and
/// treated as none (a pause is an optimisation of waiting, never state a
/// task depends on).
pub fn load(state_dir: &Path) -> (BTreeMap<String, Pause>, Option<String>) {
    let p = path(state_dir);
    match std::fs::read(&p) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(m) => (m, None),
            Err(e) => (
                BTreeMap::new(),
                Some(format!("{} is not valid ({e}); ignoring it", p.display())),
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (BTreeMap::new(), None),
        Err(e) => (
            BTreeMap::new(),
            Some(format!("cannot read {}: {e}; ignoring it", p.display())),
        ),
    }
}

pub fn save(state_dir: &Path, pauses: &BTreeMap<String, Pause>) -> std::io::Result<()> {
    let p = path(state_dir);
    if pauses.is_empty() {
        return match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let mut bytes = serde_json::to_vec_pretty(pauses).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(&p, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_removal() {
        let d = std::env::temp_dir().join(format!("rq-pauses-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let mut m = BTreeMap::new();
        m.insert(
            "kiro".to_string(),
            Pause {
                kind: PauseKind::Quota,
                until: Some(1_800_000_000),
                message: "The monthly usage limit has been reached".into(),
                remedy: "wait".into(),
                since: 1_700_000_000,
            },
        );
        save(&d, &m).unwrap();
        assert_eq!(load(&d), (m, None));
        save(&d, &BTreeMap::new()).unwrap();
        assert!(!path(&d).exists());
        std::fs::write(path(&d), b"{").unwrap();
        assert!(load(&d).1.is_some());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
