//! Exit codes (sysexits where one fits) and the error type that carries one.

use std::fmt;

pub const OK: i32 = 0;
pub const TASK_FAILED: i32 = 1;
pub const LIMIT_REACHED: i32 = 2;
pub const USAGE: i32 = 64;
pub const PROMPT_REFUSED: i32 = 65;
/// The prompt file, the task or the state directory asked for is not there.
pub const NO_INPUT: i32 = 66;
pub const UNAVAILABLE: i32 = 69;
/// A bug: a panic in any thread ends the process with this status.
pub const SOFTWARE: i32 = 70;
pub const CANT_CREATE: i32 = 73;
pub const TEMPFAIL: i32 = 75;
pub const CONFIG: i32 = 78;

/// A run stopped by signal `sig` exits with 128 + sig (130 SIGINT, 143 SIGTERM).
pub fn interrupted(sig: i32) -> i32 {
    128 + sig
}

/// A failure that ends the program: what went wrong and the code to exit with.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<crate::config::ConfigError> for Failure {
    fn from(e: crate::config::ConfigError) -> Failure {
        Failure::new(CONFIG, e.to_string())
    }
}
