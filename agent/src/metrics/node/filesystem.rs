//! `filesystem`: statfs(2) of every mount in the mount table that
//! node_exporter's default excludes keep.
//!
//! A statfs on a dead NFS server or a wedged FUSE daemon can block for
//! minutes, in the kernel, uninterruptibly. So:
//! - local mounts are stat'ed on a thread of their own while the collector
//!   waits only until its deadline; a mount whose statfs is still running
//!   then is reported with `node_filesystem_device_error 1` and the
//!   collector as failed, and is skipped (not stat'ed again) until that call
//!   returns, so stuck calls never pile up threads;
//! - network filesystems are never stat'ed on the scrape's path at all: a
//!   background thread refreshes them (at most one call in flight per
//!   mount) and the scrape reports the last result.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use regex_lite::Regex;

use super::{read_text, CollectError, Collector};
use crate::metrics::encode::{Encoder, MetricType};

/// node_exporter 1.5's `--collector.filesystem.mount-points-exclude` (the
/// upstream default; Debian's build also drops /run, /mnt and /media).
pub const MOUNT_POINTS_EXCLUDE: &str =
    "^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)";
/// node_exporter's `--collector.filesystem.fs-types-exclude` (1.5's list plus
/// erofs, which later releases added).
pub const FS_TYPES_EXCLUDE: &str = "^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs|iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs|erofs|sysfs|tracefs)$";

/// Filesystems whose statfs waits on a server.
const NETWORK_FS_TYPES: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ncpfs",
    "ceph",
    "glusterfs",
    "9p",
    "afs",
    "lustre",
    "gpfs",
    "davfs",
    "fuse.sshfs",
    "fuse.s3fs",
    "fuse.rclone",
    "fuse.glusterfs",
    "fuse.gcsfuse",
    "fuse.juicefs",
    "fuse.davfs2",
];

/// How old a network filesystem's figures may get before the next scrape
/// asks for a fresh statfs in the background.
const NETWORK_REFRESH: Duration = Duration::from_secs(30);

/// How long one local statfs may take before the next mounts are handed to
/// a fresh thread (a healthy one takes microseconds).
const PATIENCE: Duration = Duration::from_millis(100);

/// Time kept back from the collector's deadline to encode what was stat'ed.
const ENCODE_RESERVE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    pub size: u64,
    pub free: u64,
    pub avail: u64,
    pub files: u64,
    pub files_free: u64,
}

/// The statfs call; replaceable so tests can make one mount hang.
pub type StatFn = Arc<dyn Fn(&str) -> std::io::Result<FsStats> + Send + Sync>;

/// statfs(2), counted as node_exporter counts (in f_bsize units).
pub fn statfs(path: &str) -> std::io::Result<FsStats> {
    let st = nix::sys::statfs::statfs(path).map_err(std::io::Error::from)?;
    let bsize = st.block_size().max(0) as u64;
    Ok(FsStats {
        size: st.blocks().saturating_mul(bsize),
        free: st.blocks_free().saturating_mul(bsize),
        avail: st.blocks_available().saturating_mul(bsize),
        files: st.files(),
        files_free: st.files_free(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub device: String,
    pub mountpoint: String,
    pub fstype: String,
    pub readonly: bool,
}

#[derive(Debug, Clone)]
enum Outcome {
    Stats(FsStats),
    Error,
    Stuck,
    /// Not stat'ed this time (behind a stuck mount, or a network mount whose
    /// first background statfs has not finished): no series.
    Missing,
}

#[derive(Default)]
struct NetworkEntry {
    last: Option<Result<FsStats, ()>>,
    refreshed: Option<Instant>,
    in_flight_since: Option<Instant>,
}

pub struct Filesystem {
    mount_points_exclude: Regex,
    fs_types_exclude: Regex,
    mountinfo: Vec<PathBuf>,
    stat: StatFn,
    /// Mount points with a statfs call running right now.
    in_flight: Arc<Mutex<HashSet<String>>>,
    network: Arc<Mutex<HashMap<String, NetworkEntry>>>,
    /// The thread that stats local mounts, kept between scrapes.
    worker: Mutex<Option<StatWorker>>,
    /// The last mount table read and the mounts it gave: the table rarely
    /// changes, and filtering it with two regexes costs more than reading it.
    table: Mutex<(Vec<u8>, Arc<Vec<Mount>>)>,
}

struct StatWorker {
    jobs: mpsc::Sender<Arc<Batch>>,
    stop: Arc<AtomicBool>,
}

/// One scrape's local mounts: those still to stat and the results so far.
struct Batch {
    state: Mutex<BatchState>,
    /// Signalled once every mount has a result.
    finished: Condvar,
    total: usize,
}

struct BatchState {
    queue: VecDeque<(usize, String)>,
    results: Vec<(usize, std::io::Result<FsStats>)>,
}

impl Filesystem {
    pub fn new(mount_points_exclude: &str, fs_types_exclude: &str) -> Result<Filesystem, String> {
        let compile = |what: &str, pattern: &str| {
            Regex::new(pattern).map_err(|e| format!("{what} {pattern:?} is not a valid regular expression: {e}"))
        };
        Ok(Filesystem {
            mount_points_exclude: compile("mount point exclude", mount_points_exclude)?,
            fs_types_exclude: compile("filesystem type exclude", fs_types_exclude)?,
            // PID 1's table is the host's even if the agent ever runs in a
            // mount namespace of its own; /proc/self when that is unreadable.
            mountinfo: vec!["/proc/1/mountinfo".into(), "/proc/self/mountinfo".into()],
            stat: Arc::new(statfs),
            in_flight: Arc::default(),
            network: Arc::default(),
            worker: Mutex::new(None),
            table: Mutex::new((Vec::new(), Arc::new(Vec::new()))),
        })
    }

    /// Reads the mount table from `path` instead (tests).
    pub fn with_mountinfo(mut self, path: PathBuf) -> Filesystem {
        self.mountinfo = vec![path];
        self
    }

    /// Replaces the statfs call (tests inject one that hangs).
    pub fn with_stat(mut self, stat: StatFn) -> Filesystem {
        self.stat = stat;
        self
    }

    /// The mounts to report, in mount table order.
    pub fn mounts(&self) -> Result<Arc<Vec<Mount>>, CollectError> {
        let mut buf = Vec::with_capacity(16 * 1024);
        let mut last_err = None;
        for path in &self.mountinfo {
            let path = path.to_string_lossy();
            match read_text(&path, &mut buf) {
                Ok(text) => {
                    let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
                    if table.0 != text.as_bytes() {
                        let mounts = Arc::new(self.filter(parse_mountinfo(text)));
                        *table = (buf, mounts);
                    }
                    return Ok(table.1.clone());
                }
                Err(err) => last_err = Some(err),
            }
        }
        Err(last_err.unwrap_or_else(|| CollectError::NoData("no mount table".into())))
    }

    fn filter(&self, mounts: Vec<Mount>) -> Vec<Mount> {
        let mut seen = HashSet::new();
        mounts
            .into_iter()
            .filter(|m| {
                !self.mount_points_exclude.is_match(&m.mountpoint) && !self.fs_types_exclude.is_match(&m.fstype)
            })
            .filter(|m| seen.insert((m.device.clone(), m.mountpoint.clone(), m.fstype.clone())))
            .collect()
    }

    /// Stats local mounts on a helper thread until `until`. The thread takes
    /// them in turn; when none has returned for [`PATIENCE`], the thread is
    /// left to its call and a fresh one goes on with the rest, so one stuck
    /// mount costs only its own figures.
    fn stat_local(&self, mounts: &[Mount], indexes: Vec<usize>, outcomes: &mut [Outcome], until: Instant) {
        let mut queue = VecDeque::with_capacity(indexes.len());
        {
            let in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            for i in indexes {
                if in_flight.contains(&mounts[i].mountpoint) {
                    outcomes[i] = Outcome::Stuck;
                } else {
                    queue.push_back((i, mounts[i].mountpoint.clone()));
                }
            }
        }
        let total = queue.len();
        if total == 0 {
            return;
        }
        let pending: Vec<usize> = queue.iter().map(|(i, _)| *i).collect();
        let batch = Arc::new(Batch {
            state: Mutex::new(BatchState {
                queue,
                results: Vec::with_capacity(total),
            }),
            finished: Condvar::new(),
            total,
        });
        self.hand_to_worker(&batch, false);
        let patience = PATIENCE.min(until.saturating_duration_since(Instant::now()) / 4);
        let mut state = batch.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.results.len() < total {
            let now = Instant::now();
            if now >= until {
                break;
            }
            let seen = state.results.len();
            state = batch
                .finished
                .wait_timeout(state, patience.min(until - now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if state.results.len() == seen && !state.queue.is_empty() && Instant::now() < until {
                self.hand_to_worker(&batch, true);
            }
        }
        // Whatever was not started by now stays unasked this time.
        state.queue.clear();
        for (i, result) in state.results.drain(..) {
            outcomes[i] = match result {
                Ok(stats) => Outcome::Stats(stats),
                Err(err) => {
                    tracing::debug!(mountpoint = %mounts[i].mountpoint, error = %err, "statfs failed");
                    Outcome::Error
                }
            };
        }
        drop(state);
        let in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        for i in pending {
            if matches!(outcomes[i], Outcome::Missing) && in_flight.contains(&mounts[i].mountpoint) {
                outcomes[i] = Outcome::Stuck;
            }
        }
    }

    /// Gives the batch to the stat thread; with `replace`, the current one
    /// is presumed stuck: it is told to stop once its call returns and a
    /// fresh thread takes over.
    fn hand_to_worker(&self, batch: &Arc<Batch>, replace: bool) {
        let mut worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if replace {
            if let Some(stuck) = worker.take() {
                stuck.stop.store(true, Ordering::Relaxed);
            }
        }
        for _ in 0..2 {
            if worker.is_none() {
                *worker = self.spawn_stat_worker();
            }
            let Some(current) = worker.as_ref() else {
                return;
            };
            if current.jobs.send(batch.clone()).is_ok() {
                return;
            }
            // The thread is gone (it could not be spawned at some point).
            *worker = None;
        }
    }

    fn spawn_stat_worker(&self) -> Option<StatWorker> {
        let (jobs, incoming) = mpsc::channel::<Arc<Batch>>();
        let stop = Arc::new(AtomicBool::new(false));
        let (stat, in_flight, stopped) = (self.stat.clone(), self.in_flight.clone(), stop.clone());
        let spawned = std::thread::Builder::new().name("statfs".into()).spawn(move || {
            while let Ok(batch) = incoming.recv() {
                loop {
                    if stopped.load(Ordering::Relaxed) {
                        return;
                    }
                    let next = batch.state.lock().unwrap_or_else(|e| e.into_inner()).queue.pop_front();
                    let Some((i, mountpoint)) = next else {
                        break;
                    };
                    in_flight
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(mountpoint.clone());
                    let result = stat(&mountpoint);
                    in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&mountpoint);
                    let mut state = batch.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.results.push((i, result));
                    // One wake-up per batch, not per mount.
                    if state.results.len() == batch.total {
                        batch.finished.notify_all();
                    }
                }
            }
        });
        spawned.ok().map(|_| StatWorker { jobs, stop })
    }

    /// The last background result for a network mount; starts a refresh
    /// when it is due and none is running.
    fn network_outcome(&self, mount: &Mount, now: Instant, stuck_after: Duration) -> Outcome {
        let mut entries = self.network.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.entry(mount.mountpoint.clone()).or_default();
        let outcome = match (entry.in_flight_since, &entry.last) {
            (Some(since), _) if now.duration_since(since) > stuck_after => Outcome::Stuck,
            (_, Some(Ok(stats))) => Outcome::Stats(*stats),
            (_, Some(Err(()))) => Outcome::Error,
            (_, None) => Outcome::Missing,
        };
        let due = entry
            .refreshed
            .is_none_or(|at| now.duration_since(at) >= NETWORK_REFRESH);
        if entry.in_flight_since.is_none() && due {
            entry.in_flight_since = Some(now);
            let (stat, network, mountpoint) = (self.stat.clone(), self.network.clone(), mount.mountpoint.clone());
            let spawned = std::thread::Builder::new().name("statfs-net".into()).spawn(move || {
                let result = stat(&mountpoint).map_err(|_| ());
                let mut entries = network.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(entry) = entries.get_mut(&mountpoint) {
                    entry.last = Some(result);
                    entry.refreshed = Some(Instant::now());
                    entry.in_flight_since = None;
                }
            });
            if spawned.is_err() {
                entry.in_flight_since = None;
            }
        }
        outcome
    }
}

fn is_network(fstype: &str) -> bool {
    NETWORK_FS_TYPES.contains(&fstype)
}

impl Collector for Filesystem {
    fn name(&self) -> &'static str {
        "filesystem"
    }

    fn collect(&self, out: &mut Encoder, deadline: Instant) -> Result<(), CollectError> {
        let start = Instant::now();
        let mounts = self.mounts()?;
        let mounts = mounts.as_slice();
        let mut outcomes = vec![Outcome::Missing; mounts.len()];
        let stuck_after = deadline.saturating_duration_since(start);
        let mut local = Vec::with_capacity(mounts.len());
        for (i, mount) in mounts.iter().enumerate() {
            if is_network(&mount.fstype) {
                outcomes[i] = self.network_outcome(mount, start, stuck_after);
            } else {
                local.push(i);
            }
        }
        {
            // Forget network mounts that are gone (unless a call still runs).
            let mut entries = self.network.lock().unwrap_or_else(|e| e.into_inner());
            entries.retain(|mp, e| e.in_flight_since.is_some() || mounts.iter().any(|m| &m.mountpoint == mp));
        }
        let until = deadline.checked_sub(ENCODE_RESERVE).unwrap_or(deadline).max(start);
        self.stat_local(mounts, local, &mut outcomes, until);

        type Field = fn(&FsStats) -> u64;
        let families: [(&str, &str, Field); 5] = [
            ("node_filesystem_size_bytes", "Filesystem size in bytes.", |s| s.size),
            ("node_filesystem_free_bytes", "Filesystem free space in bytes.", |s| {
                s.free
            }),
            (
                "node_filesystem_avail_bytes",
                "Filesystem space available to non-root users in bytes.",
                |s| s.avail,
            ),
            ("node_filesystem_files", "Filesystem total file nodes.", |s| s.files),
            ("node_filesystem_files_free", "Filesystem total free file nodes.", |s| {
                s.files_free
            }),
        ];
        fn labels(m: &Mount) -> [(&str, &str); 3] {
            [
                ("device", &m.device),
                ("fstype", &m.fstype),
                ("mountpoint", &m.mountpoint),
            ]
        }
        let ok: Vec<(&Mount, &FsStats)> = mounts
            .iter()
            .zip(&outcomes)
            .filter_map(|(m, o)| match o {
                Outcome::Stats(s) => Some((m, s)),
                _ => None,
            })
            .collect();
        if !ok.is_empty() {
            for (name, help, field) in families {
                out.family(name, help, MetricType::Gauge);
                for (mount, stats) in &ok {
                    out.sample_u64(name, &labels(mount), field(stats));
                }
            }
            out.family(
                "node_filesystem_readonly",
                "Filesystem read-only status.",
                MetricType::Gauge,
            );
            for (mount, _) in &ok {
                out.sample_u64("node_filesystem_readonly", &labels(mount), u64::from(mount.readonly));
            }
        }
        let reported: Vec<(&Mount, bool)> = mounts
            .iter()
            .zip(&outcomes)
            .filter_map(|(m, o)| match o {
                Outcome::Stats(_) => Some((m, false)),
                Outcome::Error | Outcome::Stuck => Some((m, true)),
                Outcome::Missing => None,
            })
            .collect();
        if !reported.is_empty() {
            out.family(
                "node_filesystem_device_error",
                "Whether an error occurred while getting statistics for the given device.",
                MetricType::Gauge,
            );
            for (mount, error) in &reported {
                out.sample_u64("node_filesystem_device_error", &labels(mount), u64::from(*error));
            }
        }
        let stuck: Vec<&str> = mounts
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| matches!(o, Outcome::Stuck))
            .map(|(m, _)| m.mountpoint.as_str())
            .collect();
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(CollectError::Incomplete(format!(
                "statfs did not return in time for {}; not asked again until it does",
                stuck.join(", ")
            )))
        }
    }
}

/// Parses /proc/PID/mountinfo (proc(5)): mount point is field 5, options
/// field 6, then optional fields up to "-", fstype, source, super options.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let mut fields = line.split(' ');
        let (Some(_id), Some(_parent), Some(_devno), Some(_root), Some(mountpoint), Some(options)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let mut fields = fields.skip_while(|f| *f != "-").skip(1);
        let (Some(fstype), Some(source)) = (fields.next(), fields.next()) else {
            continue;
        };
        let super_options = fields.next().unwrap_or_default();
        let readonly = options.split(',').any(|o| o == "ro") || super_options.split(',').any(|o| o == "ro");
        mounts.push(Mount {
            device: unescape_octal(source),
            mountpoint: unescape_octal(mountpoint),
            fstype: fstype.to_string(),
            readonly,
        });
    }
    mounts
}

/// The kernel writes space, tab, newline and backslash in paths as \ooo.
fn unescape_octal(field: &str) -> String {
    if !field.contains('\\') {
        return field.to_string();
    }
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                out.push((digits[0] - b'0') * 64 + (digits[1] - b'0') * 8 + (digits[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
23 22 0:5 / /proc rw,nosuid shared:2 - proc proc rw
24 22 0:20 / /run rw,nosuid shared:3 - tmpfs tmpfs rw,size=100k
25 22 8:2 / /data ro,relatime shared:4 - ext4 /dev/sdb rw
26 22 8:2 / /mnt/with\\040space rw shared:5 - xfs /dev/sdc rw
27 22 0:40 / /var/lib/docker/overlay2/x rw - ext4 /dev/sda1 rw
28 22 0:41 / /srv/nfs rw - nfs4 server:/export rw
29 22 0:42 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
30 22 0:43 / /data rw - ext4 /dev/sdb rw
";

    #[test]
    fn mount_table_is_filtered_with_node_exporter_defaults() {
        let fs = Filesystem::new(MOUNT_POINTS_EXCLUDE, FS_TYPES_EXCLUDE).unwrap();
        let mounts = fs.filter(parse_mountinfo(MOUNTINFO));
        let points: Vec<&str> = mounts.iter().map(|m| m.mountpoint.as_str()).collect();
        assert_eq!(points, ["/", "/run", "/data", "/mnt/with space", "/srv/nfs"]);
        assert!(!mounts[0].readonly, "errors=remount-ro is not ro");
        assert!(mounts[2].readonly, "per-mount ro");
        assert_eq!(mounts[0].device, "/dev/sda1");
        assert!(is_network(&mounts[4].fstype));
    }

    #[test]
    fn octal_escapes_are_decoded() {
        assert_eq!(unescape_octal("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape_octal("/plain"), "/plain");
        assert_eq!(unescape_octal("/trailing\\04"), "/trailing\\04");
    }
}
