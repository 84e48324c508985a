//! Host collectors under node_exporter's (1.5) metric names, labels, types
//! and units, so that Node Exporter Full and the node-mixin alerts work
//! unchanged. Each reads /proc and /sys itself: one read per file into a
//! reused buffer, parsed in place, instead of procfs' allocating structs.

use std::io::Read;
use std::time::Instant;

use super::encode::Encoder;

mod cpu;
mod diskstats;
mod filefd;
pub mod filesystem;
mod loadavg;
mod meminfo;
mod netdev;
mod pressure;
mod stat;
mod textfile;
mod time;
mod uname;
mod vmstat;

pub use cpu::Cpu;
pub use diskstats::Diskstats;
pub use filefd::Filefd;
pub use filesystem::Filesystem;
pub use loadavg::Loadavg;
pub use meminfo::Meminfo;
pub use netdev::Netdev;
pub use pressure::Pressure;
pub use stat::Stat;
pub use textfile::Textfile;
pub use time::Time;
pub use uname::Uname;
pub use vmstat::Vmstat;

/// One node_exporter collector. `collect` runs on a blocking thread; the
/// scrape gives up on it at `deadline` (see `scrape`), so a collector that
/// can block for long (statfs on a stuck mount) must watch the deadline
/// itself to return what it has.
pub trait Collector: Send + Sync + 'static {
    /// The `collector` label of `node_scrape_collector_*`.
    fn name(&self) -> &'static str;
    fn collect(&self, out: &mut Encoder, deadline: Instant) -> Result<(), CollectError>;
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// The kernel does not provide this data (no PSI, say); reported as a
    /// failed collector, as node_exporter does, but not logged as a fault.
    #[error("no data: {0}")]
    NoData(String),
    /// Some of the data is missing (a stuck mount); what was collected is
    /// still exported.
    #[error("{0}")]
    Incomplete(String),
}

impl CollectError {
    pub(crate) fn parse(path: &str, message: impl Into<String>) -> CollectError {
        CollectError::Parse {
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// Reads a whole (small) file into `buf`, replacing its content.
pub(crate) fn read_into(path: &str, buf: &mut Vec<u8>) -> Result<(), CollectError> {
    buf.clear();
    std::fs::File::open(path)
        .and_then(|mut file| file.read_to_end(buf))
        .map(|_| ())
        .map_err(|source| CollectError::Read {
            path: path.to_string(),
            source,
        })
}

/// Reads a /proc or /sys text file; the kernel writes them in ASCII.
pub(crate) fn read_text<'b>(path: &str, buf: &'b mut Vec<u8>) -> Result<&'b str, CollectError> {
    read_into(path, buf)?;
    std::str::from_utf8(buf).map_err(|_| CollectError::parse(path, "not UTF-8"))
}

pub(crate) fn parse_u64(path: &str, word: &str) -> Result<u64, CollectError> {
    word.parse()
        .map_err(|_| CollectError::parse(path, format!("{word:?} is not a number")))
}

/// The node collectors in the order their families appear in a scrape.
pub fn default_collectors(settings: &super::MetricsSettings) -> Result<Vec<Box<dyn Collector>>, String> {
    let mut collectors: Vec<Box<dyn Collector>> = vec![
        Box::new(Cpu::new()),
        Box::new(Diskstats::new()),
        Box::new(Filefd),
        Box::new(Filesystem::new(
            &settings.filesystem_mount_points_exclude,
            &settings.filesystem_fs_types_exclude,
        )?),
        Box::new(Loadavg),
        Box::new(Meminfo),
        Box::new(Netdev::new()),
        Box::new(Pressure),
        Box::new(Stat),
        Box::new(Time::new()),
        Box::new(Uname::new()),
        Box::new(Vmstat),
    ];
    if !settings.textfile_dir.as_os_str().is_empty() {
        collectors.push(Box::new(Textfile::new(settings.textfile_dir.clone())));
    }
    Ok(collectors)
}
