//! `meminfo`: every line of /proc/meminfo, named as node_exporter names
//! them (`Active(anon)` -> `node_memory_Active_anon_bytes`).

use std::time::Instant;

use super::{parse_u64, read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

const PATH: &str = "/proc/meminfo";

pub struct Meminfo;

impl Collector for Meminfo {
    fn name(&self) -> &'static str {
        "meminfo"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let mut buf = Vec::with_capacity(4096);
        let text = read_text(PATH, &mut buf)?;
        let mut name = String::with_capacity(64);
        let mut help = String::with_capacity(96);
        let mut seen = 0;
        for line in text.lines() {
            let mut fields = line.split_ascii_whitespace();
            let (Some(key), Some(value)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Some(key) = key.strip_suffix(':') else {
                continue;
            };
            let mut value = parse_u64(PATH, value)? as f64;
            name.clear();
            name.push_str("node_memory_");
            for c in key.chars() {
                match c {
                    '(' => name.push('_'),
                    ')' => {}
                    other => name.push(other),
                }
            }
            if fields.next() == Some("kB") {
                value *= 1024.0;
                name.push_str("_bytes");
            }
            help.clear();
            help.push_str("Memory information field ");
            help.push_str(&name["node_memory_".len()..]);
            help.push('.');
            out.single(&name, &help, MetricType::Gauge, value);
            seen += 1;
        }
        if seen == 0 {
            return Err(CollectError::parse(PATH, "no fields"));
        }
        Ok(())
    }
}
