//! WAL file names as PostgreSQL makes them: segments
//! (`TTTTTTTTLLLLLLLLSSSSSSSS`, timeline, then the segment number split in
//! "log" and "seg" halves), `.partial` segments, timeline history files
//! (`TTTTTTTT.history`) and backup history files (`<segment>.XXXXXXXX.backup`).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalFileKind {
    Segment,
    Partial,
    History,
    Backup,
}

/// A checked WAL file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalName {
    pub name: String,
    pub kind: WalFileKind,
    pub timeline: u32,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

impl WalName {
    pub fn parse(name: &str) -> Option<WalName> {
        let kind = if is_hex(name, 24) {
            WalFileKind::Segment
        } else if name.len() == 32 && name.ends_with(".partial") && is_hex(&name[..24], 24) {
            WalFileKind::Partial
        } else if name.len() == 16 && name.ends_with(".history") && is_hex(&name[..8], 8) {
            WalFileKind::History
        } else if name.len() == 40
            && name.ends_with(".backup")
            && is_hex(&name[..24], 24)
            && &name[24..25] == "."
            && is_hex(&name[25..33], 8)
        {
            WalFileKind::Backup
        } else {
            return None;
        };
        let timeline = u32::from_str_radix(&name[..8], 16).ok()?;
        Some(WalName {
            name: name.to_string(),
            kind,
            timeline,
        })
    }

    /// `TTTTTTTT`: the key's timeline directory.
    pub fn timeline_hex(&self) -> &str {
        &self.name[..8]
    }
}

/// Segments per "log" id for a segment size (0x100000000 / size).
pub fn segments_per_id(segment_size: u64) -> u64 {
    if segment_size == 0 {
        return 256;
    }
    0x1_0000_0000 / segment_size
}

/// The absolute segment number of a 24-hex segment name.
pub fn segment_number(name: &str, segment_size: u64) -> Option<u64> {
    if !is_hex(name.get(..24)?, 24) {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some(log * segments_per_id(segment_size) + seg)
}

pub fn segment_name(timeline: u32, number: u64, segment_size: u64) -> String {
    let per = segments_per_id(segment_size);
    format!("{:08X}{:08X}{:08X}", timeline, number / per, number % per)
}

/// The segment after `name` on the same timeline.
pub fn next_segment(name: &str, segment_size: u64) -> Option<String> {
    let timeline = u32::from_str_radix(name.get(..8)?, 16).ok()?;
    Some(segment_name(
        timeline,
        segment_number(name, segment_size)? + 1,
        segment_size,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_and_refuses_the_rest() {
        assert_eq!(
            WalName::parse("000000010000000000000003").unwrap().kind,
            WalFileKind::Segment
        );
        assert_eq!(
            WalName::parse("000000020000000000000003.partial").unwrap().kind,
            WalFileKind::Partial
        );
        let history = WalName::parse("00000002.history").unwrap();
        assert_eq!((history.kind, history.timeline), (WalFileKind::History, 2));
        assert_eq!(
            WalName::parse("000000010000000000000002.00000028.backup").unwrap().kind,
            WalFileKind::Backup
        );
        for bad in [
            "",
            "../etc/passwd",
            "00000001000000000000000g",
            "000000010000000000000003x",
            "abc.history",
        ] {
            assert!(WalName::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn next_segment_wraps_by_segment_size() {
        let mib16 = 16 * 1024 * 1024;
        assert_eq!(
            next_segment("0000000100000000000000FF", mib16).unwrap(),
            "000000010000000100000000"
        );
        assert_eq!(
            next_segment("0000000100000000000000FF", 1024 * 1024).unwrap(),
            "000000010000000000000100"
        );
        assert_eq!(
            next_segment("000000010000000000000FFF", 1024 * 1024).unwrap(),
            "000000010000000100000000"
        );
    }
}
