//! Logging: stderr (with journald priority prefixes), an optional size-rotated
//! file, optional syslog; text or JSON lines carrying the task and iteration.

use crate::config::{LogFormat, Logging};
use log::kv::{Key, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

type Syslog = syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>;

struct Sinks {
    format: LogFormat,
    journald: bool,
    file: Option<RotatingFile>,
    syslog: Option<Syslog>,
}

struct Logger {
    sinks: Mutex<Option<Sinks>>,
}

static LOGGER: Logger = Logger {
    sinks: Mutex::new(None),
};

pub fn level_filter(level: &str) -> LevelFilter {
    match level.to_ascii_lowercase().as_str() {
        "error" => LevelFilter::Error,
        "warn" | "warning" => LevelFilter::Warn,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => LevelFilter::Info,
    }
}

/// Installs (or, on reload, reconfigures) the process-wide logger. Failing to
/// open the log file or the syslog socket is an error the caller reports.
pub fn init(cfg: &Logging) -> Result<(), String> {
    let file = if cfg.file.is_empty() {
        None
    } else {
        Some(RotatingFile::open(
            PathBuf::from(&cfg.file),
            cfg.max_file_size,
            cfg.backups,
        )?)
    };
    let syslog = if cfg.syslog {
        let formatter = syslog::Formatter3164 {
            facility: cfg.facility().unwrap_or(syslog::Facility::LOG_DAEMON),
            hostname: None,
            process: "ralph-qchat".into(),
            pid: std::process::id(),
        };
        Some(
            syslog::unix_custom(formatter, &cfg.syslog_socket)
                .map_err(|e| format!("cannot connect to syslog at {}: {e}", cfg.syslog_socket))?,
        )
    } else {
        None
    };
    let sinks = Sinks {
        format: cfg.format,
        journald: stderr_is_journal(),
        file,
        syslog,
    };
    if let Ok(mut guard) = LOGGER.sinks.lock() {
        *guard = Some(sinks);
    }
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level_filter(&cfg.level));
    Ok(())
}

/// Reopens the log file after logrotate moved it away.
pub fn reopen() {
    if let Ok(mut guard) = LOGGER.sinks.lock()
        && let Some(Some(f)) = guard.as_mut().map(|s| s.file.as_mut())
        && let Err(e) = f.reopen()
    {
        eprintln!(
            "ralph-qchat: cannot reopen log file {}: {e}",
            f.path.display()
        );
    }
}

/// True when systemd connected stderr to the journal (JOURNAL_STREAM names
/// the same device and inode as our stderr).
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the zeroed struct we own.
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

#[derive(Default)]
struct Context {
    task: Option<String>,
    iteration: Option<String>,
}

impl<'kvs> VisitSource<'kvs> for Context {
    fn visit_pair(
        &mut self,
        key: Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        match key.as_str() {
            "task" => self.task = Some(value.to_string()),
            "iteration" => self.iteration = Some(value.to_string()),
            _ => {}
        }
        Ok(())
    }
}

fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

fn format_line(format: LogFormat, record: &Record, ctx: &Context) -> String {
    let ts = crate::sys::time::now_rfc3339();
    let msg = record.args().to_string();
    match format {
        LogFormat::Json => {
            let mut obj = serde_json::json!({
                "ts": ts,
                "level": record.level().as_str(),
                "msg": msg,
            });
            if let Some(t) = &ctx.task {
                obj["task"] = t.clone().into();
            }
            if let Some(i) = &ctx.iteration {
                obj["iteration"] = i.parse::<u64>().map(Into::into).unwrap_or(i.clone().into());
            }
            obj.to_string()
        }
        LogFormat::Text => {
            let mut s = format!("{ts} {:<5} ", record.level());
            if let Some(t) = &ctx.task {
                s.push_str(&format!("[{t}"));
                if let Some(i) = &ctx.iteration {
                    s.push_str(&format!(" #{i}"));
                }
                s.push_str("] ");
            }
            s.push_str(&msg);
            s
        }
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut ctx = Context::default();
        let _ = record.key_values().visit(&mut ctx);
        let Ok(mut guard) = self.sinks.lock() else {
            return;
        };
        let Some(sinks) = guard.as_mut() else {
            return;
        };
        let line = format_line(sinks.format, record, &ctx);
        // One write per line: stderr is unbuffered, and a line written in
        // pieces can be split by anything else writing there.
        let out = if sinks.journald {
            format!("<{}>{line}\n", priority(record.level()))
        } else {
            format!("{line}\n")
        };
        let _ = std::io::stderr().lock().write_all(out.as_bytes());
        if let Some(f) = sinks.file.as_mut() {
            f.write_line(&line);
        }
        if let Some(s) = sinks.syslog.as_mut() {
            let plain = match &ctx.task {
                Some(t) => format!("[{t}] {}", record.args()),
                None => record.args().to_string(),
            };
            let _ = match record.level() {
                Level::Error => s.err(plain),
                Level::Warn => s.warning(plain),
                Level::Info => s.info(plain),
                _ => s.debug(plain),
            };
        }
    }

    fn flush(&self) {
        if let Ok(mut guard) = self.sinks.lock()
            && let Some(Some(f)) = guard.as_mut().map(|s| s.file.as_mut())
        {
            let _ = f.file.flush();
        }
    }
}

/// A log file rotated by size: `file`, `file.1` … `file.<backups>`.
struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max: u64,
    backups: u32,
}

impl RotatingFile {
    fn open(path: PathBuf, max: u64, backups: u32) -> Result<RotatingFile, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create log directory {}: {e}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(RotatingFile {
            path,
            file,
            size,
            max,
            backups,
        })
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = self.file.metadata()?.len();
        Ok(())
    }

    fn write_line(&mut self, line: &str) {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max {
            self.rotate();
        }
        if writeln!(self.file, "{line}").is_ok() {
            self.size += len;
        }
    }

    fn rotate(&mut self) {
        let name = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.backups == 0 {
            let _ = self.file.set_len(0);
            self.size = 0;
            return;
        }
        let _ = std::fs::remove_file(name(self.backups));
        for i in (1..self.backups).rev() {
            let _ = std::fs::rename(name(i), name(i + 1));
        }
        let _ = std::fs::rename(&self.path, name(1));
        if let Err(e) = self.reopen() {
            eprintln!(
                "ralph-qchat: cannot reopen log file {}: {e}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_configured_backups() {
        let dir = std::env::temp_dir().join(format!("ralph-qchat-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.log");
        let mut f = RotatingFile::open(path.clone(), 100, 2).unwrap();
        for i in 0..30 {
            f.write_line(&format!("line number {i:04}"));
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        assert!(dir.join("x.log.1").exists());
        assert!(dir.join("x.log.2").exists());
        assert!(!dir.join("x.log.3").exists());
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(last.contains("line number 0029"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
