//! `cpu`: /proc/stat's per-CPU lines.

use std::time::Instant;

use super::{parse_u64, read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

const PATH: &str = "/proc/stat";
const MODES: [&str; 8] = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"];

pub struct Cpu {
    ticks_per_second: f64,
}

impl Cpu {
    pub fn new() -> Cpu {
        Cpu {
            ticks_per_second: clock_ticks().unwrap_or(100) as f64,
        }
    }
}

impl Default for Cpu {
    fn default() -> Self {
        Cpu::new()
    }
}

/// USER_HZ, the unit of /proc/stat, from the aux vector the kernel gave
/// this process (AT_CLKTCK); reading it there needs no libc call.
fn clock_ticks() -> Option<u64> {
    const AT_CLKTCK: u64 = 17;
    let auxv = std::fs::read("/proc/self/auxv").ok()?;
    let word = std::mem::size_of::<usize>();
    let read = |chunk: &[u8]| -> u64 {
        let mut bytes = [0u8; 8];
        bytes[..word].copy_from_slice(chunk);
        u64::from_ne_bytes(bytes)
    };
    auxv.chunks_exact(2 * word)
        .map(|pair| (read(&pair[..word]), read(&pair[word..])))
        .find(|&(key, _)| key == AT_CLKTCK)
        .map(|(_, value)| value)
        .filter(|&hz| hz > 0)
}

impl Collector for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let mut buf = Vec::with_capacity(8192);
        let text = read_text(PATH, &mut buf)?;
        // (cpu number, the ten tick counters)
        let mut cpus: Vec<(&str, [u64; 10])> = Vec::with_capacity(16);
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("cpu") else {
                continue;
            };
            let mut fields = rest.split_ascii_whitespace();
            let id = fields.next().unwrap_or_default();
            // The first line, "cpu  ...", is the sum over all CPUs.
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) || rest.starts_with(' ') {
                continue;
            }
            let mut ticks = [0u64; 10];
            for (slot, word) in ticks.iter_mut().zip(fields) {
                *slot = parse_u64(PATH, word)?;
            }
            cpus.push((id, ticks));
        }
        if cpus.is_empty() {
            return Err(CollectError::parse(PATH, "no per-CPU lines"));
        }
        let hz = self.ticks_per_second;
        out.family(
            "node_cpu_seconds_total",
            "Seconds the CPUs spent in each mode.",
            MetricType::Counter,
        );
        for (id, ticks) in &cpus {
            for (mode, value) in MODES.iter().zip(ticks) {
                out.sample(
                    "node_cpu_seconds_total",
                    &[("cpu", id), ("mode", mode)],
                    *value as f64 / hz,
                );
            }
        }
        out.family(
            "node_cpu_guest_seconds_total",
            "Seconds the CPUs spent in guests (VMs) for each mode.",
            MetricType::Counter,
        );
        for (id, ticks) in &cpus {
            out.sample(
                "node_cpu_guest_seconds_total",
                &[("cpu", id), ("mode", "user")],
                ticks[8] as f64 / hz,
            );
            out.sample(
                "node_cpu_guest_seconds_total",
                &[("cpu", id), ("mode", "nice")],
                ticks[9] as f64 / hz,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clock_ticks_are_read_from_auxv() {
        // 100 on every architecture Debian and Ubuntu build servers for.
        assert_eq!(super::clock_ticks(), Some(100));
    }
}
