//! `ralph-qchat backup ARCHIVE` and `ralph-qchat restore ARCHIVE`: the state
//! directory as a compressed tar, taken while a daemon runs (store/backup.rs
//! coordinates with its writer), and unpacked into an empty directory that
//! nothing uses.

use crate::cli::{BackupArgs, RestoreArgs};
use crate::exit::{self, Failure};
use crate::store::{StateLock, TaskStore, backup};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub fn backup(a: BackupArgs) -> Result<i32, Failure> {
    let (_, state_dir) = super::setup::client_config(&a.config, &a.state_dir)?;
    if !state_dir.join("tasks").is_dir() && !state_dir.join("spool").is_dir() {
        return Err(Failure::new(
            exit::NO_INPUT,
            format!(
                "{} is not a ralph-qchat state directory (no tasks/ or spool/; name one with --state-dir)",
                state_dir.display()
            ),
        ));
    }
    let to_stdout = a.archive.as_os_str() == "-";
    if !to_stdout && a.archive.symlink_metadata().is_ok() {
        return Err(Failure::new(
            exit::CANT_CREATE,
            format!("{} exists: name a new file", a.archive.display()),
        ));
    }
    let sum = if to_stdout {
        backup::write(&state_dir, std::io::stdout().lock(), !a.no_transcripts).map_err(|e| {
            Failure::new(
                exit::CANT_CREATE,
                format!("backup of {}: {e}", state_dir.display()),
            )
        })?
    } else {
        // Under another name until whole: an archive with the name is complete.
        let mut partial = a.archive.clone().into_os_string();
        partial.push(".partial");
        let partial = std::path::PathBuf::from(partial);
        let written = (|| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&partial)?;
            let sum = backup::write(&state_dir, std::io::BufWriter::new(&f), !a.no_transcripts)?;
            f.sync_all()?;
            std::fs::rename(&partial, &a.archive)?;
            Ok::<_, std::io::Error>(sum)
        })();
        match written {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(Failure::new(
                    exit::CANT_CREATE,
                    format!("cannot write {}: {e}", a.archive.display()),
                ));
            }
        }
    };
    for c in &sum.changed {
        eprintln!(
            "ralph-qchat: note: {c} changed while it was read (a transcript being written): kept up to its size then"
        );
    }
    for s in &sum.skipped {
        eprintln!("ralph-qchat: warning: {s} is not a file, directory or link: left out");
    }
    eprintln!(
        "backed up {} task(s), {} file(s), {:.1} MiB of {}{} to {}",
        sum.tasks,
        sum.files,
        sum.bytes as f64 / 1048576.0,
        state_dir.display(),
        if a.no_transcripts {
            " (without transcripts)"
        } else {
            ""
        },
        if to_stdout {
            "standard output".to_string()
        } else {
            a.archive.display().to_string()
        }
    );
    Ok(exit::OK)
}

pub fn restore(a: RestoreArgs) -> Result<i32, Failure> {
    let (_, dir) = super::setup::client_config(&a.config, &a.state_dir)?;
    let file = std::fs::File::open(&a.archive).map_err(|e| {
        Failure::new(
            exit::NO_INPUT,
            format!("cannot read {}: {e}", a.archive.display()),
        )
    })?;
    if let Some(pid) = StateLock::holder(&dir) {
        let by = if pid > 0 {
            format!(" (pid {pid})")
        } else {
            String::new()
        };
        return Err(Failure::new(
            exit::TEMPFAIL,
            format!(
                "{} is in use by a ralph-qchat{by}: stop it first (systemctl stop ralph-qchat), or restore into another directory",
                dir.display()
            ),
        ));
    }
    let not_empty = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name() != "lost+found" && e.file_name() != "lock")
        })
        .unwrap_or(false);
    if not_empty {
        return Err(Failure::new(
            exit::CANT_CREATE,
            format!(
                "{} is not empty: restore into an empty directory (move the current one aside first; nothing was changed)",
                dir.display()
            ),
        ));
    }
    let created = !dir.exists();
    crate::store::atomic::create_dirs(&dir).map_err(|e| {
        Failure::new(
            exit::CANT_CREATE,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    // No daemon starts on it while it is filled.
    let _lock =
        StateLock::acquire(&dir).map_err(|e| Failure::new(exit::TEMPFAIL, e.to_string()))?;
    let sum = backup::restore(std::io::BufReader::new(file), &dir).map_err(|e| {
        if created {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let code = if e.kind() == std::io::ErrorKind::InvalidData {
            exit::PROMPT_REFUSED
        } else {
            exit::CANT_CREATE
        };
        Failure::new(
            code,
            format!(
                "cannot restore {} into {}: {e} (the directory is left as it was)",
                a.archive.display(),
                dir.display()
            ),
        )
    })?;
    give_to_owner(&dir);
    let (tasks, problems) = TaskStore::new(&dir).load_all();
    for p in &problems {
        eprintln!("ralph-qchat: warning: {p}");
    }
    let unfinished = tasks.iter().filter(|t| !t.status.is_finished()).count();
    if sum.relocated > 0 {
        eprintln!(
            "ralph-qchat: {} record(s) named paths in the backed-up state directory: they now name {}",
            sum.relocated,
            dir.display()
        );
    }
    eprintln!(
        "restored {} task(s) from {} into {} ({} file(s), {:.1} MiB); {unfinished} unfinished resume when a daemon starts on it",
        tasks.len(),
        a.archive.display(),
        dir.display(),
        sum.files,
        sum.bytes as f64 / 1048576.0,
    );
    if !problems.is_empty() {
        return Err(Failure::new(
            exit::PROMPT_REFUSED,
            format!(
                "{} record(s) in the backup cannot be read (above)",
                problems.len()
            ),
        ));
    }
    Ok(exit::OK)
}

/// Run as root into a directory another user owns (the service's, owned by
/// ralph-qchat): what was restored is that user's, or the daemon could not
/// write it.
fn give_to_owner(dir: &Path) {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let Ok(m) = std::fs::metadata(dir) else {
        return;
    };
    if m.uid() == 0 {
        return;
    }
    let (uid, gid) = (m.uid(), m.gid());
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let _ = std::os::unix::fs::lchown(&p, Some(uid), Some(gid));
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p);
            }
        }
    }
}
