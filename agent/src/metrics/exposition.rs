//! A parser for the Prometheus text exposition format (0.0.4), strict enough
//! to refuse what Prometheus' own parser refuses. The textfile collector
//! reads operators' `*.prom` files with it, and the tests read scrapes of
//! this agent and of node_exporter with it.

use super::encode::MetricType;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub help: Option<String>,
    /// The word of the TYPE line ("counter", "gauge", "untyped", "summary",
    /// "histogram"); "untyped" when there is none.
    pub kind: String,
    pub samples: Vec<Sample>,
}

impl Family {
    pub fn metric_type(&self) -> Option<MetricType> {
        MetricType::parse(&self.kind)
    }

    /// The sorted, deduplicated label names used by the family's samples.
    pub fn label_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .samples
            .iter()
            .flat_map(|s| s.labels.iter().map(|(k, _)| k.clone()))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// Parses a whole exposition. Families come back in the order they start;
/// a family's samples must be contiguous, as the format requires.
pub fn parse(text: &str) -> Result<Vec<Family>, ParseError> {
    let mut families: Vec<Family> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let fail = |message: String| ParseError { line: line_no, message };
        let line = line.trim_start();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            let keyword = words.next().unwrap_or_default();
            if keyword != "HELP" && keyword != "TYPE" {
                continue;
            }
            let name = words.next().unwrap_or_default();
            let rest = words.next().unwrap_or_default();
            if !is_metric_name(name) {
                return Err(fail(format!("{keyword} line names an invalid metric {name:?}")));
            }
            let family = current_family(&mut families, &mut seen, name).map_err(&fail)?;
            if keyword == "HELP" {
                if family.help.is_some() {
                    return Err(fail(format!("second HELP line for {name}")));
                }
                family.help = Some(unescape_help(rest));
            } else {
                let word = rest.trim();
                if !matches!(word, "counter" | "gauge" | "untyped" | "summary" | "histogram") {
                    return Err(fail(format!("unknown metric type {word:?}")));
                }
                if family.kind != "untyped" || !family.samples.is_empty() {
                    return Err(fail(format!("TYPE line for {name} after its samples or a second TYPE")));
                }
                family.kind = word.to_string();
            }
            continue;
        }
        let sample = parse_sample(line).map_err(&fail)?;
        let family_name = family_of(&families, &sample.name);
        let family = current_family(&mut families, &mut seen, &family_name).map_err(&fail)?;
        if family
            .samples
            .iter()
            .any(|s| s.name == sample.name && s.labels == sample.labels)
        {
            return Err(fail(format!("duplicate sample {}{:?}", sample.name, sample.labels)));
        }
        family.samples.push(sample);
    }
    Ok(families)
}

/// The family a sample belongs to: the current one when the name matches it
/// (with summary and histogram suffixes), else one of its own.
fn family_of(families: &[Family], sample_name: &str) -> String {
    if let Some(last) = families.last() {
        if last.name == sample_name {
            return last.name.clone();
        }
        if matches!(last.kind.as_str(), "summary" | "histogram") {
            for suffix in ["_sum", "_count", "_bucket"] {
                if sample_name.strip_suffix(suffix) == Some(last.name.as_str()) {
                    return last.name.clone();
                }
            }
        }
    }
    sample_name.to_string()
}

fn current_family<'a>(
    families: &'a mut Vec<Family>,
    seen: &mut std::collections::HashSet<String>,
    name: &str,
) -> Result<&'a mut Family, String> {
    let is_current = families.last().is_some_and(|f| f.name == name);
    if !is_current {
        if !seen.insert(name.to_string()) {
            return Err(format!("samples of {name} are not contiguous"));
        }
        families.push(Family {
            name: name.to_string(),
            help: None,
            kind: "untyped".into(),
            samples: Vec::new(),
        });
    }
    Ok(families.last_mut().expect("just ensured"))
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after)?;
        labels = parsed;
        rest = remaining;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or_else(|| format!("{name}: no value"))?;
    let value = parse_value(value).ok_or_else(|| format!("{name}: invalid value {value:?}"))?;
    let timestamp_ms = match fields.next() {
        None => None,
        Some(ts) => Some(
            ts.parse::<i64>()
                .map_err(|_| format!("{name}: invalid timestamp {ts:?}"))?,
        ),
    };
    if let Some(extra) = fields.next() {
        return Err(format!("{name}: unexpected {extra:?} after the value"));
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
        timestamp_ms,
    })
}

type Labels = Vec<(String, String)>;

fn parse_labels(mut text: &str) -> Result<(Labels, &str), String> {
    let mut labels: Labels = Vec::new();
    loop {
        text = text.trim_start();
        if let Some(rest) = text.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = text.find('=').ok_or("label without '='")?;
        let key = text[..eq].trim();
        if !is_label_name(key) {
            return Err(format!("invalid label name {key:?}"));
        }
        if labels.iter().any(|(k, _)| k == key) {
            return Err(format!("label {key} given twice"));
        }
        text = text[eq + 1..].trim_start();
        let body = text
            .strip_prefix('"')
            .ok_or_else(|| format!("label {key}: value not quoted"))?;
        let mut value = String::new();
        let mut chars = body.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {key}: unterminated value")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    other => return Err(format!("label {key}: bad escape {other:?}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((key.to_string(), value));
        text = body[end + 1..].trim_start();
        if let Some(rest) = text.strip_prefix(',') {
            text = rest;
        } else if !text.starts_with('}') {
            return Err("expected ',' or '}' after a label".into());
        }
    }
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        // Rust accepts "inf"/"infinity" spelled other ways; Prometheus does not.
        other if other.chars().any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') => None,
        other => other.parse().ok(),
    }
}

fn unescape_help(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('\\') => out.push('\\'),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

pub fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_families_labels_and_escapes() {
        let text = "# HELP a_total Things \\\\ done.\n# TYPE a_total counter\n\
                    a_total{x=\"1\",y=\"q\\\"\\n\"} 3\na_total{x=\"2\"} 4.5 1700000000000\n\
                    # a comment\nb 1e3\n";
        let families = parse(text).unwrap();
        assert_eq!(families.len(), 2);
        assert_eq!(families[0].kind, "counter");
        assert_eq!(families[0].help.as_deref(), Some("Things \\ done."));
        assert_eq!(families[0].samples[0].labels[1].1, "q\"\n");
        assert_eq!(families[0].samples[1].timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(families[0].label_names(), vec!["x", "y"]);
        assert_eq!(families[1].kind, "untyped");
        assert_eq!(families[1].samples[0].value, 1000.0);
    }

    #[test]
    fn histogram_suffixes_belong_to_their_family() {
        let text = "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n";
        let families = parse(text).unwrap();
        assert_eq!(families.len(), 1);
        assert_eq!(families[0].samples.len(), 4);
    }

    #[test]
    fn refuses_what_prometheus_refuses() {
        for bad in [
            "a{x=\"1\" 2\n",
            "a{x=1} 2\n",
            "1a 2\n",
            "a two\n",
            "a 1\nb 1\na 2\n",
            "a 1\na 2\n",
            "# TYPE a counter\n# TYPE a gauge\n",
            "# TYPE a summ\n",
            "a{x=\"1\",x=\"2\"} 1\n",
            "a 1 2 3\n",
            "a inf\n",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
