//! `time`: the clock, the local time zone and the kernel's clocksources.

use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::{read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

const CLOCKSOURCES: &str = "/sys/devices/system/clocksource";
const LOCALTIME: &str = "/etc/localtime";

/// Clocksource devices with the sources they offer (fixed at boot), read
/// once; the current source and the zone are checked at every scrape.
pub struct Time {
    devices: OnceLock<Vec<(String, Vec<String>)>>,
    zone: Mutex<Option<(ZoneKey, Zone)>>,
}

/// Identifies the /etc/localtime content a cached zone came from.
type ZoneKey = (u64, u64, i64, i64);

/// Abbreviation, UTC offset, and the Unix time of the next transition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Zone {
    name: String,
    offset: i64,
    until: i64,
}

impl Time {
    pub fn new() -> Time {
        Time {
            devices: OnceLock::new(),
            zone: Mutex::new(None),
        }
    }

    fn devices(&self) -> &[(String, Vec<String>)] {
        self.devices.get_or_init(|| {
            let mut buf = Vec::with_capacity(256);
            let mut devices = Vec::new();
            for entry in std::fs::read_dir(CLOCKSOURCES).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(device) = name.strip_prefix("clocksource") else {
                    continue;
                };
                let path = format!("{CLOCKSOURCES}/{name}/available_clocksource");
                let available = read_text(&path, &mut buf)
                    .map(|t| t.split_ascii_whitespace().map(str::to_string).collect())
                    .unwrap_or_default();
                devices.push((device.to_string(), available));
            }
            devices.sort();
            devices
        })
    }

    /// The zone in force, re-read only when /etc/localtime changes or its
    /// next transition (a DST change) has passed.
    fn zone(&self, now: i64) -> Zone {
        use std::os::unix::fs::MetadataExt;
        let utc = || Zone {
            name: "UTC".into(),
            offset: 0,
            until: i64::MAX,
        };
        let Ok(meta) = std::fs::metadata(LOCALTIME) else {
            return utc();
        };
        let key = (meta.dev(), meta.ino(), meta.size() as i64, meta.mtime());
        let mut cache = self.zone.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached_key, zone)) = cache.as_ref() {
            if *cached_key == key && now < zone.until {
                return zone.clone();
            }
        }
        let zone = std::fs::read(LOCALTIME)
            .ok()
            .and_then(|tzif| local_zone(&tzif, now))
            .unwrap_or_else(utc);
        *cache = Some((key, zone.clone()));
        zone
    }
}

impl Default for Time {
    fn default() -> Self {
        Time::new()
    }
}

impl Collector for Time {
    fn name(&self) -> &'static str {
        "time"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| CollectError::NoData("the clock is before 1970".into()))?;
        let mut buf = Vec::with_capacity(256);
        let devices = self.devices();
        if !devices.is_empty() {
            out.family(
                "node_time_clocksource_available_info",
                "Available clocksources read from '/sys/devices/system/clocksource'.",
                MetricType::Gauge,
            );
            for (device, available) in devices {
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
            for (device, _) in devices {
                let path = format!("{CLOCKSOURCES}/clocksource{device}/current_clocksource");
                let current = read_text(&path, &mut buf)?.trim();
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
        let zone = self.zone(now.as_secs() as i64);
        out.family(
            "node_time_zone_offset_seconds",
            "System time zone offset in seconds.",
            MetricType::Gauge,
        );
        out.sample(
            "node_time_zone_offset_seconds",
            &[("time_zone", &zone.name)],
            zone.offset as f64,
        );
        Ok(())
    }
}

/// The abbreviation and UTC offset in force at `now` according to a TZif
/// file (RFC 8536): the local type of the last transition at or before
/// `now`. Debian's tzdata is built "fat", with transitions until 2037; past
/// the last one, the last type stays in force.
fn local_zone(tzif: &[u8], now: i64) -> Option<Zone> {
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
    let name = String::from_utf8_lossy(&data[abbr_at..abbr_end]).into_owned();
    let until = if count_before < time {
        transition(count_before)
    } else {
        i64::MAX
    };
    Some(Zone { name, offset, until })
}

#[cfg(test)]
mod tests {
    use super::local_zone;

    #[test]
    fn reads_zone_and_offset_from_tzif_files() {
        let Ok(berlin) = std::fs::read("/usr/share/zoneinfo/Europe/Berlin") else {
            panic!("tzdata is not installed (package tzdata)");
        };
        let zone = |tzif: &[u8], now| local_zone(tzif, now).map(|z| (z.name, z.offset, z.until));
        // 2024-01-15 and 2024-07-15, noon UTC; DST starts 2024-03-31 01:00
        // UTC and ends 2024-10-27 01:00 UTC.
        assert_eq!(zone(&berlin, 1_705_320_000), Some(("CET".into(), 3600, 1_711_846_800)));
        assert_eq!(zone(&berlin, 1_721_044_800), Some(("CEST".into(), 7200, 1_729_990_800)));
        let utc = std::fs::read("/usr/share/zoneinfo/Etc/UTC").unwrap();
        assert_eq!(zone(&utc, 1_705_320_000), Some(("UTC".into(), 0, i64::MAX)));
        assert_eq!(local_zone(b"not a tzif file", 0), None);
    }
}
