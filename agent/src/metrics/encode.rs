//! Writes the Prometheus text exposition format (0.0.4) or OpenMetrics 1.0
//! straight into one byte buffer.
//!
//! prometheus-client 0.23 only writes OpenMetrics, whose counter families
//! are named without `_total`; node_exporter's dashboards, `promtool check
//! metrics` and Prometheus' text parser expect the 0.0.4 format, byte for
//! byte the naming node_exporter uses. So the exporter has this small
//! encoder instead, which also keeps a scrape to one growing `Vec<u8>`
//! without per-sample allocation.

use std::io::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`
    Text,
    /// `application/openmetrics-text; version=1.0.0`
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Untyped,
}

impl MetricType {
    pub fn parse(word: &str) -> Option<MetricType> {
        match word {
            "counter" => Some(MetricType::Counter),
            "gauge" => Some(MetricType::Gauge),
            "untyped" | "unknown" => Some(MetricType::Untyped),
            _ => None,
        }
    }
}

pub struct Encoder {
    buf: Vec<u8>,
    format: Format,
}

impl Encoder {
    pub fn new(format: Format) -> Encoder {
        Encoder::with_buffer(Vec::with_capacity(4096), format)
    }

    pub fn with_buffer(mut buf: Vec<u8>, format: Format) -> Encoder {
        buf.clear();
        Encoder { buf, format }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    pub fn append(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Starts a family: its HELP and TYPE lines. Every sample of the family
    /// must follow before the next family starts.
    pub fn family(&mut self, name: &str, help: &str, kind: MetricType) {
        let (meta_name, type_word) = match (self.format, kind) {
            // OpenMetrics names the counter family without the suffix its
            // samples carry.
            (Format::OpenMetrics, MetricType::Counter) => (name.strip_suffix("_total").unwrap_or(name), "counter"),
            (Format::OpenMetrics, MetricType::Untyped) => (name, "unknown"),
            (_, MetricType::Counter) => (name, "counter"),
            (_, MetricType::Gauge) => (name, "gauge"),
            (Format::Text, MetricType::Untyped) => (name, "untyped"),
        };
        self.buf.extend_from_slice(b"# HELP ");
        self.buf.extend_from_slice(meta_name.as_bytes());
        self.buf.push(b' ');
        escape_into(&mut self.buf, help, self.format == Format::OpenMetrics);
        self.buf.extend_from_slice(b"\n# TYPE ");
        self.buf.extend_from_slice(meta_name.as_bytes());
        self.buf.push(b' ');
        self.buf.extend_from_slice(type_word.as_bytes());
        self.buf.push(b'\n');
    }

    /// A family with a TYPE word passed through as it came (summaries and
    /// histograms from textfiles).
    pub fn family_raw(&mut self, name: &str, help: &str, type_word: &str) {
        self.buf.extend_from_slice(b"# HELP ");
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(b' ');
        escape_into(&mut self.buf, help, self.format == Format::OpenMetrics);
        self.buf.extend_from_slice(b"\n# TYPE ");
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(b' ');
        self.buf.extend_from_slice(type_word.as_bytes());
        self.buf.push(b'\n');
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.sample_head(name, labels);
        write_f64(&mut self.buf, value);
        self.buf.push(b'\n');
    }

    pub fn sample_u64(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.sample_head(name, labels);
        write_u64(&mut self.buf, value);
        self.buf.push(b'\n');
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, help: &str, kind: MetricType, value: f64) {
        self.family(name, help, kind);
        self.sample(name, &[], value);
    }

    fn sample_head(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.buf.extend_from_slice(name.as_bytes());
        if !labels.is_empty() {
            self.buf.push(b'{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.buf.push(b',');
                }
                self.buf.extend_from_slice(key.as_bytes());
                self.buf.extend_from_slice(b"=\"");
                escape_into(&mut self.buf, value, true);
                self.buf.push(b'"');
            }
            self.buf.push(b'}');
        }
        self.buf.push(b' ');
    }

    /// Closes the exposition (OpenMetrics needs its `# EOF`).
    pub fn finish(&mut self) {
        if self.format == Format::OpenMetrics {
            self.buf.extend_from_slice(b"# EOF\n");
        }
    }
}

/// Escapes `\` and newline, and `"` where the format asks for it (label
/// values always, HELP text only in OpenMetrics).
fn escape_into(buf: &mut Vec<u8>, text: &str, quote: bool) {
    let bytes = text.as_bytes();
    if !bytes.iter().any(|&b| b == b'\\' || b == b'\n' || (quote && b == b'"')) {
        buf.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        match b {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'"' if quote => buf.extend_from_slice(b"\\\""),
            other => buf.push(other),
        }
    }
}

pub fn write_u64(buf: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// Integral values as integers (most samples are counters); others in
/// Rust's shortest round-trip form, which Prometheus' float parser reads.
pub fn write_f64(buf: &mut Vec<u8>, value: f64) {
    if value.is_nan() {
        buf.extend_from_slice(b"NaN");
    } else if value.is_infinite() {
        buf.extend_from_slice(if value > 0.0 { b"+Inf" } else { b"-Inf" });
    } else if value.fract() == 0.0 && value.abs() < 9.0e15 {
        if value < 0.0 {
            buf.push(b'-');
        }
        write_u64(buf, value.abs() as u64);
    } else {
        let _ = write!(buf, "{value:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(format: Format, f: impl FnOnce(&mut Encoder)) -> String {
        let mut enc = Encoder::new(format);
        f(&mut enc);
        enc.finish();
        String::from_utf8(enc.into_inner()).unwrap()
    }

    #[test]
    fn text_format_keeps_counter_suffix_in_type_line() {
        let out = text(Format::Text, |e| {
            e.family("node_forks_total", "Total number of forks.", MetricType::Counter);
            e.sample_u64("node_forks_total", &[], 42);
        });
        assert_eq!(
            out,
            "# HELP node_forks_total Total number of forks.\n# TYPE node_forks_total counter\nnode_forks_total 42\n"
        );
    }

    #[test]
    fn openmetrics_names_counter_family_without_total_and_ends_with_eof() {
        let out = text(Format::OpenMetrics, |e| {
            e.family("node_forks_total", "Forks.", MetricType::Counter);
            e.sample_u64("node_forks_total", &[], 1);
            e.single("node_vmstat_pgfault", "x", MetricType::Untyped, 2.0);
        });
        assert!(out.contains("# TYPE node_forks counter\nnode_forks_total 1\n"), "{out}");
        assert!(out.contains("# TYPE node_vmstat_pgfault unknown\n"), "{out}");
        assert!(out.ends_with("# EOF\n"), "{out}");
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let out = text(Format::Text, |e| {
            e.family("m", "a \\ b\nc \"q\"", MetricType::Gauge);
            e.sample("m", &[("l", "x\"y\\z\nw")], 1.0);
        });
        assert_eq!(
            out,
            "# HELP m a \\\\ b\\nc \"q\"\n# TYPE m gauge\nm{l=\"x\\\"y\\\\z\\nw\"} 1\n"
        );
    }

    #[test]
    fn floats_round_trip() {
        for value in [
            0.0,
            1.0,
            -3.0,
            0.25,
            1.795491626e9,
            738.83,
            1e-7,
            1e300,
            123456789012345678.0,
        ] {
            let mut buf = Vec::new();
            write_f64(&mut buf, value);
            let printed = String::from_utf8(buf).unwrap();
            assert_eq!(printed.parse::<f64>().unwrap(), value, "{printed}");
        }
        let mut buf = Vec::new();
        write_f64(&mut buf, f64::NAN);
        write_f64(&mut buf, f64::INFINITY);
        write_f64(&mut buf, f64::NEG_INFINITY);
        assert_eq!(buf, b"NaN+Inf-Inf");
    }
}
