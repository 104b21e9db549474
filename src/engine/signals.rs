//! Signals become messages: the main thread waits for them and tells the
//! scheduler, which runs on its own thread. Nothing happens inside a handler.

use super::msg::{Control, Event};
use super::notify::Notifier;
use super::scheduler::{Finished, Scheduler};
use crate::config::Config;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;
use std::time::Duration;

/// Reads and validates the configuration again (SIGHUP); None keeps the old.
pub type Reload = Box<dyn FnMut() -> Option<Config>>;

/// Catches the signals we handle; made early so that none arriving during
/// start-up is lost or kills the process.
pub fn catch() -> std::io::Result<Signals> {
    Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])
}

/// Runs the scheduler to its end while forwarding signals to it. SIGTERM and
/// SIGINT give running requests `grace` (None: the configured shutdown_grace); SIGHUP reopens the log file and,
/// with `reload`, applies a new configuration.
pub fn serve(
    scheduler: Scheduler,
    grace: Option<Duration>,
    mut reload: Option<Reload>,
    mut signals: Signals,
) -> std::io::Result<Finished> {
    let handle = signals.handle();
    let events = scheduler.sender();
    let engine = std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            // Fault injection for the test that a panic ends the process
            // (debug builds only).
            #[cfg(debug_assertions)]
            if std::env::var_os("RALPH_QCHAT_TEST_PANIC").is_some_and(|v| v == "scheduler") {
                panic!("injected by RALPH_QCHAT_TEST_PANIC");
            }
            let finished = scheduler.run();
            handle.close();
            finished
        })?;
    let notifier = Notifier::from_env();
    for sig in signals.forever() {
        let msg = match sig {
            SIGTERM | SIGINT => Control::Shutdown { grace, signal: sig },
            SIGUSR1 => Control::Dump,
            SIGHUP => {
                crate::logging::reopen();
                let Some(reload) = reload.as_mut() else {
                    log::info!("SIGHUP: log file reopened");
                    continue;
                };
                notifier.reloading();
                match reload() {
                    Some(cfg) => Control::Reload(Box::new(cfg)),
                    None => {
                        notifier.ready("reload refused; running on the previous configuration");
                        continue;
                    }
                }
            }
            _ => continue,
        };
        if events.send(Event::Control(msg)).is_err() {
            break;
        }
    }
    engine
        .join()
        .map_err(|_| std::io::Error::other("the scheduler thread panicked"))
}
