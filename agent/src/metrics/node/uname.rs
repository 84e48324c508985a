//! `uname`: what uname(2) returns, read from /proc/sys/kernel (the same
//! kernel strings, without a libc call).

use std::time::Instant;

use super::{read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

/// The strings fixed for the life of the running kernel, read once; the
/// host and domain names can change and are read at every scrape.
pub struct Uname {
    fixed: std::sync::OnceLock<Option<(String, String, String, String)>>,
}

impl Uname {
    pub fn new() -> Uname {
        Uname {
            fixed: std::sync::OnceLock::new(),
        }
    }
}

impl Default for Uname {
    fn default() -> Self {
        Uname::new()
    }
}

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
        let fixed = self.fixed.get_or_init(|| {
            let mut buf = Vec::with_capacity(256);
            Some((
                kernel_string("ostype", &mut buf).ok()?,
                kernel_string("osrelease", &mut buf).ok()?,
                kernel_string("version", &mut buf).ok()?,
                // /proc/sys/kernel/arch appeared in Linux 6.1; before that the
                // build target is the best stand-in (a 64-bit agent on a 64-bit kernel).
                kernel_string("arch", &mut buf).unwrap_or_else(|_| std::env::consts::ARCH.to_string()),
            ))
        });
        let Some((sysname, release, version, machine)) = fixed else {
            return Err(CollectError::NoData("/proc/sys/kernel is not readable".into()));
        };
        let nodename = kernel_string("hostname", &mut buf)?;
        let domainname = kernel_string("domainname", &mut buf)?;
        out.family(
            "node_uname_info",
            "Labeled system information as provided by the uname system call.",
            MetricType::Gauge,
        );
        out.sample(
            "node_uname_info",
            &[
                ("domainname", &domainname),
                ("machine", machine),
                ("nodename", &nodename),
                ("release", release),
                ("sysname", sysname),
                ("version", version),
            ],
            1.0,
        );
        Ok(())
    }
}
