//! `loadavg`: /proc/loadavg.

use std::time::Instant;

use super::{read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

const PATH: &str = "/proc/loadavg";

pub struct Loadavg;

impl Collector for Loadavg {
    fn name(&self) -> &'static str {
        "loadavg"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let mut buf = Vec::with_capacity(128);
        let text = read_text(PATH, &mut buf)?;
        let mut fields = text.split_ascii_whitespace();
        for (name, help) in [
            ("node_load1", "1m load average."),
            ("node_load5", "5m load average."),
            ("node_load15", "15m load average."),
        ] {
            let word = fields.next().unwrap_or_default();
            let value: f64 = word
                .parse()
                .map_err(|_| CollectError::parse(PATH, format!("{word:?} is not a load average")))?;
            out.single(name, help, MetricType::Gauge, value);
        }
        Ok(())
    }
}
