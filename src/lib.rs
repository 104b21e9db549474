//! ralph-qchat: runs an AI coding agent in a loop on a task until it is done.

pub mod agent;
pub mod cli;
pub mod clients;
pub mod config;
pub mod daemon;
pub mod exit;
pub mod health;
pub mod http;
pub mod logging;
pub mod malloc;
pub mod metrics;
pub mod paths;
pub mod run;
pub mod service;
pub mod status;
pub mod store;
pub mod task;
pub mod timefmt;
