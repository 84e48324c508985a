//! The Grafana dashboard and the PrometheusRule under packaging/monitoring:
//! the rules pass `promtool check rules`, and both use only metric names the
//! agent exports or has promised (the contract in `metrics::agent`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use platform_agent::metrics::{node, Format, MetricsSettings, Scraper};
use platform_agent::status::Status;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Words that look like our metric names (`node_*`, `platform_agent_*`).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["platform_agent_", "node_"] {
        let mut from = 0;
        while let Some(found) = text[from..].find(prefix) {
            let start = from + found;
            let preceded_by_word = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |e| start + e);
            if !preceded_by_word {
                names.insert(text[start..end].to_string());
            }
            from = end;
        }
    }
    names
}

/// The rule file inside the PrometheusRule: everything under `spec:`,
/// one indentation level out.
fn plain_rules(prometheus_rule: &str) -> String {
    let spec = prometheus_rule.split_once("\nspec:\n").expect("a spec: section").1;
    spec.lines()
        .map(|line| line.strip_prefix("  ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn alert_rules_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, plain_rules(&read("packaging/monitoring/prometheus-rules.yaml"))).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e}; run `sudo bash tests/fixtures/install-metrics-peers.sh` to install it")
        });
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules failed:\n{report}");
    let found: usize = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("SUCCESS: ")?.split(' ').next()?.parse().ok())
        .expect("promtool reports the rule count");
    assert!(found >= 15, "only {found} rules:\n{report}");
}

#[tokio::test]
async fn dashboard_and_rules_use_only_exported_or_promised_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let settings = MetricsSettings {
        textfile_dir: dir.path().to_path_buf(),
        ..MetricsSettings::default()
    };
    let scraper = Scraper::new(node::default_collectors(&settings).unwrap(), Duration::from_secs(5));
    let scrape = String::from_utf8(scraper.scrape(Format::Text, &Status::new("0.0.0")).await).unwrap();
    let mut known = metric_names(&scrape);
    let contract = metric_names(&read("agent/src/metrics/agent.rs"));
    assert!(
        contract.contains("platform_agent_wal_archive_lag_seconds"),
        "{contract:?}"
    );
    known.extend(contract);
    // Hardware-dependent families that this machine may lack.
    known.insert("node_memory_SwapTotal_bytes".into());
    known.insert("node_memory_SwapFree_bytes".into());

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("packaging/monitoring/grafana-dashboard.json")).expect("valid JSON");
    let mut exprs = Vec::new();
    let mut stack = vec![&dashboard];
    while let Some(value) = stack.pop() {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(expr)) = map.get("expr") {
                    exprs.push(expr.clone());
                }
                stack.extend(map.values());
            }
            serde_json::Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    assert!(exprs.len() >= 20, "the dashboard has {} queries", exprs.len());
    let rules = read("packaging/monitoring/prometheus-rules.yaml");
    let rule_exprs: String = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.contains("summary:") && !l.contains("description:"))
        .collect::<Vec<_>>()
        .join("\n");

    for (what, text) in [("dashboard", exprs.join("\n")), ("rules", rule_exprs)] {
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{what} uses no metrics");
        let unknown: Vec<&String> = used.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "{what} uses metrics nobody exports or promised: {unknown:?}"
        );
    }
}
