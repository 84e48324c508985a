//! /proc/self/mountinfo, parsed: which mounts exist, and which lie below a
//! path (pod mounts under the kubelet dir, anything mounted inside /data).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// "major:minor" of the mounted filesystem.
    pub device: (u32, u32),
    pub fs_type: String,
    pub source: String,
}

/// Parses mountinfo(5) text. Lines that do not parse are skipped: the kernel
/// format is stable, and one odd line must not hide every other mount.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (before, after) = line.split_once(" - ")?;
    let fields: Vec<&str> = before.split(' ').collect();
    let (major, minor) = fields.get(2)?.split_once(':')?;
    let mount_point = unescape(fields.get(4)?);
    let mut after = after.split(' ');
    let fs_type = after.next()?.to_string();
    let source = unescape(after.next().unwrap_or(""));
    Some(MountEntry {
        mount_point: PathBuf::from(mount_point),
        device: (major.parse().ok()?, minor.parse().ok()?),
        fs_type,
        source,
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mount whose mount point is exactly `path` (the last one, if stacked).
pub fn mount_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// Mounts strictly below `path`, deepest first (the order to unmount them).
pub fn mounts_below<'a>(mounts: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    let mut below: Vec<&MountEntry> = mounts
        .iter()
        .filter(|m| m.mount_point != path && m.mount_point.starts_with(path))
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
    below.dedup_by(|a, b| a.mount_point == b.mount_point);
    below
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
60 22 8:16 / /data rw,noatime shared:30 - ext4 /dev/sdb rw
61 60 0:50 / /data/k3s/pods/a\\040b rw shared:31 - tmpfs tmpfs rw
62 60 0:51 / /data/k3s/pods/a\\040b/vol rw shared:32 - tmpfs tmpfs rw
63 22 0:52 / /database rw shared:33 - tmpfs tmpfs rw
";

    #[test]
    fn parses_and_unescapes() {
        let mounts = parse(SAMPLE);
        assert_eq!(mounts.len(), 5);
        let data = mount_at(&mounts, Path::new("/data")).unwrap();
        assert_eq!(data.device, (8, 16));
        assert_eq!(data.fs_type, "ext4");
        assert_eq!(data.source, "/dev/sdb");
        assert_eq!(mounts[2].mount_point, PathBuf::from("/data/k3s/pods/a b"));
    }

    #[test]
    fn below_is_deepest_first_and_not_prefix_siblings() {
        let mounts = parse(SAMPLE);
        let below: Vec<_> = mounts_below(&mounts, Path::new("/data"))
            .into_iter()
            .map(|m| m.mount_point.display().to_string())
            .collect();
        assert_eq!(below, ["/data/k3s/pods/a b/vol", "/data/k3s/pods/a b"]);
    }
}
