//! `uname`: what uname(2) returns, read from /proc/sys/kernel (the same
//! kernel strings, without a libc call).

use std::time::Instant;

use super::{read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

pub struct Uname;

fn kernel_string(name: &str, buf: &mut Vec<u8>) -> Result<String, CollectError> {
    let path = format!("/proc/sys/kernel/{name}");
    Ok(read_text(&path, buf)?.trim_end_matches('\n').to_string())
}

impl Collector for Uname {
    fn name(&self) -> &'static str {
        "uname"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let mut buf = Vec::with_capacity(256);
        let sysname = kernel_string("ostype", &mut buf)?;
        let nodename = kernel_string("hostname", &mut buf)?;
        let release = kernel_string("osrelease", &mut buf)?;
        let version = kernel_string("version", &mut buf)?;
        let domainname = kernel_string("domainname", &mut buf)?;
        // /proc/sys/kernel/arch appeared in Linux 6.1; before that the
        // build target is the best stand-in (a 64-bit agent on a 64-bit kernel).
        let machine = kernel_string("arch", &mut buf).unwrap_or_else(|_| std::env::consts::ARCH.to_string());
        out.family(
            "node_uname_info",
            "Labeled system information as provided by the uname system call.",
            MetricType::Gauge,
        );
        out.sample(
            "node_uname_info",
            &[
                ("domainname", &domainname),
                ("machine", &machine),
                ("nodename", &nodename),
                ("release", &release),
                ("sysname", &sysname),
                ("version", &version),
            ],
            1.0,
        );
        Ok(())
    }
}
