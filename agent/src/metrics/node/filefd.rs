//! `filefd`: /proc/sys/fs/file-nr.

use std::time::Instant;

use super::{parse_u64, read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

const PATH: &str = "/proc/sys/fs/file-nr";

pub struct Filefd;

impl Collector for Filefd {
    fn name(&self) -> &'static str {
        "filefd"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let mut buf = Vec::with_capacity(64);
        let text = read_text(PATH, &mut buf)?;
        let fields: Vec<&str> = text.split_ascii_whitespace().collect();
        if fields.len() != 3 {
            return Err(CollectError::parse(PATH, "expected three numbers"));
        }
        out.family(
            "node_filefd_allocated",
            "File descriptor statistics: allocated.",
            MetricType::Gauge,
        );
        out.sample_u64("node_filefd_allocated", &[], parse_u64(PATH, fields[0])?);
        out.family(
            "node_filefd_maximum",
            "File descriptor statistics: maximum.",
            MetricType::Gauge,
        );
        out.sample_u64("node_filefd_maximum", &[], parse_u64(PATH, fields[2])?);
        Ok(())
    }
}
