//! `stat`: the node-wide lines of /proc/stat.

use std::time::Instant;

use super::{parse_u64, read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

const PATH: &str = "/proc/stat";

pub struct Stat;

impl Collector for Stat {
    fn name(&self) -> &'static str {
        "stat"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let mut buf = Vec::with_capacity(8192);
        let text = read_text(PATH, &mut buf)?;
        let (mut intr, mut ctxt, mut btime, mut forks, mut running, mut blocked) = (None, None, None, None, None, None);
        for line in text.lines() {
            let mut fields = line.split_ascii_whitespace();
            let slot = match fields.next() {
                Some("intr") => &mut intr,
                Some("ctxt") => &mut ctxt,
                Some("btime") => &mut btime,
                Some("processes") => &mut forks,
                Some("procs_running") => &mut running,
                Some("procs_blocked") => &mut blocked,
                _ => continue,
            };
            // intr's first number is the total; the per-IRQ rest is not exported.
            *slot = Some(parse_u64(PATH, fields.next().unwrap_or_default())?);
        }
        let need =
            |value: Option<u64>, what: &str| value.ok_or_else(|| CollectError::parse(PATH, format!("no {what} line")));
        let (intr, ctxt, btime, forks) = (
            need(intr, "intr")?,
            need(ctxt, "ctxt")?,
            need(btime, "btime")?,
            need(forks, "processes")?,
        );
        out.family(
            "node_boot_time_seconds",
            "Node boot time, in unixtime.",
            MetricType::Gauge,
        );
        out.sample_u64("node_boot_time_seconds", &[], btime);
        out.family(
            "node_context_switches_total",
            "Total number of context switches.",
            MetricType::Counter,
        );
        out.sample_u64("node_context_switches_total", &[], ctxt);
        out.family("node_forks_total", "Total number of forks.", MetricType::Counter);
        out.sample_u64("node_forks_total", &[], forks);
        out.family(
            "node_intr_total",
            "Total number of interrupts serviced.",
            MetricType::Counter,
        );
        out.sample_u64("node_intr_total", &[], intr);
        if let Some(blocked) = blocked {
            out.family(
                "node_procs_blocked",
                "Number of processes blocked waiting for I/O to complete.",
                MetricType::Gauge,
            );
            out.sample_u64("node_procs_blocked", &[], blocked);
        }
        if let Some(running) = running {
            out.family(
                "node_procs_running",
                "Number of processes in runnable state.",
                MetricType::Gauge,
            );
            out.sample_u64("node_procs_running", &[], running);
        }
        Ok(())
    }
}
