//! The scheduler's writer: task records leave the scheduler as bytes and are
//! made durable here in batches — all temporary files written and synced,
//! then renamed, then each directory synced once — so a durable write costs
//! per batch, not per event, and never holds up dispatching.

use super::TaskStore;
use crossbeam_channel::{Receiver, Sender};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::thread::JoinHandle;

/// What the writer reports after each batch: the tasks it could not write.
#[derive(Debug, Default)]
pub struct Written {
    pub failed: Vec<String>,
    pub error: Option<String>,
}

/// Task ids and their encoded records.
pub type Batch = Vec<(String, Vec<u8>)>;

pub struct Writer {
    tx: Option<Sender<Batch>>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    /// `report` receives one `Written` per batch.
    pub fn start(
        store: TaskStore,
        report: impl Fn(Written) + Send + 'static,
    ) -> std::io::Result<Writer> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || run(store, rx, report))?;
        Ok(Writer {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    pub fn send(&self, batch: Batch) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(batch);
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

fn run(store: TaskStore, rx: Receiver<Batch>, report: impl Fn(Written)) {
    while let Ok(first) = rx.recv() {
        // Everything queued meanwhile joins this batch; the newest record wins.
        let mut batch: BTreeMap<String, Vec<u8>> = first.into_iter().collect();
        while let Ok(more) = rx.try_recv() {
            batch.extend(more);
        }
        report(write_batch(&store, batch));
    }
}

fn write_batch(store: &TaskStore, batch: BTreeMap<String, Vec<u8>>) -> Written {
    let mut out = Written::default();
    let fail = |id: &str, what: String, out: &mut Written| {
        out.failed.push(id.to_string());
        out.error.get_or_insert(what);
    };
    let tmp_name = format!(".state.json.tmp{}", std::process::id());
    let mut staged: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    for (id, bytes) in &batch {
        let dir = store.task_dir(id);
        let iterations = store.transcript_dir(id);
        let tmp = dir.join(&tmp_name);
        let written = (|| {
            if !iterations.is_dir() {
                std::fs::create_dir_all(&iterations)?;
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
        match std::fs::rename(&tmp, &dest) {
            Ok(()) => {
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
        if let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
            fail(&id, format!("cannot sync {}: {e}", dir.display()), &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn batches_land_and_failures_are_reported() {
        let dir = std::env::temp_dir().join(format!("ralph-qchat-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tasks")).unwrap();
        // A file where a task directory should be: that task cannot be written.
        std::fs::write(dir.join("tasks").join("blocked"), "x").unwrap();
        let store = TaskStore::new(&dir);
        let reports = Arc::new(Mutex::new(Vec::new()));
        let r = reports.clone();
        let mut w = Writer::start(store.clone(), move |x| r.lock().unwrap().push(x)).unwrap();
        w.send(vec![
            ("a".into(), b"1".to_vec()),
            ("blocked".into(), b"1".to_vec()),
        ]);
        w.send(vec![("a".into(), b"2".to_vec())]);
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
}
