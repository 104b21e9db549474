//! ralph-qchat: runs an AI coding agent in a loop on a task until it is done.
//!
//! Read top-down: `cli` (arguments) → `cmd` (one file per command) → `engine`
//! (the scheduler, its workers and the messages between them) → `agent` (one
//! child, start to end) and `task` (the loop's pure rules) → `store` (what is
//! on disk). `http` reads what the engine publishes; `sys` is the operating
//! system; `config`, `metrics`, `logging` and `exit` are used by all.

pub mod agent;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod engine;
pub mod exit;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod store;
pub mod sys;
pub mod task;
