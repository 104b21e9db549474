//! The scheduler's writer: task records leave the scheduler as bytes and are
//! made durable here in batches — all temporary files written and synced,
//! then renamed, then each directory synced once — so a durable write costs
//! per batch, not per event, and never holds up dispatching. The scheduler's
//! other file chores (saving the counters, pruning old transcripts) are done
//! here too, for the same reason: an fsync can take milliseconds.
//!
//! Batches start at most once per `TICK`. Without it the writer, whenever it
//! finished a batch, began the next with the one or two records that changed
//! meanwhile: with twenty fast agents it wrote ~1,300 records a second and
//! took a fifth of the machine (each a new inode, an fsync, a rename, a
//! directory fsync), the largest cost per request the benchmark found. With
//! the tick a task is written at most ten times a second however fast it
//! iterates; a record that changes after a quiet spell is written at once,
//! and so is a batch marked urgent (a task changed status: started, ended),
//! so the moments an operator looks for are on disk without the tick's delay.

use super::tasks::TaskStore;
use crossbeam_channel::{Receiver, Sender};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The shortest time between the starts of two batches: what a kill -9 under
/// sustained load can take back of task records (the iterations it covers
/// run again on restart).
pub const TICK: Duration = Duration::from_millis(100);

/// What the writer reports after each batch: the tasks it could not write,
/// and those now durably on disk.
#[derive(Debug, Default)]
pub struct Written {
    pub failed: Vec<String>,
    pub ok: Vec<String>,
    pub error: Option<String>,
}

/// Task ids and their encoded records.
pub type Batch = Vec<(String, Vec<u8>)>;

/// What the writer is asked to do.
enum Msg {
    /// Records, and whether they must not wait for the tick.
    Tasks(Batch, bool),
    /// Replace a file durably (the newest content wins); failures are logged.
    File(PathBuf, Vec<u8>),
    /// Keep only the newest `keep` transcripts of a task.
    Prune(String, usize),
    /// The task's last record was sent.
    Finished(String),
}

pub struct Writer {
    tx: Option<Sender<Msg>>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    /// Batches start at most once per `tick` (see `TICK`); `report`
    /// receives one `Written` per batch.
    pub fn start(
        store: TaskStore,
        tick: Duration,
        report: impl Fn(Written) + Send + 'static,
    ) -> std::io::Result<Writer> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || run(store, tick, rx, report))?;
        Ok(Writer {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Records to write; `urgent` ones are written without waiting for the
    /// tick, together with whatever is queued.
    pub fn send(&self, batch: Batch, urgent: bool) {
        self.post(Msg::Tasks(batch, urgent));
    }

    pub fn save_file(&self, path: PathBuf, bytes: Vec<u8>) {
        self.post(Msg::File(path, bytes));
    }

    pub fn prune_transcripts(&self, id: &str, keep: usize) {
        self.post(Msg::Prune(id.to_string(), keep));
    }

    /// The task's last record was sent: its spare goes (a finished task
    /// would keep a second file for ever); one more record makes it anew.
    pub fn finished(&self, id: &str) {
        self.post(Msg::Finished(id.to_string()));
    }

    fn post(&self, msg: Msg) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(msg);
        }
    }

    /// Writes what is queued and stops.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.finish();
    }
}

fn run(store: TaskStore, tick: Duration, rx: Receiver<Msg>, report: impl Fn(Written)) {
    let mut last: Option<Instant> = None;
    // Held per batch: a backup takes it to read every record as of one instant.
    let lock = super::backup::RecordsLock::open(store.state_dir());
    while let Ok(first) = rx.recv() {
        // Everything queued meanwhile joins this batch; the newest record wins.
        let mut batch: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut files: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
        let mut prunes: BTreeMap<String, usize> = BTreeMap::new();
        let mut finished: BTreeSet<String> = BTreeSet::new();
        let mut take = |msg: Msg| match msg {
            Msg::Tasks(b, urgent) => {
                batch.extend(b);
                urgent
            }
            Msg::File(p, bytes) => {
                files.insert(p, bytes);
                false
            }
            Msg::Prune(id, keep) => {
                prunes.insert(id, keep);
                false
            }
            Msg::Finished(id) => {
                finished.insert(id);
                false
            }
        };
        // Gather until a tick has passed since the last batch began, or
        // something urgent came; at shutdown (the channel closed) write at once.
        // The deadline is looked at after every message: recv_deadline looks
        // at it only once it has found the channel empty for its whole spin,
        // and on a loaded machine (each of its yields a time slice) records
        // came faster than that, so no batch was written for as long as the
        // load lasted — records 200 iterations behind the agents.
        if let (false, Some(at)) = (take(first), last) {
            let due = at + tick;
            while let Ok(more) = rx.recv_deadline(due) {
                if take(more) || Instant::now() >= due {
                    break;
                }
            }
        }
        // What is queued now, not what keeps coming while it is taken.
        for more in rx.try_iter().take(rx.len()) {
            take(more);
        }
        last = Some(Instant::now());
        let held = lock.hold();
        if !batch.is_empty() {
            report(write_batch(&store, batch));
        }
        for (path, bytes) in files {
            if let Err(e) = super::atomic::write_atomic(&path, &bytes) {
                log::debug!("cannot save {}: {e}", path.display());
            }
        }
        drop(held);
        for (id, keep) in prunes {
            store.prune_transcripts(&id, keep);
        }
        for id in finished {
            let _ = std::fs::remove_file(store.task_dir(&id).join(SPARE));
        }
    }
}

/// A task's next record is written into this file, synced, and swapped
/// with state.json (renameat2 RENAME_EXCHANGE), which leaves the record
/// before it here to be overwritten next time. Renaming a new file over
/// state.json instead made and freed an inode per record: on ext4 without
/// a journal each new inode then searches past the recently freed ones
/// (`recently_deleted`), a tenth of the daemon's CPU at high rates, and the
/// transcripts' first files paid it too. As durable as the rename: the
/// record is synced before the swap, the directory after it.
///
/// A reader that opened state.json and still reads it two records later
/// can see it emptied or partly rewritten, never two records mixed (it is
/// truncated first): `tasks::read_record` reads again when what it read
/// does not parse.
pub const SPARE: &str = ".state.json.tmp";

fn write_batch(store: &TaskStore, batch: BTreeMap<String, Vec<u8>>) -> Written {
    let mut out = Written::default();
    let fail = |id: &str, what: String, out: &mut Written| {
        out.failed.push(id.to_string());
        out.error.get_or_insert(what);
    };
    let mut staged: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    for (id, bytes) in &batch {
        let dir = store.task_dir(id);
        let iterations = store.transcript_dir(id);
        let tmp = dir.join(SPARE);
        let written = (|| {
            if !iterations.is_dir() {
                super::atomic::create_dirs(&iterations)?;
            }
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        match written {
            Ok(()) => staged.push((id.clone(), tmp, dir.join("state.json"))),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                fail(
                    id,
                    format!("cannot write state of task {id}: {e}"),
                    &mut out,
                );
            }
        }
    }
    let mut dirs = BTreeSet::new();
    for (id, tmp, dest) in staged {
        match crate::sys::rename::exchange(&tmp, &dest) {
            Ok(_) => {
                dirs.insert((id, dest.parent().map(PathBuf::from).unwrap_or_default()));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                fail(
                    &id,
                    format!("cannot write state of task {id}: {e}"),
                    &mut out,
                );
            }
        }
    }
    for (id, dir) in dirs {
        match File::open(&dir).and_then(|d| d.sync_all()) {
            Ok(()) => out.ok.push(id),
            Err(e) => fail(&id, format!("cannot sync {}: {e}", dir.display()), &mut out),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// An empty state directory of this test's own.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ralph-qchat-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tasks")).unwrap();
        dir
    }

    #[test]
    fn batches_land_and_failures_are_reported() {
        let dir = scratch("writer");
        // A file where a task directory should be: that task cannot be written.
        std::fs::write(dir.join("tasks").join("blocked"), "x").unwrap();
        let store = TaskStore::new(&dir);
        let reports = Arc::new(Mutex::new(Vec::new()));
        let r = reports.clone();
        let mut w = Writer::start(store.clone(), TICK, move |x| r.lock().unwrap().push(x)).unwrap();
        w.send(
            vec![
                ("a".into(), b"1".to_vec()),
                ("blocked".into(), b"1".to_vec()),
            ],
            false,
        );
        w.send(vec![("a".into(), b"2".to_vec())], false);
        w.finish();
        assert_eq!(std::fs::read(dir.join("tasks/a/state.json")).unwrap(), b"2");
        let reports = reports.lock().unwrap();
        assert!(reports.iter().any(|r| r.failed == ["blocked"]));
        assert!(
            std::fs::read_dir(dir.join("tasks/a")).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("tmp"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_task_changing_all_the_time_is_written_once_a_tick() {
        let dir = scratch("tick");
        let store = TaskStore::new(&dir);
        let batches = Arc::new(Mutex::new(0usize));
        let b = batches.clone();
        let mut w = Writer::start(store, TICK, move |_| *b.lock().unwrap() += 1).unwrap();
        // 60 changes over 3 ticks: without the tick each found the writer
        // idle and made a batch of its own.
        let began = Instant::now();
        for i in 0..60u32 {
            w.send(vec![("a".into(), i.to_string().into_bytes())], false);
            std::thread::sleep(TICK * 3 / 60);
        }
        let ticks = began.elapsed().as_secs_f64() / TICK.as_secs_f64();
        w.finish();
        let n = *batches.lock().unwrap();
        // One batch per tick begun, the first at once, one more at the end.
        assert!(
            n as f64 <= ticks.ceil() + 2.0,
            "{n} batches in {ticks:.1} ticks"
        );
        assert_eq!(
            std::fs::read(dir.join("tasks/a/state.json")).unwrap(),
            b"59"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_that_never_stop_coming_are_still_written_every_tick() {
        let dir = scratch("flood");
        let store = TaskStore::new(&dir);
        let batches = Arc::new(Mutex::new(0usize));
        let b = batches.clone();
        let mut w = Writer::start(store, TICK, move |_| *b.lock().unwrap() += 1).unwrap();
        // A record every 2 µs, quicker than the channel's spin before it
        // sleeps, as twenty agents' records are on a loaded machine where
        // each of its yields lasts a time slice: the writer never finds the
        // channel empty.
        let began = Instant::now();
        let mut i = 0u64;
        while began.elapsed() < TICK * 12 {
            w.send(vec![("a".into(), i.to_string().into_bytes())], false);
            i += 1;
            let at = Instant::now();
            while at.elapsed() < Duration::from_micros(2) {
                std::hint::spin_loop();
            }
        }
        let during = *batches.lock().unwrap();
        w.finish();
        // One a tick would be 12; waiting for the channel to be empty wrote
        // the first only, until the flood stopped.
        assert!(during >= 7, "{during} batches in 12 ticks of records");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_urgent_record_does_not_wait_for_the_tick() {
        let dir = scratch("urgent");
        let store = TaskStore::new(&dir);
        let (tx, rx) = crossbeam_channel::unbounded();
        // A tick far longer than any write: waiting for it would show.
        let tick = Duration::from_secs(60);
        let mut w = Writer::start(store, tick, move |x| {
            let _ = tx.send(x);
        })
        .unwrap();
        w.send(vec![("a".into(), b"1".to_vec())], false);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let began = Instant::now();
        w.send(vec![("b".into(), b"1".to_vec())], false);
        w.send(vec![("a".into(), b"2".to_vec())], true);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the urgent record waited for the tick");
        assert!(began.elapsed() < tick / 2);
        // The record queued before it went along.
        assert_eq!(std::fs::read(dir.join("tasks/b/state.json")).unwrap(), b"1");
        assert_eq!(std::fs::read(dir.join("tasks/a/state.json")).unwrap(), b"2");
        w.finish();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
