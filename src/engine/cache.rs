//! Opt-in response cache: an identical request (argv, workdir, prompt-file
//! content) within `ttl` reuses the recorded successful outcome. Off by
//! default, because agents change files and a rerun is rarely identical work.

use crate::agent::AgentOutcome;
use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

pub struct Cache {
    max_size: usize,
    ttl: Duration,
    entries: HashMap<u64, (Instant, AgentOutcome)>,
    order: VecDeque<u64>,
    pub hits: u64,
}

pub fn key(
    program: &std::ffi::OsStr,
    args: &[std::ffi::OsString],
    workdir: &std::path::Path,
    prompt: &[u8],
) -> u64 {
    let mut h = DefaultHasher::new();
    program.hash(&mut h);
    args.hash(&mut h);
    workdir.hash(&mut h);
    prompt.hash(&mut h);
    h.finish()
}

impl Cache {
    pub fn new(max_size: usize, ttl: Duration) -> Cache {
        Cache {
            max_size,
            ttl,
            entries: HashMap::new(),
            order: VecDeque::new(),
            hits: 0,
        }
    }

    pub fn get(&mut self, key: u64, now: Instant) -> Option<AgentOutcome> {
        match self.entries.get(&key) {
            Some((at, o)) if now.duration_since(*at) < self.ttl => {
                self.hits += 1;
                Some(o.clone())
            }
            Some(_) => {
                self.entries.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn put(&mut self, key: u64, outcome: AgentOutcome, now: Instant) {
        if self.max_size == 0 {
            return;
        }
        if self.entries.insert(key, (now, outcome)).is_none() {
            self.order.push_back(key);
        }
        while self.entries.len() > self.max_size {
            match self.order.pop_front() {
                Some(old) => {
                    self.entries.remove(&old);
                }
                None => break,
            }
        }
        self.order.retain(|k| self.entries.contains_key(k));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Ending;

    fn outcome() -> AgentOutcome {
        AgentOutcome {
            ending: Ending::Exited(0),
            duration: Duration::from_secs(1),
            bytes_read: 1,
            bytes_dropped: 0,
            marker_seen: false,
            tail: vec![],
            class: crate::agent::Class::Success,
            decided_by: None,
            wait: None,
            wait_from: 0,
            usage: Default::default(),
            resources: Default::default(),
            tree_before: None,
            tree_after: None,
            lines: vec![],
        }
    }

    #[test]
    fn hit_within_ttl_miss_after_and_bounded() {
        let t = Instant::now();
        let mut c = Cache::new(2, Duration::from_secs(10));
        c.put(1, outcome(), t);
        assert!(c.get(1, t + Duration::from_secs(9)).is_some());
        assert!(c.get(1, t + Duration::from_secs(10)).is_none());
        c.put(1, outcome(), t);
        c.put(2, outcome(), t);
        c.put(3, outcome(), t);
        assert_eq!(c.len(), 2);
        assert!(c.get(1, t).is_none(), "oldest evicted");
        assert_ne!(
            key("q".as_ref(), &[], "/a".as_ref(), b"x"),
            key("q".as_ref(), &[], "/a".as_ref(), b"y")
        );
    }
}
