//! `diskstats`: /proc/diskstats for whole disks (partitions, loop and ram
//! devices excluded by node_exporter's default regex), plus `node_disk_info`
//! from udev's database.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use regex_lite::Regex;

use super::{parse_u64, read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

const PATH: &str = "/proc/diskstats";
/// node_exporter's `--collector.diskstats.device-exclude` default.
pub const DEVICE_EXCLUDE: &str = r"^(ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$";
/// /proc/diskstats counts in 512-byte sectors whatever the device's.
const SECTOR: f64 = 512.0;
const MS: f64 = 0.001;

/// (metric, help, field index after major/minor/name, scale, type)
const FIELDS: [(&str, &str, usize, f64, MetricType); 17] = [
    (
        "node_disk_reads_completed_total",
        "The total number of reads completed successfully.",
        0,
        1.0,
        MetricType::Counter,
    ),
    (
        "node_disk_reads_merged_total",
        "The total number of reads merged.",
        1,
        1.0,
        MetricType::Counter,
    ),
    (
        "node_disk_read_bytes_total",
        "The total number of bytes read successfully.",
        2,
        SECTOR,
        MetricType::Counter,
    ),
    (
        "node_disk_read_time_seconds_total",
        "The total number of seconds spent by all reads.",
        3,
        MS,
        MetricType::Counter,
    ),
    (
        "node_disk_writes_completed_total",
        "The total number of writes completed successfully.",
        4,
        1.0,
        MetricType::Counter,
    ),
    (
        "node_disk_writes_merged_total",
        "The number of writes merged.",
        5,
        1.0,
        MetricType::Counter,
    ),
    (
        "node_disk_written_bytes_total",
        "The total number of bytes written successfully.",
        6,
        SECTOR,
        MetricType::Counter,
    ),
    (
        "node_disk_write_time_seconds_total",
        "This is the total number of seconds spent by all writes.",
        7,
        MS,
        MetricType::Counter,
    ),
    (
        "node_disk_io_now",
        "The number of I/Os currently in progress.",
        8,
        1.0,
        MetricType::Gauge,
    ),
    (
        "node_disk_io_time_seconds_total",
        "Total seconds spent doing I/Os.",
        9,
        MS,
        MetricType::Counter,
    ),
    (
        "node_disk_io_time_weighted_seconds_total",
        "The weighted # of seconds spent doing I/Os.",
        10,
        MS,
        MetricType::Counter,
    ),
    (
        "node_disk_discards_completed_total",
        "The total number of discards completed successfully.",
        11,
        1.0,
        MetricType::Counter,
    ),
    (
        "node_disk_discards_merged_total",
        "The total number of discards merged.",
        12,
        1.0,
        MetricType::Counter,
    ),
    (
        "node_disk_discarded_sectors_total",
        "The total number of sectors discarded successfully.",
        13,
        1.0,
        MetricType::Counter,
    ),
    (
        "node_disk_discard_time_seconds_total",
        "This is the total number of seconds spent by all discards.",
        14,
        MS,
        MetricType::Counter,
    ),
    (
        "node_disk_flush_requests_total",
        "The total number of flush requests completed successfully",
        15,
        1.0,
        MetricType::Counter,
    ),
    (
        "node_disk_flush_requests_time_seconds_total",
        "This is the total number of seconds spent by all flush requests.",
        16,
        MS,
        MetricType::Counter,
    ),
];

pub struct Diskstats {
    exclude: Regex,
    /// Device names seen so far and whether the regex excludes them.
    verdicts: Mutex<HashMap<String, bool>>,
}

impl Diskstats {
    pub fn new() -> Diskstats {
        Diskstats {
            exclude: Regex::new(DEVICE_EXCLUDE).expect("constant regex"),
            verdicts: Mutex::new(HashMap::new()),
        }
    }
}

impl Default for Diskstats {
    fn default() -> Self {
        Diskstats::new()
    }
}

struct Disk<'a> {
    name: &'a str,
    major: &'a str,
    minor: &'a str,
    fields: [u64; 17],
    count: usize,
}

impl Collector for Diskstats {
    fn name(&self) -> &'static str {
        "diskstats"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let mut buf = Vec::with_capacity(4096);
        let text = read_text(PATH, &mut buf)?;
        let mut disks = Vec::new();
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        for line in text.lines() {
            let mut words = line.split_ascii_whitespace();
            let (Some(major), Some(minor), Some(name)) = (words.next(), words.next(), words.next()) else {
                continue;
            };
            let excluded = match verdicts.get(name) {
                Some(excluded) => *excluded,
                None => {
                    let excluded = self.exclude.is_match(name);
                    verdicts.insert(name.to_string(), excluded);
                    excluded
                }
            };
            if excluded {
                continue;
            }
            let mut disk = Disk {
                name,
                major,
                minor,
                fields: [0; 17],
                count: 0,
            };
            for (slot, word) in disk.fields.iter_mut().zip(words) {
                *slot = parse_u64(PATH, word)?;
                disk.count += 1;
            }
            disks.push(disk);
        }
        drop(verdicts);
        let mut udev_buf = Vec::with_capacity(2048);
        out.family(
            "node_disk_info",
            "Info of /sys/block/<block_device>.",
            MetricType::Gauge,
        );
        for disk in &disks {
            let props = udev_properties(disk.major, disk.minor, &mut udev_buf);
            let get = |key: &str| {
                props
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.as_str())
                    .unwrap_or("")
            };
            let serial = match get("ID_SERIAL_SHORT") {
                "" => get("SCSI_IDENT_SERIAL"),
                serial => serial,
            };
            out.sample(
                "node_disk_info",
                &[
                    ("device", disk.name),
                    ("major", disk.major),
                    ("minor", disk.minor),
                    ("model", get("ID_MODEL")),
                    ("path", get("ID_PATH")),
                    ("revision", get("ID_REVISION")),
                    ("serial", serial),
                    ("wwn", get("ID_WWN")),
                ],
                1.0,
            );
        }
        for (name, help, index, scale, kind) in FIELDS {
            // Older kernels write fewer fields (discards since 4.18, flushes since 5.5).
            if !disks.iter().any(|d| d.count > index) {
                continue;
            }
            out.family(name, help, kind);
            for disk in disks.iter().filter(|d| d.count > index) {
                let value = disk.fields[index];
                if scale == 1.0 {
                    out.sample_u64(name, &[("device", disk.name)], value);
                } else {
                    out.sample(name, &[("device", disk.name)], value as f64 * scale);
                }
            }
        }
        Ok(())
    }
}

/// The `E:KEY=value` lines of /run/udev/data/b<major>:<minor>; empty when
/// udev is not running (containers, this test machine).
fn udev_properties(major: &str, minor: &str, buf: &mut Vec<u8>) -> Vec<(String, String)> {
    let path = format!("/run/udev/data/b{major}:{minor}");
    let Ok(text) = read_text(&path, buf) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| line.strip_prefix("E:"))
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| {
            matches!(
                *k,
                "ID_PATH" | "ID_WWN" | "ID_MODEL" | "ID_SERIAL_SHORT" | "SCSI_IDENT_SERIAL" | "ID_REVISION"
            )
        })
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_exclude_drops_partitions_and_virtual_devices() {
        let exclude = regex_lite::Regex::new(super::DEVICE_EXCLUDE).unwrap();
        for excluded in ["sda1", "vda2", "nvme0n1p1", "loop0", "ram3", "xvdb1"] {
            assert!(exclude.is_match(excluded), "{excluded}");
        }
        for kept in ["sda", "vda", "nvme0n1", "dm-0", "md0", "zram0"] {
            assert!(!exclude.is_match(kept), "{kept}");
        }
    }
}
