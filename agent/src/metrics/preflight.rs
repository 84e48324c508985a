//! Who holds a TCP port, read from /proc/net/tcp{,6} and the processes'
//! open sockets, so that a taken `metrics.listen` port is reported with the
//! program holding it, and the start-up log names the users of the ports
//! these hosts fight over.

use std::fmt;

/// Ports with a conventional owner on these hosts.
pub const WELL_KNOWN: [(u16, &str); 4] = [
    (9100, "node_exporter"),
    (9101, "Traefik's metrics"),
    (9102, "platform-agent"),
    (10250, "the kubelet (K3s)"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {})", self.command, self.pid)
    }
}

pub fn conventional_owner(port: u16) -> Option<&'static str> {
    WELL_KNOWN.iter().find(|(p, _)| *p == port).map(|(_, who)| *who)
}

/// Socket inodes of TCP sockets listening on `port` (any address).
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_ascii_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if fields.len() < 10 || fields[3] != "0A" {
                continue;
            }
            let local_port = fields[1]
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
            if local_port == Some(port) {
                if let Ok(inode) = fields[9].parse() {
                    inodes.push(inode);
                }
            }
        }
    }
    inodes
}

/// Whether something listens on `port`, and which processes hold the
/// socket (only those whose file descriptors this user may read).
pub fn port_users(port: u16) -> (bool, Vec<Holder>) {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return (false, Vec::new());
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let mut holders = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return (true, holders);
    };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .map(|target| wanted.iter().any(|w| target.as_os_str() == w.as_str()))
                .unwrap_or(false)
        });
        if holds {
            let command = std::fs::read_to_string(entry.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            holders.push(Holder { pid, command });
        }
    }
    (true, holders)
}

/// "prometheus-node (pid 12)", or a note that the holder is not visible.
pub fn describe_users(port: u16) -> String {
    match port_users(port) {
        (false, _) => "free".into(),
        (true, holders) if holders.is_empty() => {
            "in use by a process this user cannot see (run as root to name it)".into()
        }
        (true, holders) => {
            let names: Vec<String> = holders.iter().map(Holder::to_string).collect();
            format!("in use by {}", names.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_process_holding_a_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (listening, holders) = port_users(port);
        assert!(listening);
        assert!(
            holders.iter().any(|h| h.pid == std::process::id()),
            "{holders:?} should include this test process"
        );
        drop(listener);
        assert!(!port_users(port).0, "closed port is free");
    }
}
