//! packaging/kubernetes/ validated offline against the Kubernetes OpenAPI
//! schemas of a current release (kubernetes-validate, from PyPI, ships them),
//! and kept in step with the binary: the Job's podFailurePolicy names
//! ralph-qchat's own exit codes, the grace periods cover the drain, the
//! probes use /health and `ralph-qchat health`, the ConfigMap's qchat.toml
//! passes check-config, the kustomization renders (kubectl kustomize) to a
//! whole that validates, and the pods run as the image's user.

mod common;
use common::*;
use ralph_qchat::exit;
use std::path::{Path, PathBuf};
use std::process::Command;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/kubernetes")
}

fn validator() -> Option<PathBuf> {
    ci_tool("kubernetes-validate")
}

/// The manifests the kustomization lists, and the Job beside it.
fn manifests() -> Vec<PathBuf> {
    let k = std::fs::read_to_string(dir().join("kustomization.yaml")).unwrap();
    let mut files: Vec<PathBuf> = k
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|f| dir().join(f.trim()))
        .collect();
    assert!(files.len() >= 3, "{k}");
    files.push(dir().join("job.yaml"));
    files
}

/// A YAML file as JSON, read by the validator's own Python (PyYAML is one of
/// its dependencies).
fn load(validator: &Path, file: &Path) -> serde_json::Value {
    let python = validator.with_file_name("python3");
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_manifest_validates_against_the_current_schemas() {
    let Some(v) = validator() else { return };
    for f in manifests() {
        assert!(f.is_file(), "{} is listed but missing", f.display());
        let out = Command::new(&v).arg("--strict").arg(&f).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("passed"),
            "{}: {text}",
            f.display()
        );
    }
}

#[test]
fn the_job_fails_on_the_tasks_own_end_and_retries_a_kill() {
    let Some(v) = validator() else { return };
    let job = load(&v, &dir().join("job.yaml"));
    let rules = job["spec"]["podFailurePolicy"]["rules"].as_array().unwrap();
    let codes = |action: &str| -> Vec<i64> {
        let mut c: Vec<i64> = rules
            .iter()
            .filter(|r| r["action"] == action)
            .flat_map(|r| {
                r["onExitCodes"]["values"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|x| x.as_i64())
            .collect();
        c.sort();
        c
    };
    let mut fail = vec![
        exit::TASK_FAILED,
        exit::LIMIT_REACHED,
        exit::USAGE,
        exit::PROMPT_REFUSED,
        exit::NO_INPUT,
        exit::CONFIG,
    ]
    .into_iter()
    .map(i64::from)
    .collect::<Vec<_>>();
    fail.sort();
    assert_eq!(codes("FailJob"), fail);
    let killed = [
        exit::interrupted(libc::SIGKILL),
        exit::interrupted(libc::SIGTERM),
    ];
    assert_eq!(codes("Count"), killed.map(i64::from).to_vec());
    // Every one is an exit status the manual documents.
    let man =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("man/ralph-qchat.8"))
            .unwrap();
    let status = &man[man.find(".SH \"EXIT STATUS\"").unwrap()..];
    for c in &fail {
        assert!(
            status.contains(&format!(".B {c}\n")),
            "exit {c} is not in ralph-qchat(8)"
        );
    }
    assert_eq!(job["spec"]["template"]["spec"]["restartPolicy"], "Never");
}

#[test]
fn the_daemon_drains_within_its_grace_and_is_probed_by_health() {
    let Some(v) = validator() else { return };
    let sts = load(&v, &dir().join("statefulset.yaml"));
    let pod = &sts["spec"]["template"]["spec"];
    let cfg = ralph_qchat::config::Config::default();
    let drain = cfg.orchestrator.shutdown_grace + cfg.adapter.kill_grace;
    let grace = pod["terminationGracePeriodSeconds"].as_f64().unwrap();
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} ≤ the drain {drain} s"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/health");
    let live = c["livenessProbe"]["exec"]["command"].as_array().unwrap();
    assert_eq!(
        live[..2],
        [
            serde_json::json!("ralph-qchat"),
            serde_json::json!("health")
        ]
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(sts["spec"]["replicas"], 1);
}

#[test]
fn the_configmaps_configuration_passes_check_config() {
    let Some(v) = validator() else { return };
    let cm = load(&v, &dir().join("configmap.yaml"));
    let sb = Sandbox::new("k8s-config");
    let f = sb.write("qchat.toml", cm["data"]["qchat.toml"].as_str().unwrap());
    let r = run(sb.cmd(&["check-config", "--config", f.to_str().unwrap()]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("health_check_bind = \"0.0.0.0\""),
        "{}",
        r.stdout
    );
}

/// What `kubectl apply -k packaging/kubernetes` applies: the kustomization
/// rendered by kubectl's kustomize (Debian's kubectl 1.20 where no newer one
/// is installed; both render this base alike) is the listed manifests, and it
/// validates as a whole.
#[test]
fn the_kustomization_renders_and_the_result_validates() {
    let Some(v) = validator() else { return };
    let Some(kubectl) = ci_tool("kubectl") else {
        return;
    };
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sb = Sandbox::new("k8s-render");
    let rendered = sb.write("rendered.yaml", &out.stdout);
    let check = Command::new(&v)
        .arg("--strict")
        .arg(&rendered)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{text}");
    let passed = text.lines().filter(|l| l.contains(" passed ")).count();
    let mut listed: Vec<String> = manifests()
        .iter()
        .filter(|f| !f.ends_with("job.yaml"))
        .map(|f| load(&v, f)["kind"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(passed, listed.len(), "{text}");
    for kind in &listed {
        let resource = format!("resource {}/", kind.to_lowercase());
        assert!(
            text.lines()
                .any(|l| l.contains(&resource) && l.contains(" passed ")),
            "{kind} not rendered and validated: {text}"
        );
    }
}

/// The pods run as the user the image is built with.
#[test]
fn the_pods_run_as_the_images_user() {
    let Some(v) = validator() else { return };
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/Dockerfile"))
            .unwrap();
    let uid = dockerfile
        .split_whitespace()
        .skip_while(|w| *w != "--uid")
        .nth(1)
        .and_then(|u| u.parse::<i64>().ok())
        .expect("packaging/Dockerfile creates its user with --uid N");
    for f in ["statefulset.yaml", "job.yaml"] {
        let m = load(&v, &dir().join(f));
        let sc = &m["spec"]["template"]["spec"]["securityContext"];
        assert_eq!(sc["runAsUser"].as_i64(), Some(uid), "{f}");
        assert_eq!(sc["runAsGroup"].as_i64(), Some(uid), "{f}");
    }
}
