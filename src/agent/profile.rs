//! The agent CLIs ralph-qchat knows, as data: what each runs, how it is
//! told the instruction (always the last argument), the environment it
//! needs headless, how its output reads, the lines that tell its failures
//! apart, and a cheap command that tells whether it can work at all. The
//! facts behind each entry, with their sources, are in agent-clis.md of the
//! design notes and in ralph-qchat.toml(5).

use super::classify::RuleSpec;

/// How a CLI's standard output is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    Text,
    /// Claude Code's `--output-format stream-json`: one JSON object per line,
    /// the last a `result` with `is_error`, `api_error_status`, `result`.
    ClaudeStreamJson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Kiro's `▸ Credits: 0.01 • Time: 1s` on stderr.
    Credits,
    /// Claude's result line: `total_cost_usd`, `usage`.
    CostAndTokens,
    /// Codex's `tokens used` line and the number after it.
    Tokens,
}

/// One line-rule of a profile: (regex, class, stop at once).
type BuiltinRule = (&'static str, &'static str, bool);

#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub name: &'static str,
    pub command: &'static str,
    pub args: &'static [&'static str],
    /// Set unless the operator's `[adapter] env` sets them.
    pub env: &'static [(&'static str, &'static str)],
    /// Only when running as root (Claude Code refuses its bypass flag as root
    /// outside a sandbox).
    pub root_env: &'static [(&'static str, &'static str)],
    pub output: OutputMode,
    pub rules: &'static [BuiltinRule],
    /// Arguments of the preflight, run with the profile's command.
    pub preflight: &'static [&'static str],
    /// The request timeout when `[adapter] timeout` is not set: room for the
    /// CLI's own work and its own (bounded) retries.
    pub timeout: f64,
    /// What an operator runs to log the service's account in.
    pub login_hint: &'static str,
    pub reports: &'static [Report],
    /// A line every real turn prints (Kiro's credits line): exit 0 without
    /// it is a run that did nothing (a silent exit, an empty pipe).
    pub proof: Option<&'static str>,
}

const Q_RULES: &[BuiltinRule] = &[
    (
        r"^You are not logged in, please log in with q login",
        "auth",
        false,
    ),
    (r"^Your login session has expired", "auth", false),
    (
        r"^Amazon Q is having trouble responding right now: .*dispatch failure \(other\): No token",
        "auth",
        false,
    ),
    (r"^Monthly request limit reached", "quota", false),
    (
        r"^You've used all your free requests for this month",
        "quota",
        false,
    ),
    (
        r"^Amazon Q is having trouble responding right now: .*(?i:reached for this month)",
        "quota",
        false,
    ),
    (r"^Amazon Q rate limit reached", "throttled", false),
    (
        r"^Request quota exceeded\. Please wait a moment and try again",
        "throttled",
        false,
    ),
    (
        r"^Your conversation is too large to continue",
        "context_limit",
        false,
    ),
    (
        r"^Amazon Q is having trouble responding right now",
        "failed",
        false,
    ),
    (
        r"^The model you've selected is temporarily unavailable",
        "failed",
        false,
    ),
    (
        r"^Tool approval required but --no-interactive was specified",
        "failed",
        false,
    ),
];

const KIRO_RULES: &[BuiltinRule] = &[
    (
        r"^Authentication failed\. Your API key may be invalid or expired",
        "auth",
        false,
    ),
    (
        r"^You are not logged in, please log in with kiro-cli login",
        "auth",
        false,
    ),
    (r"^Your login session has expired", "auth", false),
    // A device login waits for a browser forever: no need to wait for the timeout.
    (r"^Logging in\.\.\.", "auth", true),
    (r"^The monthly usage limit has been reached", "quota", false),
    (
        r"^You've reached your (?:monthly|daily) usage limit",
        "quota",
        false,
    ),
    (r"^Kiro rate limit reached", "throttled", false),
    (
        r"^Request quota exceeded\. Please wait a moment and try again",
        "throttled",
        false,
    ),
    (
        r"^Too many requests, please wait before trying again",
        "throttled",
        false,
    ),
    (
        r"^The request was throttled by the service",
        "throttled",
        false,
    ),
    (r"^Context limit exceeded", "context_limit", false),
    (
        r"^Kiro is having trouble responding right now",
        "failed",
        false,
    ),
];

const CLAUDE_RULES: &[BuiltinRule] = &[
    (
        r"^(?:Failed to authenticate|Invalid API key|OAuth token has expired)",
        "auth",
        false,
    ),
    (r"^API Error: (?:401|403)\b", "auth", false),
    (
        r"^(?:You've hit your limit|Claude AI usage limit reached)",
        "quota",
        false,
    ),
    (r"^API Error: (?:429|529|503)\b", "throttled", false),
    (
        r"^API Error: (?:Rate limit reached|Overloaded|Repeated 529)",
        "throttled",
        false,
    ),
    (
        r"^(?:Prompt is too long|API Error: .*prompt is too long)",
        "context_limit",
        false,
    ),
];

const CODEX_RULES: &[BuiltinRule] = &[
    (r"401 Unauthorized", "auth", false),
    (r"^You've hit your usage limit", "quota", false),
    (
        r"exceeded retry limit, last status: 429",
        "throttled",
        false,
    ),
];

const GEMINI_RULES: &[BuiltinRule] = &[
    (
        r"^(?:API key not valid|Please set an Auth method)",
        "auth",
        false,
    ),
    (
        r"^(?:Quota exceeded|You have exhausted your daily quota)",
        "quota",
        false,
    ),
    (r"RESOURCE_EXHAUSTED|status 429", "throttled", false),
];

pub const PROFILES: &[Profile] = &[
    Profile {
        name: "qchat",
        command: "q",
        args: &["chat", "--no-interactive", "--trust-all-tools"],
        env: &[],
        root_env: &[],
        output: OutputMode::Text,
        rules: Q_RULES,
        preflight: &["whoami"],
        timeout: 120.0,
        login_hint: "q login",
        reports: &[],
        proof: None,
    },
    Profile {
        name: "kiro",
        command: "kiro-cli",
        args: &[
            "chat",
            "--no-interactive",
            "--trust-all-tools",
            "--wrap",
            "never",
        ],
        env: &[],
        root_env: &[],
        output: OutputMode::Text,
        rules: KIRO_RULES,
        preflight: &["whoami"],
        timeout: 300.0,
        login_hint: "kiro-cli login (or set KIRO_API_KEY in [adapter] env)",
        reports: &[Report::Credits],
        proof: Some(r"^Credits: "),
    },
    Profile {
        name: "claude",
        command: "claude",
        args: &[
            "-p",
            "--dangerously-skip-permissions",
            "--output-format",
            "stream-json",
            "--verbose",
        ],
        env: &[
            // Backoff is ralph-qchat's, shared by every task: Claude's own
            // ten tries over three minutes would hide an outage as timeouts.
            ("CLAUDE_CODE_MAX_RETRIES", "1"),
            ("DISABLE_TELEMETRY", "1"),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            ("DISABLE_AUTOUPDATER", "1"),
        ],
        root_env: &[("IS_SANDBOX", "1")],
        output: OutputMode::ClaudeStreamJson,
        rules: CLAUDE_RULES,
        preflight: &[],
        timeout: 900.0,
        login_hint: "set ANTHROPIC_API_KEY in [adapter] env (or log in with `claude` as the service user)",
        reports: &[Report::CostAndTokens],
        proof: None,
    },
    Profile {
        name: "codex",
        command: "codex",
        args: &[
            "exec",
            "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox",
        ],
        env: &[],
        root_env: &[],
        output: OutputMode::Text,
        rules: CODEX_RULES,
        preflight: &[],
        timeout: 900.0,
        login_hint: "codex login (or set OPENAI_API_KEY in [adapter] env)",
        reports: &[Report::Tokens],
        proof: None,
    },
    Profile {
        name: "gemini",
        command: "gemini",
        args: &["--yolo", "-p"],
        env: &[],
        root_env: &[],
        output: OutputMode::Text,
        rules: GEMINI_RULES,
        preflight: &[],
        timeout: 900.0,
        login_hint: "set GEMINI_API_KEY in [adapter] env",
        reports: &[],
        proof: None,
    },
    Profile {
        name: "custom",
        command: "",
        args: &[],
        env: &[],
        root_env: &[],
        output: OutputMode::Text,
        rules: &[],
        preflight: &[],
        timeout: 120.0,
        login_hint: "log the agent in as the service user",
        reports: &[],
        proof: None,
    },
];

/// A profile by its configured name (`[adapter] name`, `--agent`).
pub fn profile(name: &str) -> Option<&'static Profile> {
    let n = name.to_ascii_lowercase();
    let n = match n.as_str() {
        "q" | "q-chat" => "qchat",
        "kiro-cli" => "kiro",
        "claude-code" => "claude",
        other => other,
    };
    PROFILES.iter().find(|p| p.name == n)
}

impl Profile {
    pub fn rule_specs(&self) -> Vec<RuleSpec> {
        self.rules
            .iter()
            .map(|(p, c, stop)| RuleSpec {
                pattern: p.to_string(),
                class: c.to_string(),
                stop: *stop,
            })
            .collect()
    }

    /// The command line as ralph-qchat.toml(5) shows it.
    pub fn shown(&self) -> String {
        let mut s = if self.command.is_empty() {
            "[adapter] command".to_string()
        } else {
            self.command.to_string()
        };
        for a in self.args {
            s.push(' ');
            s.push_str(a);
        }
        s.push_str(" INSTRUCTION");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Ending;
    use crate::agent::classify::{Class, Rules, Said, classify};

    fn rules_of(name: &str) -> Rules {
        let p = profile(name).unwrap();
        let specs = p.rule_specs();
        Rules::compile(specs.iter().map(|s| (s, format!("profile {name}")))).unwrap()
    }

    fn class(name: &str, exit: i32, lines: &[&str]) -> Class {
        let said = Said {
            lines: lines.iter().map(|s| s.to_string()).collect(),
            ..Said::default()
        };
        classify(&Ending::Exited(exit), &said, &rules_of(name)).0
    }

    #[test]
    fn every_profile_compiles_and_names_resolve() {
        for p in PROFILES {
            rules_of(p.name);
        }
        assert_eq!(profile("q").unwrap().name, "qchat");
        assert_eq!(profile("Kiro-CLI").unwrap().name, "kiro");
        assert!(profile("copilot").is_none());
    }

    #[test]
    fn q_messages() {
        let q = |l: &[&str]| class("qchat", 0, l);
        assert_eq!(
            q(&[
                "⚠️  Amazon Q rate limit reached:",
                "Request quota exceeded. Please wait a moment and try again."
            ]),
            Class::Throttled
        );
        assert_eq!(
            q(&[
                "Monthly request limit reached for this month.",
                "The limits reset on 12/01."
            ]),
            Class::Quota
        );
        assert_eq!(
            q(&[
                "Amazon Q is having trouble responding right now: Maximum Chat GenerateAssistantResponse reached for this month."
            ]),
            Class::Quota
        );
        assert_eq!(
            q(&["Your login session has expired. Please log in again using: q login"]),
            Class::Auth
        );
        assert_eq!(
            q(&[
                "Amazon Q is having trouble responding right now: dispatch failure (other): No token"
            ]),
            Class::Auth
        );
        assert_eq!(
            class(
                "qchat",
                1,
                &["You are not logged in, please log in with q login"]
            ),
            Class::Auth
        );
        assert_eq!(
            q(&["Your conversation is too large to continue."]),
            Class::ContextLimit
        );
        assert_eq!(
            q(&["Amazon Q is having trouble responding right now: timeout"]),
            Class::Failed
        );
    }

    #[test]
    fn kiro_messages() {
        let k = |l: &[&str]| class("kiro", 0, l);
        assert_eq!(
            k(&["Authentication failed. Your API key may be invalid or expired."]),
            Class::Auth
        );
        assert_eq!(
            k(&["The monthly usage limit has been reached (request_id: 1)"]),
            Class::Quota
        );
        assert_eq!(
            k(&[
                "You've reached your daily usage limit. Please return tomorrow to continue building."
            ]),
            Class::Quota
        );
        assert_eq!(
            k(&[
                "⚠️ Kiro rate limit reached: Request quota exceeded. Please wait a moment and try again."
            ]),
            Class::Throttled
        );
        assert_eq!(
            k(&["Too many requests, please wait before trying again."]),
            Class::Throttled
        );
        assert_eq!(
            k(&["The request was throttled by the service (request_id: 2)"]),
            Class::Throttled
        );
        assert_eq!(
            k(&["Context limit exceeded unexpectedly. Please start a new session to continue."]),
            Class::ContextLimit
        );
        assert_eq!(k(&["> PONG", "▸ Credits: 0.01 • Time: 1s"]), Class::Success);
    }

    #[test]
    fn near_misses_are_success() {
        for name in ["qchat", "kiro", "claude", "codex", "gemini"] {
            let c = class(
                name,
                0,
                &[
                    "I added a check: if the Amazon Q rate limit reached message appears, back off.",
                    "Implemented the token bucket; when the rate limit is reached we return 429.",
                    "Tests for 'Monthly request limit reached' handling pass.",
                    "The parser now handles `Logging in...` lines.",
                    "Updated docs: You are not logged in is shown when the token is missing.",
                    "'Monthly request limit reached' is now shown in the UI",
                    "`Logging in...` is printed by the login flow",
                    "\"Your login session has expired\" comes from the token refresher",
                ],
            );
            assert_eq!(c, Class::Success, "profile {name}");
        }
    }

    #[test]
    fn claude_messages() {
        assert_eq!(
            class(
                "claude",
                1,
                &["Failed to authenticate. API Error: 401 {\"type\":\"error\"}"]
            ),
            Class::Auth
        );
        assert_eq!(
            class(
                "claude",
                1,
                &["API Error: 529 {\"type\":\"overloaded_error\"}"]
            ),
            Class::Throttled
        );
        assert_eq!(
            class("claude", 0, &["API Error: Rate limit reached"]),
            Class::Throttled
        );
        assert_eq!(
            class(
                "claude",
                1,
                &["You've hit your limit · resets 1pm (Europe/Lisbon)"]
            ),
            Class::Quota
        );
    }
}
