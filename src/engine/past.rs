//! Finished tasks, out of the scheduler's hot set. A daemon that has run
//! 100,000 tasks must cost what one that ran 100 costs: every publish clones
//! the hot set and every timer walks it, so a task leaves it once it has
//! ended and its last record is on disk. What stays in memory is the last
//! `RECENT` of them (for /tasks) and counts by status (for /metrics); the
//! records stay on disk, where `status` reads them.

use crate::task::{Status, TaskState};
use std::collections::VecDeque;
use std::sync::Arc;

/// Finished tasks /tasks shows beside the unfinished ones.
pub const RECENT: usize = 100;

#[derive(Default)]
pub struct Past {
    /// Oldest first.
    recent: VecDeque<Arc<TaskState>>,
    /// Finished tasks no longer in `recent`, by `Status::ALL` index.
    older: [u64; 7],
}

fn index(s: Status) -> usize {
    Status::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

impl Past {
    /// A task that has just ended (its record is on disk).
    pub fn push(&mut self, t: Arc<TaskState>) {
        self.recent.push_back(t);
        while self.recent.len() > RECENT {
            if let Some(old) = self.recent.pop_front() {
                self.older[index(old.status)] += 1;
            }
        }
    }

    /// A finished task found on disk at start: the `RECENT` that finished
    /// last are kept (records come in directory order).
    pub fn restore(&mut self, t: TaskState) {
        if self.recent.len() < RECENT {
            self.recent.push_back(Arc::new(t));
            return;
        }
        let (i, oldest) = self
            .recent
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.finished_at.cmp(&b.1.finished_at))
            .map(|(i, o)| (i, o.finished_at.clone()))
            .unwrap_or_default();
        if t.finished_at > oldest {
            if let Some(old) = self.recent.remove(i) {
                self.older[index(old.status)] += 1;
            }
            self.recent.push_back(Arc::new(t));
        } else {
            self.older[index(t.status)] += 1;
        }
    }

    /// Once every record is restored: oldest first, as `push` keeps them.
    pub fn sort(&mut self) {
        self.recent
            .make_contiguous()
            .sort_by(|a, b| a.finished_at.cmp(&b.finished_at));
    }

    pub fn recent(&self) -> impl Iterator<Item = &Arc<TaskState>> {
        self.recent.iter()
    }

    /// A task of this id is new (its old record was cleaned away).
    pub fn forget(&mut self, id: &str) {
        if let Some(i) = self.recent.iter().position(|t| t.id == id) {
            if let Some(old) = self.recent.remove(i) {
                self.older[index(old.status)] += 1;
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<&Arc<TaskState>> {
        self.recent.iter().find(|t| t.id == id)
    }

    /// Finished tasks not in `recent`, by status.
    pub fn older(&self) -> Vec<(&'static str, u64)> {
        Status::ALL
            .iter()
            .zip(self.older)
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| (s.as_str(), n))
            .collect()
    }

    /// Every finished task this process knows of, by status.
    pub fn count(&self, s: Status) -> u64 {
        self.older[index(s)] + self.recent.iter().filter(|t| t.status == s).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(id: &str, at: &str, s: Status) -> TaskState {
        let mut t = TaskState::new(id, "/p", "/w");
        t.status = s;
        t.finished_at = Some(at.into());
        t
    }

    #[test]
    fn keeps_the_last_finished_and_counts_the_rest() {
        let mut p = Past::default();
        for i in 0..(RECENT + 50) {
            let s = if i % 2 == 0 {
                Status::Completed
            } else {
                Status::Failed
            };
            p.push(Arc::new(done(&format!("t{i}"), &format!("{i:06}"), s)));
        }
        assert_eq!(p.recent().count(), RECENT);
        assert_eq!(p.recent().next().unwrap().id, "t50");
        assert_eq!(p.count(Status::Completed), 75);
        assert_eq!(p.count(Status::Failed), 75);
        assert_eq!(p.older(), vec![("completed", 25), ("failed", 25)]);
    }

    #[test]
    fn restoring_keeps_the_latest_whatever_the_order() {
        let mut p = Past::default();
        // Newest first, as a directory may list them.
        for i in (0..(RECENT + 30)).rev() {
            p.restore(done(
                &format!("t{i:04}"),
                &format!("{i:06}"),
                Status::Completed,
            ));
        }
        p.sort();
        assert_eq!(p.recent().count(), RECENT);
        assert_eq!(p.recent().next().unwrap().id, "t0030");
        assert_eq!(
            p.recent().last().unwrap().id,
            format!("t{:04}", RECENT + 29)
        );
        assert_eq!(p.count(Status::Completed), (RECENT + 30) as u64);
        assert!(p.get("t0029").is_none() && p.get("t0030").is_some());
    }
}
