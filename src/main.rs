//! Entry point: parse the command, dispatch, exit with its code.

use ralph_qchat::{cli, cmd};

fn main() {
    ralph_qchat::sys::malloc::restore_operator_environment();
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
