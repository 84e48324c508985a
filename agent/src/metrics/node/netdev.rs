//! `netdev`: per-interface counters, from one rtnetlink dump (as
//! node_exporter 1.5 does by default), or /proc/net/dev where netlink is
//! refused. The values are node_exporter's "legacy" ones, which are also
//! what /proc/net/dev sums up (e.g. `receive_drop` = dropped + missed).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Instant;

use nix::sys::socket::{recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};

use super::{parse_u64, read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

const PROC_PATH: &str = "/proc/net/dev";

/// Exported statistics, in output order; `receive_nohandler` only comes
/// from netlink.
const STATS: [&str; 17] = [
    "receive_bytes",
    "receive_compressed",
    "receive_drop",
    "receive_errs",
    "receive_fifo",
    "receive_frame",
    "receive_multicast",
    "receive_nohandler",
    "receive_packets",
    "transmit_bytes",
    "transmit_carrier",
    "transmit_colls",
    "transmit_compressed",
    "transmit_drop",
    "transmit_errs",
    "transmit_fifo",
    "transmit_packets",
];

type Values = [Option<u64>; 17];

/// The rtnetlink socket and its receive buffer, kept between scrapes.
pub struct Netdev {
    netlink: Mutex<Option<Netlink>>,
}

struct Netlink {
    fd: OwnedFd,
    buf: Vec<u8>,
    seq: u32,
}

impl Netdev {
    pub fn new() -> Netdev {
        Netdev {
            netlink: Mutex::new(None),
        }
    }

    fn links(&self) -> Result<Vec<(String, Values)>, CollectError> {
        let mut netlink = self.netlink.lock().unwrap_or_else(|e| e.into_inner());
        if netlink.is_none() {
            *netlink = Some(Netlink::open()?);
        }
        let result = netlink.as_mut().map(Netlink::dump).unwrap_or_else(|| Ok(Vec::new()));
        if result.is_err() {
            // Whatever state the socket is in, the next scrape starts afresh.
            *netlink = None;
        }
        result
    }
}

impl Default for Netdev {
    fn default() -> Self {
        Netdev::new()
    }
}

impl Collector for Netdev {
    fn name(&self) -> &'static str {
        "netdev"
    }

    fn collect(&self, out: &mut Encoder, _deadline: Instant) -> Result<(), CollectError> {
        let devices = match self.links() {
            Ok(devices) => devices,
            Err(_) => proc_net_dev()?,
        };
        let mut name = String::with_capacity(64);
        let mut help = String::with_capacity(64);
        for (i, stat) in STATS.iter().enumerate() {
            if !devices.iter().any(|(_, values)| values[i].is_some()) {
                continue;
            }
            name.clear();
            name.push_str("node_network_");
            name.push_str(stat);
            name.push_str("_total");
            help.clear();
            help.push_str("Network device statistic ");
            help.push_str(stat);
            help.push('.');
            out.family(&name, &help, MetricType::Counter);
            for (device, values) in &devices {
                if let Some(value) = values[i] {
                    out.sample_u64(&name, &[("device", device)], value);
                }
            }
        }
        Ok(())
    }
}

/// Maps `struct rtnl_link_stats64` (u64 fields in kernel order) to STATS.
fn from_stats64(s: &[u64]) -> Values {
    let get = |i: usize| s.get(i).copied();
    let sum = |fields: &[usize]| fields.iter().map(|&i| get(i)).sum::<Option<u64>>();
    [
        get(2),                 // rx_bytes
        get(21),                // rx_compressed
        sum(&[6, 15]),          // rx_dropped + rx_missed_errors
        get(4),                 // rx_errors
        get(14),                // rx_fifo_errors
        sum(&[13, 10, 11, 12]), // rx_frame + rx_length + rx_over + rx_crc errors
        get(8),                 // multicast
        get(23),                // rx_nohandler
        get(0),                 // rx_packets
        get(3),                 // tx_bytes
        sum(&[17, 16, 19, 20]), // tx_carrier + aborted + heartbeat + window errors
        get(9),                 // collisions
        get(22),                // tx_compressed
        get(7),                 // tx_dropped
        get(5),                 // tx_errors
        get(18),                // tx_fifo_errors
        get(1),                 // tx_packets
    ]
}

fn netlink_error(err: nix::Error) -> CollectError {
    CollectError::Read {
        path: "rtnetlink".into(),
        source: std::io::Error::from(err),
    }
}

impl Netlink {
    fn open() -> Result<Netlink, CollectError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(netlink_error)?;
        Ok(Netlink {
            fd,
            buf: vec![0u8; 64 * 1024],
            seq: 0,
        })
    }

    /// One RTM_GETLINK dump: name and IFLA_STATS64 of every interface.
    fn dump(&mut self) -> Result<Vec<(String, Values)>, CollectError> {
        const NLMSG_ERROR: u16 = 2;
        const NLMSG_DONE: u16 = 3;
        const RTM_NEWLINK: u16 = 16;
        const RTM_GETLINK: u16 = 18;
        const NLM_F_REQUEST: u16 = 1;
        const NLM_F_DUMP: u16 = 0x300;
        const HEADER: usize = 16;

        self.seq = self.seq.wrapping_add(1);
        // nlmsghdr followed by an all-zero ifinfomsg (any family, any device).
        let mut request = [0u8; HEADER + 16];
        request[0..4].copy_from_slice(&((HEADER + 16) as u32).to_ne_bytes());
        request[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
        request[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        request[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        let fd = self.fd.as_raw_fd();
        sendto(fd, &request, &NetlinkAddr::new(0, 0), MsgFlags::empty()).map_err(netlink_error)?;

        let mut links = Vec::new();
        let buf = &mut self.buf;
        let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
        let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let malformed = || CollectError::parse("rtnetlink", "malformed message");
        loop {
            let n = recv(fd, buf, MsgFlags::empty()).map_err(netlink_error)?;
            if n == 0 {
                return Err(malformed());
            }
            let mut at = 0;
            while at + HEADER <= n {
                let len = u32_at(buf, at) as usize;
                if len < HEADER || at + len > n {
                    return Err(malformed());
                }
                // Replies to an earlier, abandoned request are skipped.
                if u32_at(buf, at + 8) == self.seq {
                    match u16_at(buf, at + 4) {
                        NLMSG_DONE => return Ok(links),
                        NLMSG_ERROR => {
                            let errno = if len >= HEADER + 4 {
                                u32_at(buf, at + HEADER) as i32
                            } else {
                                0
                            };
                            return Err(CollectError::Read {
                                path: "rtnetlink".into(),
                                source: std::io::Error::from_raw_os_error(-errno),
                            });
                        }
                        RTM_NEWLINK => {
                            if let Some(link) = parse_link(&buf[at + HEADER..at + len]) {
                                links.push(link);
                            }
                        }
                        _ => {}
                    }
                }
                at += (len + 3) & !3;
            }
        }
    }
}

fn parse_link(msg: &[u8]) -> Option<(String, Values)> {
    const IFINFOMSG: usize = 16;
    const IFLA_IFNAME: u16 = 3;
    const IFLA_STATS64: u16 = 23;
    let mut at = IFINFOMSG;
    let (mut name, mut stats) = (None, None);
    while at + 4 <= msg.len() {
        let len = u16::from_ne_bytes([msg[at], msg[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]) & 0x3fff;
        if len < 4 || at + len > msg.len() {
            break;
        }
        let payload = &msg[at + 4..at + len];
        match kind {
            IFLA_IFNAME => {
                let end = payload.iter().position(|&b| b == 0).unwrap_or(payload.len());
                name = Some(String::from_utf8_lossy(&payload[..end]).into_owned());
            }
            IFLA_STATS64 => {
                let fields: Vec<u64> = payload
                    .chunks_exact(8)
                    .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
                    .collect();
                stats = Some(from_stats64(&fields));
            }
            _ => {}
        }
        at += (len + 3) & !3;
    }
    Some((name?, stats?))
}

fn proc_net_dev() -> Result<Vec<(String, Values)>, CollectError> {
    let mut buf = Vec::with_capacity(4096);
    let text = read_text(PROC_PATH, &mut buf)?;
    let mut devices = Vec::new();
    // Two header lines, then "  name: rx(8 numbers) tx(8 numbers)".
    for line in text.lines().skip(2) {
        let Some((name, numbers)) = line.split_once(':') else {
            continue;
        };
        let numbers: Vec<u64> = numbers
            .split_ascii_whitespace()
            .map(|w| parse_u64(PROC_PATH, w))
            .collect::<Result<_, _>>()?;
        if numbers.len() < 16 {
            return Err(CollectError::parse(
                PROC_PATH,
                format!("{name}: {} columns", numbers.len()),
            ));
        }
        let n = |i: usize| Some(numbers[i]);
        // rx: bytes packets errs drop fifo frame compressed multicast
        // tx: bytes packets errs drop fifo colls carrier compressed
        let values = [
            n(0),
            n(6),
            n(3),
            n(2),
            n(4),
            n(5),
            n(7),
            None,
            n(1),
            n(8),
            n(14),
            n(13),
            n(15),
            n(11),
            n(10),
            n(12),
            n(9),
        ];
        devices.push((name.trim().to_string(), values));
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_and_proc_net_dev_agree_on_loopback() {
        let netlink = Netlink::open().and_then(|mut n| n.dump()).expect("rtnetlink dump");
        let proc = proc_net_dev().unwrap();
        let lo_netlink = &netlink.iter().find(|(n, _)| n == "lo").expect("lo over netlink").1;
        let lo_proc = &proc.iter().find(|(n, _)| n == "lo").expect("lo in /proc/net/dev").1;
        assert!(lo_netlink[7].is_some(), "netlink gives receive_nohandler");
        // Counters only grow between the two reads: compare the ones that
        // stay still on an idle loopback, and check the rest are ordered.
        for i in 0..STATS.len() {
            if let (Some(a), Some(b)) = (lo_netlink[i], lo_proc[i]) {
                assert!(a <= b, "{}: netlink {a} > proc {b}", STATS[i]);
            }
        }
        assert_eq!(netlink.len(), proc.len(), "same interfaces");
    }
}
