//! Entry point: parse the command, dispatch, exit with its code.

use ralph_qchat::cli::{self, Command};
use ralph_qchat::config::{self, Layers};
use ralph_qchat::exit::{self, Failure};

fn main() {
    ralph_qchat::malloc::restore_operator_environment();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let code = match cli::parse(args).and_then(dispatch) {
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

fn dispatch(cmd: Command) -> Result<i32, Failure> {
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
            ralph_qchat::malloc::reexec_without_thread_caches();
            ralph_qchat::run::run(a)
        }
        Command::Daemon(a, standby) => {
            ralph_qchat::malloc::reexec_without_thread_caches();
            ralph_qchat::service::daemon(a, standby)
        }
        Command::Submit(a) => ralph_qchat::clients::submit(a),
        Command::Cancel(a) => ralph_qchat::clients::cancel(a),
        Command::Health(a) => ralph_qchat::health::probe(a),
        Command::Status(a) => ralph_qchat::status::status(a),
        Command::CheckConfig(a) => {
            // Without --config: the file the daemon would read, when there is one.
            let (file, file_required) = ralph_qchat::paths::config_file(a.config.as_deref());
            let loaded = config::load(&Layers {
                file,
                file_required,
                env: ralph_qchat::run::env_pairs(),
                flags: a.overrides.clone(),
            })?;
            print!("{}", config::render(&loaded));
            for w in &loaded.warnings {
                eprintln!("ralph-qchat: warning: {w}");
            }
            Ok(exit::OK)
        }
    }
}
