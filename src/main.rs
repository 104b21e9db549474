//! Entry point: parse the command, dispatch, exit with its code.

use ralph_qchat::{cli, cmd};

fn main() {
    ralph_qchat::sys::malloc::restore_operator_environment();
    // A panic in any thread (a bug) ends the process at once, with a status
    // the service manager restarts on: a half-dead daemon whose scheduler
    // died would hang instead, ignoring SIGTERM. Tasks resume at the next
    // start (an interrupted iteration runs again).
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current().name().unwrap_or("main").to_string();
        eprintln!(
            "ralph-qchat: internal error in thread {thread}; exiting with status {} so that it is restarted (tasks resume where they were)",
            ralph_qchat::exit::SOFTWARE
        );
        std::process::exit(ralph_qchat::exit::SOFTWARE);
    }));
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let code = match cli::parse(args).and_then(cmd::dispatch) {
        Ok(code) => code,
        Err(f) => {
            // Logging may not be up yet (or may go to a file): always tell stderr.
            eprintln!("ralph-qchat: {}", f.message);
            log::logger().flush();
            f.code
        }
    };
    log::logger().flush();
    std::process::exit(code);
}
