//! `vmstat`: the /proc/vmstat fields node_exporter exports by default
//! (`--collector.vmstat.fields="^(oom_kill|pgpg|pswp|pg.*fault).*"`), untyped
//! as there.

use std::time::Instant;

use super::{parse_u64, read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

const PATH: &str = "/proc/vmstat";

pub struct Vmstat;

/// node_exporter's default field regex, spelled out: this runs for each of
/// about 180 lines per scrape.
fn exported(field: &str) -> bool {
    field.starts_with("oom_kill")
        || field.starts_with("pgpg")
        || field.starts_with("pswp")
        || (field.starts_with("pg") && field[2..].contains("fault"))
}

impl Collector for Vmstat {
    fn name(&self) -> &'static str {
        "vmstat"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let mut buf = Vec::with_capacity(8192);
        let text = read_text(PATH, &mut buf)?;
        let mut name = String::with_capacity(64);
        let mut help = String::with_capacity(96);
        for line in text.lines() {
            let Some((field, value)) = line.split_once(' ') else {
                continue;
            };
            if !exported(field) {
                continue;
            }
            name.clear();
            name.push_str("node_vmstat_");
            name.push_str(field);
            help.clear();
            help.push_str("/proc/vmstat information field ");
            help.push_str(field);
            help.push('.');
            out.family(&name, &help, MetricType::Untyped);
            out.sample_u64(&name, &[], parse_u64(PATH, value.trim())?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn field_filter_matches_node_exporter_default() {
        for yes in ["oom_kill", "pgpgin", "pgpgout", "pswpin", "pgfault", "pgmajfault"] {
            assert!(super::exported(yes), "{yes}");
        }
        for no in ["nr_free_pages", "pgalloc_normal", "workingset_refault_anon", "pg"] {
            assert!(!super::exported(no), "{no}");
        }
    }
}
