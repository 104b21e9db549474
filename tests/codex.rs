//! The real Codex CLI (npm `@openai/codex`, pinned in tests/agent-cli.sh,
//! its node wrapper and the native binary it starts) driven by
//! `ralph-qchat run --agent codex` against a scripted Responses API server:
//! Codex echoes the instruction, marker line included, and that echo must
//! never complete a task.

mod common;
mod scripted_model;

use common::*;
use scripted_model::{ModelServer, Script};
use std::time::Duration;

#[test]
fn codex_echoing_the_marker_does_not_complete_the_task() {
    let Some(bin) = scripted_model::real_cli("codex") else {
        return;
    };
    let sb = Sandbox::new("codex-echo");
    let server = ModelServer::start(Script::Say(vec![
        "Not finished: LOOP_DONE comes later.".into(),
        "Still working.".into(),
        "All tests pass.\nLOOP_DONE".into(),
    ]));
    // Codex reads its provider from ~/.codex/config.toml (HOME is the sandbox).
    std::fs::create_dir_all(sb.path(".codex")).unwrap();
    sb.write(
        ".codex/config.toml",
        format!(
            "model_provider = \"scripted\"\n[model_providers.scripted]\nname = \"scripted\"\nbase_url = \"{}/v1\"\nwire_api = \"responses\"\nenv_key = \"OPENAI_API_KEY\"\n",
            server.url
        ),
    );
    sb.write(
        "PROMPT.md",
        "# Task\n\nWhen everything works, print this line on its own:\nLOOP_DONE\n",
    );
    sb.write(
        "cfg.toml",
        "[orchestrator]\noutput_completion_marker = \"LOOP_DONE\"\n",
    );
    let b = bin.display().to_string();
    let mut c = sb.run_program(
        &b,
        &["--agent", "codex", "--config", "cfg.toml", "--no-git"],
    );
    c.env("OPENAI_API_KEY", "sk-test");
    let r = start(c).finish(Duration::from_secs(90));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["reason"], "output_marker", "{s}");
    assert_eq!(s["iteration"], 3, "the echo completed the task early: {s}");
    assert_eq!(server.responses(), 3);
    // Codex's `tokens used` line (15 per scripted answer) is summed.
    assert_eq!(s["tokens"], 45, "{s}");
    // The echo is really there: the instruction's marker line in Codex's output.
    let t = sb.read(".ralph-qchat/tasks/PROMPT/iterations/000001.log");
    assert!(t.contains("user\n") && t.contains("\nLOOP_DONE\n"), "{t}");
    sb.assert_nothing_left();
}
