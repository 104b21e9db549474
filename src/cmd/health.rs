//! `ralph-qchat health`: asks /health and exits 0 (healthy, degraded or
//! standby) or 1 (anything else, including no answer). Needs no curl.

use crate::cli::HealthArgs;
use crate::exit::{self, Failure};
use crate::http::client::get;

fn default_url(a: &HealthArgs) -> Result<String, Failure> {
    let (file, required) = crate::config::paths::config_file(a.config.as_deref());
    let loaded = crate::config::load(&crate::config::Layers {
        file,
        file_required: required,
        env: crate::config::process_env(),
        flags: vec![],
    })?;
    let m = &loaded.config.monitoring;
    let host = match m.health_check_bind.as_str() {
        "0.0.0.0" => "127.0.0.1".to_string(),
        "::" => "[::1]".to_string(),
        h if h.contains(':') => format!("[{h}]"),
        h => h.to_string(),
    };
    Ok(format!("http://{host}:{}/health", m.health_check_port))
}

pub fn probe(a: HealthArgs) -> Result<i32, Failure> {
    let url = match &a.url {
        Some(u) => u.clone(),
        None => default_url(&a)?,
    };
    let timeout = crate::sys::time::seconds(a.timeout.unwrap_or(5.0).max(0.001));
    match get(&url, timeout) {
        Ok((code, body)) => {
            println!("{}", body.trim());
            let status = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["status"].as_str().map(str::to_string))
                .unwrap_or_default();
            let ok = code == 200 && matches!(status.as_str(), "healthy" | "degraded" | "standby");
            Ok(if ok { exit::OK } else { exit::TASK_FAILED })
        }
        Err(e) => {
            eprintln!("ralph-qchat: health: {e}");
            Ok(exit::TASK_FAILED)
        }
    }
}
