//! `time`: the clock, the local time zone and the kernel's clocksources.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::{read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

const CLOCKSOURCES: &str = "/sys/devices/system/clocksource";

pub struct Time;

impl Collector for Time {
    fn name(&self) -> &'static str {
        "time"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| CollectError::NoData("the clock is before 1970".into()))?;
        let mut buf = Vec::with_capacity(4096);
        let mut clocksources: Vec<(String, Vec<String>, String)> = Vec::new();
        if let Ok(entries) = std::fs::read_dir(CLOCKSOURCES) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(device) = name.strip_prefix("clocksource") else {
                    continue;
                };
                let device = device.to_string();
                let dir = format!("{CLOCKSOURCES}/{name}");
                let available: Vec<String> = read_text(&format!("{dir}/available_clocksource"), &mut buf)?
                    .split_ascii_whitespace()
                    .map(str::to_string)
                    .collect();
                let current = read_text(&format!("{dir}/current_clocksource"), &mut buf)?
                    .trim()
                    .to_string();
                clocksources.push((device, available, current));
            }
        }
        clocksources.sort();
        if !clocksources.is_empty() {
            out.family(
                "node_time_clocksource_available_info",
                "Available clocksources read from '/sys/devices/system/clocksource'.",
                MetricType::Gauge,
            );
            for (device, available, _) in &clocksources {
                for source in available {
                    out.sample(
                        "node_time_clocksource_available_info",
                        &[("clocksource", source), ("device", device)],
                        1.0,
                    );
                }
            }
            out.family(
                "node_time_clocksource_current_info",
                "Current clocksource read from '/sys/devices/system/clocksource'.",
                MetricType::Gauge,
            );
            for (device, _, current) in &clocksources {
                out.sample(
                    "node_time_clocksource_current_info",
                    &[("clocksource", current), ("device", device)],
                    1.0,
                );
            }
        }
        out.single(
            "node_time_seconds",
            "System time in seconds since epoch (1970).",
            MetricType::Gauge,
            now.as_secs_f64(),
        );
        let (zone, offset) = std::fs::read("/etc/localtime")
            .ok()
            .and_then(|tzif| local_zone(&tzif, now.as_secs() as i64))
            .unwrap_or_else(|| ("UTC".to_string(), 0));
        out.family(
            "node_time_zone_offset_seconds",
            "System time zone offset in seconds.",
            MetricType::Gauge,
        );
        out.sample("node_time_zone_offset_seconds", &[("time_zone", &zone)], offset as f64);
        Ok(())
    }
}

/// The abbreviation and UTC offset in force at `now` according to a TZif
/// file (RFC 8536): the local type of the last transition at or before
/// `now`. Debian's tzdata is built "fat", with transitions until 2037; past
/// the last one, the last type stays in force.
fn local_zone(tzif: &[u8], now: i64) -> Option<(String, i64)> {
    if tzif.get(..4)? != b"TZif" {
        return None;
    }
    let counts = |header: &[u8]| -> Option<[usize; 6]> {
        let mut counts = [0usize; 6];
        for (i, count) in counts.iter_mut().enumerate() {
            let at = 20 + 4 * i;
            *count = u32::from_be_bytes(header.get(at..at + 4)?.try_into().ok()?) as usize;
        }
        Some(counts)
    };
    let [isut, isstd, leap, time, types, chars] = counts(tzif)?;
    let v1_len = 44 + time * 5 + types * 6 + chars + leap * 8 + isstd + isut;
    // Version 2+ files repeat the data with 64-bit times after the v1 block.
    let (data, time_size, counts) = if tzif[4] >= b'2' && tzif.len() > v1_len + 44 {
        let v2 = &tzif[v1_len..];
        (v2, 8, counts(v2)?)
    } else {
        (tzif, 4, [isut, isstd, leap, time, types, chars])
    };
    let [_, _, _, time, types, chars] = counts;
    let times_at = 44;
    let indexes_at = times_at + time * time_size;
    let types_at = indexes_at + time;
    let chars_at = types_at + types * 6;
    if data.len() < chars_at + chars || types == 0 {
        return None;
    }
    let transition = |i: usize| -> i64 {
        let at = times_at + i * time_size;
        if time_size == 8 {
            i64::from_be_bytes(data[at..at + 8].try_into().unwrap_or_default())
        } else {
            i32::from_be_bytes(data[at..at + 4].try_into().unwrap_or_default()) as i64
        }
    };
    let count_before = (0..time).take_while(|&i| transition(i) <= now).count();
    let type_index = if count_before == 0 {
        0
    } else {
        data[indexes_at + count_before - 1] as usize
    };
    if type_index >= types {
        return None;
    }
    let ttinfo = &data[types_at + type_index * 6..types_at + type_index * 6 + 6];
    let offset = i32::from_be_bytes(ttinfo[..4].try_into().ok()?) as i64;
    let abbr_at = chars_at + ttinfo[5] as usize;
    let abbr_end = data[abbr_at..chars_at + chars].iter().position(|&b| b == 0)? + abbr_at;
    let abbr = String::from_utf8_lossy(&data[abbr_at..abbr_end]).into_owned();
    Some((abbr, offset))
}

#[cfg(test)]
mod tests {
    use super::local_zone;

    #[test]
    fn reads_zone_and_offset_from_tzif_files() {
        let Ok(berlin) = std::fs::read("/usr/share/zoneinfo/Europe/Berlin") else {
            panic!("tzdata is not installed (package tzdata)");
        };
        // 2024-01-15 and 2024-07-15, noon UTC.
        assert_eq!(local_zone(&berlin, 1_705_320_000), Some(("CET".into(), 3600)));
        assert_eq!(local_zone(&berlin, 1_721_044_800), Some(("CEST".into(), 7200)));
        let utc = std::fs::read("/usr/share/zoneinfo/Etc/UTC").unwrap();
        assert_eq!(local_zone(&utc, 1_705_320_000), Some(("UTC".into(), 0)));
        assert_eq!(local_zone(b"not a tzif file", 0), None);
    }
}
