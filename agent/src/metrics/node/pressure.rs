//! `pressure`: pressure stall information from /proc/pressure.

use std::time::Instant;

use super::{parse_u64, read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

pub struct Pressure;

/// (file, line, metric, help): node_exporter 1.5's set, plus the CPU "full"
/// line that newer node_exporters export (kernels since 5.13 write it).
const SERIES: [(&str, &str, &str, &str); 6] = [
    (
        "/proc/pressure/cpu",
        "some",
        "node_pressure_cpu_waiting_seconds_total",
        "Total time in seconds that processes have waited for CPU time",
    ),
    (
        "/proc/pressure/cpu",
        "full",
        "node_pressure_cpu_stalled_seconds_total",
        "Total time in seconds no process could make progress due to CPU congestion",
    ),
    (
        "/proc/pressure/io",
        "some",
        "node_pressure_io_waiting_seconds_total",
        "Total time in seconds that processes have waited due to IO congestion",
    ),
    (
        "/proc/pressure/io",
        "full",
        "node_pressure_io_stalled_seconds_total",
        "Total time in seconds no process could make progress due to IO congestion",
    ),
    (
        "/proc/pressure/memory",
        "some",
        "node_pressure_memory_waiting_seconds_total",
        "Total time in seconds that processes have waited for memory",
    ),
    (
        "/proc/pressure/memory",
        "full",
        "node_pressure_memory_stalled_seconds_total",
        "Total time in seconds no process could make progress due to memory congestion",
    ),
];

impl Collector for Pressure {
    fn name(&self) -> &'static str {
        "pressure"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let mut buf = Vec::with_capacity(256);
        let mut current = "";
        let mut totals: [Option<u64>; 2] = [None, None];
        for (path, kind, name, help) in SERIES {
            if path != current {
                current = path;
                totals = match read_text(path, &mut buf) {
                    Ok(text) => parse_totals(path, text)?,
                    Err(CollectError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                        return Err(CollectError::NoData(
                            "the kernel has no pressure stall information".into(),
                        ));
                    }
                    Err(err) => return Err(err),
                };
            }
            let total = if kind == "some" { totals[0] } else { totals[1] };
            if let Some(micros) = total {
                out.single(name, help, MetricType::Counter, micros as f64 / 1e6);
            }
        }
        Ok(())
    }
}

/// The `total=` (microseconds) of the "some" and "full" lines.
fn parse_totals(path: &str, text: &str) -> Result<[Option<u64>; 2], CollectError> {
    let mut totals = [None, None];
    for line in text.lines() {
        let slot = match line.split_ascii_whitespace().next() {
            Some("some") => 0,
            Some("full") => 1,
            _ => continue,
        };
        let total = line
            .split_ascii_whitespace()
            .find_map(|f| f.strip_prefix("total="))
            .ok_or_else(|| CollectError::parse(path, "no total="))?;
        totals[slot] = Some(parse_u64(path, total)?);
    }
    Ok(totals)
}
