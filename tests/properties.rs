//! Property tests: whatever configuration, environment, spool entry, prompt
//! or HTTP request comes in, the answer is a clear error or a correct result,
//! never a panic.

use proptest::prelude::*;
use ralph_qchat::config::{self, Layers, Source};
use std::io::{Read, Write};
use std::time::Duration;

fn temp(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "ralph-qchat-prop-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const SECTIONS: &[&str] = &[
    "adapter",
    "orchestrator",
    "performance",
    "limits",
    "logging",
    "monitoring",
    "paths",
    "cache",
    "circuit_breaker",
    "bogus",
];
const KEYS: &[&str] = &[
    "timeout",
    "max_retries",
    "name",
    "buffer_size",
    "max_concurrent",
    "level",
    "format",
    "health_check_allow",
    "state_dir",
    "enabled",
    "prompt_template",
    "env",
    "x",
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        any::<bool>().prop_map(|v| v.to_string()),
        "[a-zA-Z0-9 {}_./-]{0,20}".prop_map(|s| format!("{s:?}")),
        Just("[\"10.0.0.0/8\", \"::1\"]".to_string()),
        Just("{ A = \"b\" }".to_string()),
        "[^\\n]{0,12}",
    ]
}

fn toml_doc() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            prop::sample::select(SECTIONS),
            prop::collection::vec((prop::sample::select(KEYS), value()), 0..4),
        ),
        0..4,
    )
    .prop_map(|sections| {
        let mut s = String::new();
        for (name, keys) in sections {
            s.push_str(&format!("[{name}]\n"));
            for (k, v) in keys {
                s.push_str(&format!("{k} = {v}\n"));
            }
        }
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_config_file_is_loaded_or_refused_with_a_located_message(doc in prop_oneof![toml_doc(), ".{0,200}"]) {
        let dir = temp("cfg");
        let path = dir.join("c.toml");
        std::fs::write(&path, &doc).unwrap();
        let r = config::load(&Layers { file: Some(path.clone()), file_required: true, ..Layers::default() });
        if let Err(e) = r {
            prop_assert!(!e.message.is_empty());
            let located = matches!(&e.source, Source::File { path: p, line } if p == &path && *line >= 1)
                || matches!(&e.source, Source::Default);
            prop_assert!(located, "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn any_environment_value_is_used_or_refused_naming_the_variable(i in 0..config::ENV_KEYS.len(), v in ".{0,20}") {
        let var = config::ENV_KEYS[i].0;
        let r = config::load(&Layers { env: vec![(var.to_string(), v.clone())], ..Layers::default() });
        if let Err(e) = r {
            prop_assert_eq!(e.source, Source::Env(var.to_string()));
        }
    }

    #[test]
    fn any_spool_entry_becomes_a_task_or_a_rejection_with_a_reason(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300),
            toml_doc().prop_map(String::into_bytes),
            "(id|prompt_file|workdir|max_iterations|max_runtime) = [^\\n]{0,30}\\n".prop_map(String::into_bytes),
        ],
        ext in prop::sample::select(&["toml", "md", "txt", ""][..]),
    ) {
        let dir = temp("spool");
        let spool = dir.join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let name = if ext.is_empty() { "entry".to_string() } else { format!("entry.{ext}") };
        let path = spool.join(&name);
        std::fs::write(&path, &bytes).unwrap();
        let none = |_: &str, _: &str| ralph_qchat::store::spool::Known::No;
        match ralph_qchat::store::spool::examine(&dir, &path, 1 << 20, &none) {
            ralph_qchat::store::spool::Entry::Reject(reason) => prop_assert!(!reason.is_empty()),
            ralph_qchat::store::spool::Entry::Task(t) => prop_assert!(ralph_qchat::task::valid_id(&t.id)),
            ralph_qchat::store::spool::Entry::Skip => {}
            ralph_qchat::store::spool::Entry::Taken(_) => prop_assert!(false, "no task is known"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_marker_line_completes_and_text_without_the_word_never_does(text in "[^\\x00]{0,300}") {
        use ralph_qchat::task::completion::prompt_complete;
        let with = format!("{text}\nTASK_COMPLETE\n");
        prop_assert!(prompt_complete(with.as_bytes(), "TASK_COMPLETE"));
        if !text.contains("TASK_COMPLETE") {
            prop_assert!(!prompt_complete(text.as_bytes(), "TASK_COMPLETE"));
        }
    }

    #[test]
    fn prompts_are_refused_or_passed_without_nul(bytes in prop::collection::vec(any::<u8>(), 0..500), max in 0u64..600) {
        use ralph_qchat::agent::instruction::{check_prompt, instruction, MAX_ARG_LEN};
        match check_prompt(bytes.clone(), max, &["rm -rf".to_string()]) {
            Ok(p) => {
                prop_assert!(!p.text.contains(&0));
                prop_assert!(bytes.len() as u64 <= max);
                let (i, _) = instruction("{prompt} in {prompt_file}", "/w/P.md", &p.text, "M", 1, b"");
                prop_assert!(i.len() <= MAX_ARG_LEN);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn retry_delays_grow_and_stay_under_the_cap(base in 0.0f64..10.0, cap in 0.0f64..100.0, a in 1u32..200, j in 0.0f64..1.0) {
        use ralph_qchat::task::rules::retry_delay;
        let d = retry_delay(base, a, cap, j).as_secs_f64();
        prop_assert!(d <= cap + 1e-9);
        prop_assert!(retry_delay(base, a + 1, cap, 0.0).as_secs_f64() + 1e-9 >= retry_delay(base, a, cap, 0.0).as_secs_f64());
    }
}

fn http_server() -> (ralph_qchat::http::HttpServer, String) {
    let shared = ralph_qchat::engine::Shared::new("qchat", "/bin/sh", std::env::temp_dir());
    // Stands in for a live scheduler, so /health stays 200 however long this runs.
    let ticker = shared.clone();
    std::thread::spawn(move || {
        loop {
            ticker.tick();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let s = ralph_qchat::http::start("127.0.0.1", 0, &[], shared).unwrap();
    let addr = s.addr.to_string();
    (s, addr)
}

fn exchange(addr: &str, raw: &[u8]) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(raw).ok()?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn any_request_gets_a_sane_status_and_the_server_stays_up(
        method in prop::sample::select(&["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "BREW"][..]),
        path in "/[a-zA-Z0-9/._%?=-]{0,40}",
        header in "[a-zA-Z-]{1,10}: [^\\r\\n]{0,40}",
        garbage in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        static SERVER: std::sync::OnceLock<(ralph_qchat::http::HttpServer, String)> = std::sync::OnceLock::new();
        let (_, addr) = SERVER.get_or_init(http_server);
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{header}\r\nConnection: close\r\n\r\n");
        if let Some(code) = exchange(addr, req.as_bytes()) {
            prop_assert!([200, 400, 404, 405, 503].contains(&code), "{code} for {req:?}");
            if method != "GET" && method != "HEAD" {
                prop_assert!(code == 405 || code == 400, "{code} for {req:?}");
            }
        }
        let _ = exchange(addr, &garbage);
        prop_assert_eq!(exchange(addr, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), Some(200));
    }
}

mod agent_output {
    use proptest::prelude::*;
    use ralph_qchat::agent::Ending;
    use ralph_qchat::agent::classify::{RuleSpec, Rules, Said, classify, wait_hint};
    use ralph_qchat::agent::text::{Lines, Strip, rule_text, strip};

    /// Bytes like agent output: text, escape sequences (whole, cut, broken),
    /// newlines, carriage returns, invalid UTF-8.
    fn output() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            Just(b"\x1b[38;5;141m".to_vec()),
            Just(b"\x1b[0m".to_vec()),
            Just(b"\x1b]0;title\x07".to_vec()),
            Just(b"\x1b]8;;http://x\x1b\\".to_vec()),
            Just(b"\x1b[".to_vec()),
            Just(b"\x1b".to_vec()),
            Just(b"\r\n".to_vec()),
            Just("⚠️  Amazon Q rate limit reached:".as_bytes().to_vec()),
            Just(b"\xff\xfe".to_vec()),
        ];
        proptest::collection::vec(piece, 0..30).prop_map(|v| v.concat())
    }

    fn all_lines(chunks: &[&[u8]]) -> Vec<String> {
        let mut l = Lines::default();
        let mut got = vec![];
        for c in chunks {
            l.feed(c, |s| got.push(s.to_string()));
        }
        l.finish(|s| got.push(s.to_string()));
        got
    }

    proptest! {
        #[test]
        fn stripping_is_idempotent_and_leaves_no_escape(b in output()) {
            let once = strip(&b);
            prop_assert!(!once.contains(&0x1b));
            prop_assert_eq!(strip(&once), once);
        }

        #[test]
        fn where_a_read_ends_does_not_change_the_text(b in output(), cuts in proptest::collection::vec(0usize..400, 0..6)) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(b.len())).collect();
            cuts.sort();
            let mut chunks: Vec<&[u8]> = vec![];
            let mut at = 0;
            for c in cuts {
                chunks.push(&b[at..c]);
                at = c;
            }
            chunks.push(&b[at..]);
            let mut streamed = vec![];
            let mut s = Strip::default();
            for c in &chunks {
                s.feed(c, &mut streamed);
            }
            prop_assert_eq!(&streamed, &strip(&b));
            prop_assert_eq!(all_lines(&chunks), all_lines(&[&b]));
        }

        #[test]
        fn classifying_any_output_never_panics(b in output(), code in -1i32..256, hint in ".{0,80}") {
            let specs: Vec<RuleSpec> = [("^Amazon Q rate limit reached", "throttled"), ("(?i)quota", "quota")]
                .iter()
                .map(|(p, c)| RuleSpec { pattern: p.to_string(), class: c.to_string(), stop: false })
                .collect();
            let rules = Rules::compile(specs.iter().map(|s| (s, "p".to_string()))).unwrap();
            let lines = all_lines(&[&b]);
            for l in &lines {
                let _ = rule_text(l);
                let _ = rules.stop_on(l);
            }
            let said = Said { lines, ..Said::default() };
            let _ = classify(&Ending::Exited(code), &said, &rules);
            let _ = wait_hint(&String::from_utf8_lossy(&b), 1_764_547_200);
            let _ = wait_hint(&hint, 1_764_547_200);
        }
    }
}
