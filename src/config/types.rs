//! Configuration types and their built-in defaults.
//!
//! Every struct denies unknown keys so a typo in the file is an error that names
//! the key, never a silently ignored setting.

use crate::agent::classify::RuleSpec;
pub use crate::agent::contain::Mode as Containment;
use crate::agent::profile::{PROFILES, Profile};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The agent CLI profile (see `agent::profile`): what each runs by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentName {
    #[serde(alias = "q")]
    Qchat,
    Kiro,
    Claude,
    Codex,
    Gemini,
    Custom,
}

impl AgentName {
    pub const ALL: &[AgentName] = &[
        AgentName::Qchat,
        AgentName::Kiro,
        AgentName::Claude,
        AgentName::Codex,
        AgentName::Gemini,
        AgentName::Custom,
    ];

    /// Accepts the names an operator types, including the guide's `--agent q`.
    pub fn parse(s: &str) -> Option<AgentName> {
        let p = crate::agent::profile::profile(s)?;
        AgentName::ALL
            .iter()
            .copied()
            .find(|n| n.as_str() == p.name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AgentName::Qchat => "qchat",
            AgentName::Kiro => "kiro",
            AgentName::Claude => "claude",
            AgentName::Codex => "codex",
            AgentName::Gemini => "gemini",
            AgentName::Custom => "custom",
        }
    }

    pub fn profile(self) -> &'static Profile {
        // Every name has a profile; a test holds it.
        crate::agent::profile::profile(self.as_str()).unwrap_or(&PROFILES[0])
    }

    pub fn default_command(self) -> &'static str {
        self.profile().command
    }

    pub fn default_args(self) -> Vec<String> {
        self.profile().args.iter().map(|s| s.to_string()).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Adapter {
    pub name: AgentName,
    /// Empty means the profile's command.
    pub command: String,
    /// None means the profile's arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// 0 means the profile's timeout.
    pub timeout: f64,
    pub idle_timeout: f64,
    pub max_retries: u32,
    pub retry_delay: f64,
    pub max_retry_delay: f64,
    pub kill_grace: f64,
    pub env: BTreeMap<String, String>,
    /// Seconds a quota pause lasts when the message names no reset time.
    pub quota_pause: f64,
    /// None means the profile's preflight; `[]` none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preflight: Option<Vec<String>>,
    pub preflight_timeout: f64,
    /// Seconds between preflights while the profile is paused for auth.
    pub preflight_interval: f64,
    /// The operator's outcome rules, tried before the profile's.
    pub rules: Vec<RuleSpec>,
}

impl Default for Adapter {
    fn default() -> Self {
        Adapter {
            name: AgentName::Qchat,
            command: String::new(),
            args: None,
            timeout: 0.0,
            idle_timeout: 0.0,
            max_retries: 3,
            retry_delay: 1.0,
            max_retry_delay: 60.0,
            kill_grace: 3.0,
            env: BTreeMap::new(),
            quota_pause: 3600.0,
            preflight: None,
            preflight_timeout: 30.0,
            preflight_interval: 300.0,
            rules: Vec::new(),
        }
    }
}

impl Adapter {
    pub fn profile(&self) -> &'static Profile {
        self.name.profile()
    }

    pub fn effective_command(&self) -> String {
        if self.command.is_empty() {
            self.name.default_command().to_string()
        } else {
            self.command.clone()
        }
    }

    /// A relative command path means the operator's current directory, not
    /// the agent's working directory: make it absolute once, at load time.
    pub fn anchor_command(&mut self, cwd: &std::path::Path) {
        if self.command.contains('/') && !self.command.starts_with('/') {
            self.command = cwd.join(&self.command).display().to_string();
        }
    }

    pub fn effective_args(&self) -> Vec<String> {
        self.args
            .clone()
            .unwrap_or_else(|| self.name.default_args())
    }

    pub fn effective_timeout(&self) -> f64 {
        if self.timeout > 0.0 {
            self.timeout
        } else {
            self.profile().timeout
        }
    }

    /// The preflight argv, if any: the operator's, else the profile's when
    /// the command is the profile's own program (a wrapper script need not
    /// understand `whoami`).
    pub fn effective_preflight(&self) -> Option<Vec<String>> {
        if let Some(p) = &self.preflight {
            return (!p.is_empty()).then(|| p.clone());
        }
        let prof = self.profile();
        if prof.preflight.is_empty() {
            return None;
        }
        let cmd = self.effective_command();
        let base = std::path::Path::new(&cmd)
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("");
        if base != prof.command {
            return None;
        }
        let mut v = vec![cmd];
        v.extend(prof.preflight.iter().map(|s| s.to_string()));
        Some(v)
    }

    /// The outcome rules as written, each with where it comes from: the
    /// operator's first.
    pub fn rule_specs(&self) -> Vec<(RuleSpec, String)> {
        let mut v: Vec<(RuleSpec, String)> = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.clone(), format!("adapter.rules[{}]", i + 1)))
            .collect();
        let prof = self.profile();
        v.extend(
            prof.rule_specs()
                .into_iter()
                .map(|r| (r, format!("profile {}", prof.name))),
        );
        v
    }
}

pub const DEFAULT_PROMPT_TEMPLATE: &str = "\
You are one iteration ({iteration}) of an unattended loop that works on the task \
described in the file {prompt_file}. Its current content follows.\n\n\
{prompt}\n\n\
Make real progress on the task, then update {prompt_file} to record what is done \
and what is left. When the whole task is finished, add a line containing only \
{marker} to {prompt_file}. Nobody will answer questions: decide for yourself.\
{verify_output}";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Orchestrator {
    pub prompt_file: String,
    pub max_iterations: u64,
    pub max_runtime: f64,
    pub max_consecutive_failures: u32,
    pub checkpoint_interval: u64,
    pub iteration_delay: f64,
    pub git_checkpoint: bool,
    pub archive_prompts: bool,
    pub completion_marker: String,
    pub output_completion_marker: String,
    pub prompt_template: String,
    pub keep_transcripts: u32,
    /// Archived prompts kept per task (the newest; 0 = no count limit),
    /// and seconds one is kept (0 = no age limit).
    pub keep_archived_prompts: u32,
    pub archived_prompt_max_age: f64,
    pub shutdown_grace: f64,
    /// A task ends as limit_reached once its agent reported this many
    /// credits (Kiro) or this many US dollars (Claude); 0 = no cap.
    pub max_credits: f64,
    pub max_cost_usd: f64,
    /// Successful iterations in a row that change neither the prompt file
    /// nor the working tree before a task ends as stalled; 0 = off.
    pub max_stalled_iterations: u32,
    /// argv that must pass before a completion marker is accepted; empty = none.
    pub verify_command: Vec<String>,
    pub verify_timeout: f64,
    /// Seconds all git commands of one checkpoint may take together.
    pub checkpoint_timeout: f64,
}

impl Default for Orchestrator {
    fn default() -> Self {
        Orchestrator {
            prompt_file: "PROMPT.md".into(),
            max_iterations: 100,
            max_runtime: 14400.0,
            max_consecutive_failures: 5,
            checkpoint_interval: 5,
            iteration_delay: 2.0,
            git_checkpoint: true,
            archive_prompts: true,
            completion_marker: "TASK_COMPLETE".into(),
            output_completion_marker: String::new(),
            prompt_template: DEFAULT_PROMPT_TEMPLATE.into(),
            keep_transcripts: 20,
            keep_archived_prompts: 100,
            archived_prompt_max_age: 0.0,
            shutdown_grace: 30.0,
            max_credits: 0.0,
            max_cost_usd: 0.0,
            max_stalled_iterations: 5,
            verify_command: Vec::new(),
            verify_timeout: 600.0,
            checkpoint_timeout: 120.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Performance {
    pub buffer_size: u64,
    pub poll_interval: f64,
    pub max_concurrent: u32,
    pub max_requests_per_minute: u32,
}

impl Default for Performance {
    fn default() -> Self {
        Performance {
            buffer_size: 4096,
            poll_interval: 0.1,
            max_concurrent: 5,
            max_requests_per_minute: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// How an attempt's processes are kept together and ended with it.
    pub containment: Containment,
    pub max_memory_mb: u64,
    /// pids.max of an attempt's cgroup (0 = none).
    pub max_processes: u64,
    pub max_output_size: u64,
    pub max_prompt_size: u64,
    pub blocked_patterns: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            containment: Containment::Auto,
            max_memory_mb: 0,
            max_processes: 0,
            max_output_size: 10 * 1024 * 1024,
            max_prompt_size: 10 * 1024 * 1024,
            blocked_patterns: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Logging {
    pub level: String,
    pub verbose: bool,
    pub format: LogFormat,
    pub file: String,
    pub max_file_size: u64,
    pub backups: u32,
    pub syslog: bool,
    pub syslog_facility: String,
    pub syslog_socket: String,
}

impl Logging {
    /// The syslog facility named by `syslog_facility`; None when unknown.
    pub fn facility(&self) -> Option<syslog::Facility> {
        self.syslog_facility.parse().ok()
    }
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            level: "info".into(),
            verbose: false,
            format: LogFormat::Text,
            file: String::new(),
            max_file_size: 10 * 1024 * 1024,
            backups: 5,
            syslog: false,
            syslog_facility: "daemon".into(),
            syslog_socket: "/dev/log".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Monitoring {
    pub metrics_interval: f64,
    pub health_check_enabled: bool,
    pub health_check_port: u16,
    pub health_check_bind: String,
    pub health_check_allow: Vec<String>,
    pub health_check_interval: f64,
}

impl Default for Monitoring {
    fn default() -> Self {
        Monitoring {
            metrics_interval: 60.0,
            health_check_enabled: true,
            health_check_port: 8080,
            health_check_bind: "127.0.0.1".into(),
            health_check_allow: Vec::new(),
            health_check_interval: 30.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreaker {
    pub failure_threshold: u32,
    pub cooldown: f64,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            failure_threshold: 5,
            cooldown: 60.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cache {
    pub enabled: bool,
    pub max_size: u32,
    pub ttl: f64,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            enabled: false,
            max_size: 1000,
            ttl: 3600.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Paths {
    /// Empty means the mode's default (`<workdir>/.ralph-qchat` for run).
    pub state_dir: String,
    /// Entries of spool/rejected kept (the newest; 0 = no count limit).
    pub keep_rejected: u32,
    /// Seconds a rejected entry is kept (0 = no age limit).
    pub rejected_max_age: f64,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            state_dir: String::new(),
            keep_rejected: 100,
            rejected_max_age: 30.0 * 86400.0,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub adapter: Adapter,
    pub orchestrator: Orchestrator,
    pub performance: Performance,
    pub limits: Limits,
    pub logging: Logging,
    pub monitoring: Monitoring,
    pub circuit_breaker: CircuitBreaker,
    pub cache: Cache,
    pub hooks: Hooks,
    pub paths: Paths,
}

/// Commands run when something happens to a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hooks {
    /// argv run once when a task ends; empty = none.
    pub on_task_end: Vec<String>,
    pub timeout: f64,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            on_task_end: Vec::new(),
            timeout: 60.0,
        }
    }
}
