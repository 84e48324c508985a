//! `textfile`: `*.prom` files that other programs drop into a directory
//! (node_exporter's textfile collector, same metric names and rules: files
//! with client-side timestamps or syntax errors are skipped whole and flagged
//! in `node_textfile_scrape_error`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Instant, UNIX_EPOCH};

use super::{CollectError, Collector};
use crate::metrics::encode::{Encoder, Format, MetricType};
use crate::metrics::exposition::{self, Family};

pub struct Textfile {
    dir: PathBuf,
}

impl Textfile {
    pub fn new(dir: PathBuf) -> Textfile {
        Textfile { dir }
    }
}

impl Collector for Textfile {
    fn name(&self) -> &'static str {
        "textfile"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let mut error = false;
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "prom"))
                .collect(),
            // A directory nobody has created yet simply holds no metrics.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => {
                tracing::warn!(dir = %self.dir.display(), error = %err, "cannot read the textfile directory");
                error = true;
                Vec::new()
            }
        };
        files.sort();
        let mut merged: BTreeMap<String, Family> = BTreeMap::new();
        let mut mtimes: Vec<(String, f64)> = Vec::new();
        for path in files {
            let shown = path.display().to_string();
            let read = std::fs::metadata(&path).and_then(|meta| Ok((std::fs::read_to_string(&path)?, meta)));
            let (text, mtime) = match read {
                Ok((text, meta)) if meta.is_file() => {
                    let mtime = meta
                        .modified()
                        .ok()
                        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                        .map_or(0.0, |d| d.as_millis() as f64 / 1e3);
                    (text, mtime)
                }
                Ok(_) => continue,
                Err(err) => {
                    tracing::warn!(file = %shown, error = %err, "cannot read textfile");
                    error = true;
                    continue;
                }
            };
            let families = match exposition::parse(&text) {
                Ok(families) => families,
                Err(err) => {
                    tracing::warn!(file = %shown, error = %err, "textfile is not valid exposition format; skipped");
                    error = true;
                    continue;
                }
            };
            if families
                .iter()
                .flat_map(|f| &f.samples)
                .any(|s| s.timestamp_ms.is_some())
            {
                tracing::warn!(file = %shown, "textfile has client-side timestamps, which are not supported; skipped");
                error = true;
                continue;
            }
            let conflict = families
                .iter()
                .find(|f| merged.get(&f.name).is_some_and(|m| m.kind != f.kind));
            if let Some(family) = conflict {
                tracing::warn!(file = %shown, metric = %family.name, "textfile metric has a different type in another file; file skipped");
                error = true;
                continue;
            }
            for family in families {
                let help = family
                    .help
                    .clone()
                    .unwrap_or_else(|| format!("Metric read from {shown}"));
                let entry = merged.entry(family.name.clone()).or_insert_with(|| Family {
                    help: Some(help),
                    samples: Vec::new(),
                    ..family.clone()
                });
                for sample in family.samples {
                    if !entry
                        .samples
                        .iter()
                        .any(|s| s.name == sample.name && s.labels == sample.labels)
                    {
                        entry.samples.push(sample);
                    }
                }
            }
            mtimes.push((shown, mtime));
        }
        for family in merged.values() {
            let help = family.help.as_deref().unwrap_or_default();
            let kind = match (family.metric_type(), out.format()) {
                // OpenMetrics counters must end in _total; others pass as unknown.
                (Some(MetricType::Counter), Format::OpenMetrics) if !family.name.ends_with("_total") => {
                    Some(MetricType::Untyped)
                }
                (kind, _) => kind,
            };
            match kind {
                Some(kind) => out.family(&family.name, help, kind),
                None => out.family_raw(&family.name, help, &family.kind),
            }
            for sample in &family.samples {
                let labels: Vec<(&str, &str)> = sample.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                out.sample(&sample.name, &labels, sample.value);
            }
        }
        if !mtimes.is_empty() {
            out.family(
                "node_textfile_mtime_seconds",
                "Unixtime mtime of textfiles successfully read.",
                MetricType::Gauge,
            );
            for (file, mtime) in &mtimes {
                out.sample("node_textfile_mtime_seconds", &[("file", file)], *mtime);
            }
        }
        out.single(
            "node_textfile_scrape_error",
            "1 if there was an error opening or reading a file, 0 otherwise",
            MetricType::Gauge,
            if error { 1.0 } else { 0.0 },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(dir: &std::path::Path) -> Vec<Family> {
        let mut enc = Encoder::new(Format::Text);
        Textfile::new(dir.to_path_buf())
            .collect(&mut enc, Instant::now())
            .unwrap();
        exposition::parse(std::str::from_utf8(enc.as_bytes()).unwrap()).unwrap()
    }

    fn value(families: &[Family], name: &str) -> f64 {
        families.iter().find(|f| f.name == name).unwrap().samples[0].value
    }

    #[test]
    fn exports_valid_files_and_flags_broken_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.prom"),
            "# TYPE backup_age_seconds gauge\nbackup_age_seconds{job=\"x\"} 5\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.prom"),
            "backup_age_seconds{job=\"y\"} 6\nother_total 1\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("ignored.txt"), "not_exported 1\n").unwrap();
        let families = collect(dir.path());
        let backup = families.iter().find(|f| f.name == "backup_age_seconds").unwrap();
        assert_eq!(
            backup.samples.len(),
            1,
            "b.prom's untyped family conflicts with a.prom's gauge"
        );
        assert_eq!(value(&families, "node_textfile_scrape_error"), 1.0);
        assert!(families.iter().all(|f| f.name != "not_exported"));

        std::fs::write(
            dir.path().join("b.prom"),
            "# TYPE backup_age_seconds gauge\nbackup_age_seconds{job=\"y\"} 6\n",
        )
        .unwrap();
        let families = collect(dir.path());
        let backup = families.iter().find(|f| f.name == "backup_age_seconds").unwrap();
        assert_eq!(backup.samples.len(), 2, "same family in two files is merged");
        assert_eq!(value(&families, "node_textfile_scrape_error"), 0.0);
        let mtimes = families
            .iter()
            .find(|f| f.name == "node_textfile_mtime_seconds")
            .unwrap();
        assert_eq!(mtimes.samples.len(), 2);

        std::fs::write(dir.path().join("c.prom"), "with_timestamp 1 1700000000000\n").unwrap();
        let families = collect(dir.path());
        assert!(families.iter().all(|f| f.name != "with_timestamp"));
        assert_eq!(value(&families, "node_textfile_scrape_error"), 1.0);
    }

    #[test]
    fn missing_directory_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let families = collect(&dir.path().join("absent"));
        assert_eq!(value(&families, "node_textfile_scrape_error"), 0.0);
    }
}
