//! Task records under `<state_dir>/tasks/<id>/`: state.json, the iteration
//! transcripts and the prompt archive.

use super::atomic::write_atomic;
use crate::task::{TaskState, valid_id};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct TaskStore {
    root: PathBuf,
}

impl TaskStore {
    pub fn new(state_dir: &Path) -> TaskStore {
        TaskStore {
            root: state_dir.to_path_buf(),
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.root
    }

    pub fn tasks_dir(&self) -> PathBuf {
        self.root.join("tasks")
    }

    pub fn task_dir(&self, id: &str) -> PathBuf {
        self.tasks_dir().join(id)
    }

    pub fn transcript_dir(&self, id: &str) -> PathBuf {
        self.task_dir(id).join("iterations")
    }

    pub fn transcript_path(&self, id: &str, iteration: u64) -> PathBuf {
        self.transcript_dir(id).join(format!("{iteration:06}.log"))
    }

    pub fn archive_dir(&self, id: &str) -> PathBuf {
        self.task_dir(id).join("archive")
    }

    /// Writes the record durably; creates the task's directories on first use.
    pub fn save(&self, state: &TaskState) -> io::Result<()> {
        let dir = self.task_dir(&state.id);
        let transcripts = self.transcript_dir(&state.id);
        if !transcripts.is_dir() {
            super::atomic::create_dirs(&transcripts)?;
        }
        let json = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
        write_atomic(&dir.join("state.json"), &json)
    }

    pub fn load(&self, id: &str) -> io::Result<Option<TaskState>> {
        read_record(&self.task_dir(id).join("state.json"))
    }

    /// Every readable record, sorted by id, and a message for each unreadable one.
    pub fn load_all(&self) -> (Vec<TaskState>, Vec<String>) {
        let mut tasks = Vec::new();
        let problems = self.for_each(|t| tasks.push(t));
        tasks.sort_by(|a, b| a.id.cmp(&b.id));
        (tasks, problems)
    }

    /// Each readable record in turn, one in memory at a time (a state
    /// directory may hold a hundred thousand); a message for each unreadable.
    pub fn for_each(&self, mut f: impl FnMut(TaskState)) -> Vec<String> {
        let mut problems = Vec::new();
        let dir = match std::fs::read_dir(self.tasks_dir()) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return problems,
            Err(e) => {
                problems.push(format!("cannot read {}: {e}", self.tasks_dir().display()));
                return problems;
            }
        };
        for entry in dir.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !valid_id(&id) {
                continue;
            }
            match self.load(&id) {
                Ok(Some(t)) => f(t),
                Ok(None) => {}
                Err(e) => problems.push(e.to_string()),
            }
        }
        problems
    }

    /// Removes what processes killed while writing left (`write_atomic`'s
    /// temporaries) in the state directory and the directories of `ids`:
    /// how many went. The callers name the tasks not yet finished, where
    /// records are written; a directory read per finished task would make
    /// every start cost what the history holds.
    pub fn sweep_abandoned(&self, ids: &[String]) -> usize {
        super::atomic::sweep_abandoned(&self.root)
            + ids
                .iter()
                .map(|id| super::atomic::sweep_abandoned(&self.task_dir(id)))
                .sum::<usize>()
    }

    /// Keeps the newest `keep` transcripts of a task.
    pub fn prune_transcripts(&self, id: &str, keep: usize) {
        let Ok(dir) = std::fs::read_dir(self.transcript_dir(id)) else {
            return;
        };
        let mut logs: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        if logs.len() <= keep {
            return;
        }
        logs.sort();
        for p in &logs[..logs.len() - keep] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The task record at `path` (None: there is none). What does not parse is
/// read again, twice: the writer reuses the file a record was in two
/// records later (`writer::SPARE`), so a reader that held it open that long
/// read it emptied or half rewritten; state.json itself is whole.
pub fn read_record(path: &Path) -> io::Result<Option<TaskState>> {
    let mut tries = 0;
    loop {
        tries += 1;
        match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(t) => return Ok(Some(t)),
                Err(_) if tries < 3 => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} is not a valid task record: {e}", path.display()),
                    ));
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot read {}: {e}", path.display()),
                ));
            }
        }
    }
}
