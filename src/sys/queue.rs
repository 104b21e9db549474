//! crossbeam channels whose receivers go to sleep at once when there is
//! nothing to take. A crossbeam receiver that finds its channel empty spins
//! and then calls `sched_yield` four times before it sleeps: with every
//! thread of the daemon waiting for the next request most of the time, that
//! was 12 `sched_yield` per request (each a trip through the kernel's
//! scheduler, often a switch to another thread and back) on two cores the
//! agents need. Here the channel only holds the values; a receiver that
//! finds it empty puts itself on a list of sleepers and parks, and a send
//! wakes the first sleeper on that list (no system call when none sleeps).
//!
//! Why no wake is lost: a receiver puts itself on the list and then looks
//! at the channel once more before it parks, and a sender puts the value in
//! the channel before it takes a sleeper off the list (both under the list's
//! lock), so a value sent meanwhile is either seen by that last look or wakes
//! a sleeper. A woken receiver looks at the channel before anything else.

use crossbeam_channel::{RecvTimeoutError, SendError, TryRecvError};
use crossbeam_utils::sync::{Parker, Unparker};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

struct Sleepers {
    list: Mutex<Vec<(u64, Unparker)>>,
    ids: AtomicU64,
}

impl Sleepers {
    fn lock(&self) -> MutexGuard<'_, Vec<(u64, Unparker)>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_one(&self) {
        let first = {
            let mut l = self.lock();
            (!l.is_empty()).then(|| l.remove(0))
        };
        if let Some((_, u)) = first {
            u.unpark();
        }
    }

    fn wake_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        for (_, u) in all {
            u.unpark();
        }
    }
}

/// An unbounded channel: any number of senders and receivers.
pub fn unbounded<T>() -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let sleepers = Arc::new(Sleepers {
        list: Mutex::new(Vec::new()),
        ids: AtomicU64::new(0),
    });
    (
        Sender {
            tx: Some(tx),
            sleepers: sleepers.clone(),
        },
        Receiver::with(rx, sleepers),
    )
}

pub struct Sender<T> {
    // Taken out only by drop, which must let the channel see one sender
    // fewer before it wakes the sleepers to find out.
    tx: Option<crossbeam_channel::Sender<T>>,
    sleepers: Arc<Sleepers>,
}

impl<T> Sender<T> {
    pub fn send(&self, v: T) -> Result<(), SendError<T>> {
        match &self.tx {
            Some(tx) => tx.send(v)?,
            None => return Err(SendError(v)),
        }
        self.sleepers.wake_one();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            tx: self.tx.clone(),
            sleepers: self.sleepers.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    /// The last sender gone, receivers must wake to be told: every sleeper
    /// looks (senders are dropped rarely: at shutdown and reload).
    fn drop(&mut self) {
        drop(self.tx.take());
        self.sleepers.wake_all();
    }
}

pub struct Receiver<T> {
    rx: crossbeam_channel::Receiver<T>,
    sleepers: Arc<Sleepers>,
    parker: Parker,
    id: u64,
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        Receiver::with(self.rx.clone(), self.sleepers.clone())
    }
}

impl<T> Receiver<T> {
    fn with(rx: crossbeam_channel::Receiver<T>, sleepers: Arc<Sleepers>) -> Receiver<T> {
        let id = sleepers.ids.fetch_add(1, Ordering::Relaxed);
        Receiver {
            rx,
            sleepers,
            parker: Parker::new(),
            id,
        }
    }

    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        self.rx.try_recv()
    }

    pub fn recv(&self) -> Result<T, crossbeam_channel::RecvError> {
        self.wait(None).map_err(|_| crossbeam_channel::RecvError)
    }

    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        self.wait(Instant::now().checked_add(timeout))
    }

    pub fn recv_deadline(&self, deadline: Instant) -> Result<T, RecvTimeoutError> {
        self.wait(Some(deadline))
    }

    /// Values until every sender is gone.
    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(|| self.recv().ok())
    }

    fn wait(&self, deadline: Option<Instant>) -> Result<T, RecvTimeoutError> {
        let mut listed = false;
        let out = loop {
            match self.rx.try_recv() {
                Ok(v) => break Ok(v),
                Err(TryRecvError::Disconnected) => break Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            if !listed {
                let mut l = self.sleepers.lock();
                if !l.iter().any(|(id, _)| *id == self.id) {
                    l.push((self.id, self.parker.unparker().clone()));
                }
                listed = true;
                // The last look, now that a send will wake us.
                continue;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break Err(RecvTimeoutError::Timeout);
            }
            match deadline {
                Some(d) => self.parker.park_deadline(d),
                None => self.parker.park(),
            }
            // Taken off the list by a sender, or woken by time: listed again
            // (if it is not still) before the next park.
            listed = false;
        };
        // Always off the list: one left on it while busy would take a wake
        // an idle receiver should have had.
        self.unlist(out.is_ok());
        out
    }

    /// Off the list, on the way out. One that a sender took off the list
    /// (a wake meant for it) but that leaves without a value passes the
    /// wake on, so a value a sleeper should have been woken for is not left
    /// waiting.
    fn unlist(&self, got: bool) {
        let was_listed = {
            let mut l = self.sleepers.lock();
            let at = l.iter().position(|(id, _)| *id == self.id);
            at.map(|i| l.remove(i)).is_some()
        };
        if !was_listed && !got {
            self.sleepers.wake_one();
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.unlist(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_sent_from_many_threads_reaches_one_of_many_receivers() {
        let (tx, rx) = unbounded::<u64>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let takers: Vec<_> = (0..8)
            .map(|_| {
                let rx = rx.clone();
                let done = done_tx.clone();
                std::thread::spawn(move || {
                    for v in rx.iter() {
                        let _ = done.send(v);
                    }
                })
            })
            .collect();
        drop(rx);
        let senders: Vec<_> = (0..4u64)
            .map(|k| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        tx.send(k * 10_000 + i).unwrap();
                        if i % 7 == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        let mut got: Vec<u64> = (0..8000)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort();
        let mut want: Vec<u64> = (0..4u64)
            .flat_map(|k| (0..2000).map(move |i| k * 10_000 + i))
            .collect();
        want.sort();
        assert_eq!(got, want);
        // The last sender gone, every receiver ends.
        drop(tx);
        for t in takers {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_sleeping_receiver_wakes_for_a_value_and_times_out_without_one() {
        let (tx, rx) = unbounded::<&str>();
        let t0 = Instant::now();
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(50)),
            Err(RecvTimeoutError::Timeout)
        );
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            tx.send("hello").unwrap();
            tx
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok("hello"));
        let tx = sender.join().unwrap();
        let waiting = std::thread::spawn(move || rx.recv_timeout(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(30));
        drop(tx);
        assert_eq!(waiting.join().unwrap(), Err(RecvTimeoutError::Disconnected));
    }
}
