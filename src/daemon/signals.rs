//! Signals become messages: a thread waits for them and tells the scheduler.
//! Nothing happens inside a signal handler.

use super::scheduler::{Control, Event};
use crossbeam_channel::Sender;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::{Handle, Signals};
use std::time::Duration;

/// Starts forwarding; `grace` is how long running requests may finish after
/// SIGTERM/SIGINT. Drop-in `Handle::close` stops the thread.
pub fn forward(events: Sender<Event>, grace: Duration) -> std::io::Result<Handle> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let msg = match sig {
                    SIGTERM | SIGINT => Control::Shutdown { grace, signal: sig },
                    SIGUSR1 => Control::Dump,
                    SIGHUP => {
                        crate::logging::reopen();
                        log::info!("SIGHUP: log file reopened");
                        continue;
                    }
                    _ => continue,
                };
                if events.send(Event::Control(msg)).is_err() {
                    break;
                }
            }
        })?;
    Ok(handle)
}
