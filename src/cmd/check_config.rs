//! `ralph-qchat check-config`: validates the layered configuration and prints
//! it as TOML, each value that is not a default followed by where it was set.

use crate::cli::RunArgs;
use crate::config::{self, Layers};
use crate::exit::{self, Failure};

pub fn check_config(a: RunArgs) -> Result<i32, Failure> {
    // Without --config: the file the daemon would read, when there is one.
    let (file, file_required) = config::paths::config_file(a.config.as_deref());
    let loaded = config::load(&Layers {
        file,
        file_required,
        env: config::process_env(),
        flags: a.overrides.clone(),
    })?;
    print!("{}", config::render(&loaded));
    for w in &loaded.warnings {
        eprintln!("ralph-qchat: warning: {w}");
    }
    Ok(exit::OK)
}
