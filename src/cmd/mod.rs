//! The commands, one file each: thin shells that read arguments and
//! configuration, call the library, and turn the outcome into an exit code.

mod backup;
mod cancel;
mod check_config;
mod clean;
mod daemon;
mod health;
mod logs;
mod run;
mod setup;
mod status;
mod submit;

use crate::cli::Command;
use crate::exit::{self, Failure};

pub fn dispatch(cmd: Command) -> Result<i32, Failure> {
    match cmd {
        Command::Help(text) => {
            print!("{text}");
            Ok(exit::OK)
        }
        Command::Version => {
            println!("ralph-qchat {}", env!("CARGO_PKG_VERSION"));
            Ok(exit::OK)
        }
        Command::Run(a) => {
            crate::sys::malloc::reexec_without_thread_caches();
            crate::sys::malloc::one_arena();
            crate::sys::reaper::block_sigchld();
            run::run(a)
        }
        Command::Daemon(a, standby) => {
            crate::sys::malloc::reexec_without_thread_caches();
            crate::sys::malloc::one_arena();
            crate::sys::reaper::block_sigchld();
            daemon::daemon(a, standby)
        }
        Command::Submit(a) => submit::submit(a),
        Command::Cancel(a) => cancel::cancel(a),
        Command::Clean(a) => clean::clean(a),
        Command::Logs(a) => logs::logs(a),
        Command::Backup(a) => backup::backup(a),
        Command::Restore(a) => backup::restore(a),
        Command::Health(a) => health::probe(a),
        Command::Status(a) => status::status(a),
        Command::CheckConfig(a) => check_config::check_config(a),
    }
}
