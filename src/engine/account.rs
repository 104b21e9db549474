//! The agent account's gates, shared by every task of the profile: a
//! throttle pause (one shared back-off, so a throttle storm is one wait, not
//! N tasks hammering the API), and the quota and auth pauses, which are
//! persisted so a restart does not spend requests on the same error. Auth
//! ends when the preflight passes; this type says when one is due.

use crate::store::pauses::{Pause, PauseKind};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The longest a message's reset hint may pause a profile.
pub const MAX_PAUSE: Duration = Duration::from_secs(32 * 86400);

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Default)]
pub struct Account {
    pub profile: String,
    pub pauses: BTreeMap<String, Pause>,
    throttle_until: Option<Instant>,
    /// Throttled answers since the last success, for the shared back-off.
    pub throttles_in_row: u32,
    /// A preflight is running; nothing is dispatched until it answers.
    pub preflight_running: bool,
    /// When the next preflight of an auth pause is due.
    pub preflight_at: Option<Instant>,
}

impl Account {
    pub fn new(profile: &str, pauses: BTreeMap<String, Pause>) -> Account {
        Account {
            profile: profile.to_string(),
            pauses,
            ..Account::default()
        }
    }

    /// This profile's pause, once a quota pause's time has not yet come.
    pub fn paused(&self, now_unix: i64) -> Option<&Pause> {
        self.pauses
            .get(&self.profile)
            .filter(|p| p.kind == PauseKind::Auth || p.until.is_some_and(|u| u > now_unix))
    }

    /// Why requests may not go now, if they may not.
    pub fn closed(&self, now: Instant, now_unix: i64) -> Option<&'static str> {
        if self.preflight_running {
            Some("preflight")
        } else if self.paused(now_unix).is_some() {
            Some("paused")
        } else if self.throttle_until.is_some_and(|t| t > now) {
            Some("throttled")
        } else {
            None
        }
    }

    /// When a closed account gate may open (an auth pause opens through
    /// the preflight, whose own time the scheduler keeps).
    pub fn opens_at(&self, now: Instant, now_unix: i64) -> Option<Instant> {
        if self.preflight_running {
            return None;
        }
        if let Some(p) = self.paused(now_unix) {
            return p
                .until
                .map(|u| now + Duration::from_secs(u.saturating_sub(now_unix).max(0) as u64));
        }
        self.throttle_until.filter(|t| *t > now)
    }

    /// Every task waits `delay` (the longest asked for wins).
    pub fn throttle(&mut self, now: Instant, delay: Duration) {
        self.throttles_in_row += 1;
        let until = now + delay;
        if self.throttle_until.is_none_or(|t| t < until) {
            self.throttle_until = Some(until);
        }
    }

    pub fn succeeded(&mut self) {
        self.throttles_in_row = 0;
        self.throttle_until = None;
    }

    /// Starts (or extends) this profile's pause; true when it is new.
    pub fn pause(&mut self, p: Pause) -> bool {
        let new = self
            .pauses
            .get(&self.profile)
            .is_none_or(|old| old.kind != p.kind);
        self.pauses.insert(self.profile.clone(), p);
        new
    }

    /// Ends this profile's pause; the pause that ended, if there was one.
    pub fn resume(&mut self) -> Option<Pause> {
        self.preflight_at = None;
        self.pauses.remove(&self.profile)
    }

    /// Quota pauses whose time has come; true when any was removed.
    pub fn expire(&mut self, now_unix: i64) -> Vec<(String, Pause)> {
        let done: Vec<String> = self
            .pauses
            .iter()
            .filter(|(_, p)| p.kind == PauseKind::Quota && p.until.is_none_or(|u| u <= now_unix))
            .map(|(k, _)| k.clone())
            .collect();
        done.into_iter()
            .filter_map(|k| self.pauses.remove(&k).map(|p| (k, p)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause(kind: PauseKind, until: Option<i64>) -> Pause {
        Pause {
            kind,
            until,
            message: "m".into(),
            remedy: "r".into(),
            since: 0,
        }
    }

    #[test]
    fn a_quota_pause_closes_until_its_time() {
        let now = Instant::now();
        let mut a = Account::new("kiro", BTreeMap::new());
        assert_eq!(a.closed(now, 100), None);
        assert!(a.pause(pause(PauseKind::Quota, Some(160))));
        assert_eq!(a.closed(now, 100), Some("paused"));
        assert_eq!(a.opens_at(now, 100), Some(now + Duration::from_secs(60)));
        assert_eq!(a.closed(now, 160), None);
        assert_eq!(a.expire(160).len(), 1);
        assert!(a.pauses.is_empty());
    }

    #[test]
    fn pauses_of_another_profile_do_not_close_this_one() {
        let now = Instant::now();
        let mut m = BTreeMap::new();
        m.insert("qchat".to_string(), pause(PauseKind::Auth, None));
        let a = Account::new("kiro", m);
        assert_eq!(a.closed(now, 0), None);
    }

    #[test]
    fn throttles_share_one_wait_and_a_success_ends_it() {
        let now = Instant::now();
        let mut a = Account::new("q", BTreeMap::new());
        a.throttle(now, Duration::from_secs(10));
        a.throttle(now, Duration::from_secs(2));
        assert_eq!(a.opens_at(now, 0), Some(now + Duration::from_secs(10)));
        assert_eq!(a.throttles_in_row, 2);
        a.succeeded();
        assert_eq!(a.closed(now, 0), None);
    }
}
