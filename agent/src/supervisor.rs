//! The daemon: loads the configuration, starts every subsystem as a task and
//! watches them all at once. Whichever ends first, by error or not, and
//! SIGTERM/SIGINT alike, start the same orderly shutdown. SIGHUP (or the
//! `reload` request) re-reads the configuration and keeps the last valid one
//! when the new one is wrong.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backup::BackupService;
use crate::config::{self, ConfigErrors, ConfigSources, LoadedConfig};
use crate::control::{ControlContext, ControlServer, ReloadOutcome, ReloadRequest};
use crate::logging::{self, ids, LogHandle};
use crate::metrics::MetricsServer;
use crate::node::{self, Node};
use crate::objstore::{self, ObjectStore};
use crate::shutdown::{self, OnAgentStop, Outcome, PlanContext, PlannedStep, Step, StepReport};
use crate::status::{unix_now, AgentState, Health, Status, StatusHandle};
use crate::store::Store;
use crate::systemd::notify;
use crate::systemd::{DelayLock, LogindInhibitor, ShutdownInhibitor, SimInhibitor};

/// sysexits.h: the configuration is wrong; systemd must not restart us.
pub const EX_CONFIG: u8 = 78;
/// sysexits.h: something the agent needs is not there (socket in use, state
/// directory not writable).
pub const EX_UNAVAILABLE: u8 = 69;

type SubsystemResult = (&'static str, Result<(), String>);

pub fn run(sources: ConfigSources) -> ExitCode {
    let log = logging::init(config::LogLevel::Info);
    info!(
        message_id = ids::AGENT_STARTING,
        version = env!("CARGO_PKG_VERSION"),
        "platform-agent starting"
    );
    let loaded = match config::load(&sources) {
        Ok(loaded) => loaded,
        Err(errors) => {
            report_config_errors(&errors, "the configuration is invalid; not starting");
            return ExitCode::from(EX_CONFIG);
        }
    };
    log.set_level(loaded.settings.agent.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            error!(error = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(Daemon::start(sources, loaded, log));
    // A blocking task that does not end (a source stuck in a read) must not
    // keep the stopped agent alive.
    runtime.shutdown_timeout(Duration::from_secs(5));
    code
}

fn report_config_errors(errors: &ConfigErrors, what: &str) {
    for err in &errors.0 {
        error!(message_id = ids::CONFIG_INVALID, "{err}");
    }
    error!(message_id = ids::CONFIG_INVALID, errors = errors.0.len(), "{what}");
}

struct Daemon {
    sources: ConfigSources,
    log: LogHandle,
    status: StatusHandle,
    config_tx: watch::Sender<Arc<LoadedConfig>>,
}

impl Daemon {
    async fn start(sources: ConfigSources, loaded: LoadedConfig, log: LogHandle) -> ExitCode {
        let status = StatusHandle::new(Status::new(env!("CARGO_PKG_VERSION")));
        let settings = loaded.settings.clone();
        status.update(|s| {
            s.config.generation = 1;
            s.config.files = loaded.files.iter().map(|f| f.display().to_string()).collect();
            s.config.loaded_at = unix_now();
        });
        let (config_tx, config_rx) = watch::channel(Arc::new(loaded));
        let mut daemon = Daemon {
            sources,
            log,
            status: status.clone(),
            config_tx,
        };

        let state_dir = settings.agent.state_dir.clone();
        let store = match tokio::task::spawn_blocking(move || Store::open(&state_dir)).await {
            Ok(Ok(store)) => store,
            Ok(Err(err)) => {
                error!(error = %err, "cannot open the state store");
                return ExitCode::from(EX_UNAVAILABLE);
            }
            Err(err) => {
                error!(error = %err, "state store task failed");
                return ExitCode::FAILURE;
            }
        };
        let run_id = match store.begin_run(std::process::id(), env!("CARGO_PKG_VERSION")).await {
            Ok((id, previous)) => {
                if let Some(previous) = &previous {
                    info!(previous_run = %previous, "previous agent run ended: {previous}");
                }
                status.update(|s| {
                    s.agent.previous_run = previous;
                    s.store.health = Health::Ok;
                    s.store.path = store.path().display().to_string();
                    s.store.schema_version = store.schema_version();
                });
                id
            }
            Err(err) => {
                error!(error = %err, "cannot write to the state store");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        };

        // The catalog doubles as the S3 multipart journal, so that uploads a
        // crash interrupts can be aborted at the next start.
        let catalog = Arc::new(crate::backup::Catalog::new(store.clone()));
        let open_options = objstore::OpenOptions {
            journal: Some(catalog),
            part_size: (settings.backup.part_size_mib as usize) * 1024 * 1024,
        };
        let objects = match objstore::open(&settings.object_store, open_options) {
            Ok(objects) => {
                probe_object_store(objects.as_ref(), &status).await;
                objects
            }
            Err(err) => {
                error!(key = "object_store.backend", error = %err, "object store unusable");
                let _ = store.finish_run(run_id, &format!("refused: {err}")).await;
                return ExitCode::from(EX_CONFIG);
            }
        };
        let k3s_running: Arc<dyn Fn() -> bool + Send + Sync> = {
            let status = status.clone();
            Arc::new(move || {
                status
                    .snapshot()
                    .k3s_status
                    .is_some_and(|k| k.tier != crate::k3s::ReadyTier::Stopped)
            })
        };
        let backup = match BackupService::new(
            &settings.backup,
            store.clone(),
            objects.clone(),
            status.clone(),
            Some(run_id),
            k3s_running,
        ) {
            Ok(service) => Some(service),
            Err(err) => {
                // Not fatal: the node's other duties go on; status says why.
                error!(error = %err, "the backup subsystem cannot start");
                status.update(|s| {
                    s.backups = Health::Failed {
                        reason: err.to_string(),
                    }
                });
                None
            }
        };

        let wal = if settings.wal.enabled {
            match crate::wal::WalService::new(&settings, store.clone(), objects.clone(), status.clone()) {
                Ok(service) => Some(service),
                Err(err) => {
                    // Not fatal: wal-push then fails and PostgreSQL keeps its WAL.
                    error!(error = %err, "WAL archiving cannot start");
                    status.update(|s| {
                        s.wal = Health::Failed {
                            reason: err.to_string(),
                        }
                    });
                    None
                }
            }
        } else {
            None
        };

        let node = match Node::build(&settings, status.clone()).await {
            Ok(node) => Arc::new(node),
            Err(err) => {
                error!(key = "k3s.backend", error = %err, "cannot reach systemd for the volume and K3s");
                let _ = store.finish_run(run_id, &format!("failed: {err}")).await;
                return ExitCode::from(EX_UNAVAILABLE);
            }
        };
        let planned = shutdown::plan(&settings);
        let (delay_lock, mut shutdown_announced) = take_delay_lock(&settings, &planned).await;
        match store.last_shutdown().await {
            Ok(steps) => status.update(|s| s.last_shutdown = steps),
            Err(err) => warn!(error = %err, "cannot read the last shutdown from the state store"),
        }

        let server = match ControlServer::bind(&settings.control) {
            Ok(server) => server,
            Err(err) => {
                error!(error = %err, "cannot open the control socket");
                let _ = store.finish_run(run_id, &format!("failed: {err}")).await;
                return ExitCode::from(EX_UNAVAILABLE);
            }
        };
        let socket_path = server.path().to_path_buf();
        let metrics = if settings.metrics.enabled {
            match MetricsServer::bind(&settings.metrics).await {
                Ok(metrics) => Some(metrics),
                Err(err) => {
                    error!(key = "metrics.listen", error = %err, "cannot start the metrics endpoint");
                    let _ = store.finish_run(run_id, &format!("failed: {err}")).await;
                    return ExitCode::from(EX_UNAVAILABLE);
                }
            }
        } else {
            None
        };

        let (gitops, gitops_handle) =
            crate::gitops::GitopsService::new(store.clone(), backup.clone(), status.clone(), config_rx.clone());
        let cancel = CancellationToken::new();
        let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
        let mut subsystems: JoinSet<SubsystemResult> = JoinSet::new();
        // The control socket and the WAL archiver outlive stop-jobs: wal-push
        // must be answered while PostgreSQL stops with K3s; they stop after
        // the plan's flush-wal.
        let late_cancel = CancellationToken::new();
        let mut late_subsystems: JoinSet<SubsystemResult> = JoinSet::new();
        let context = Arc::new(ControlContext {
            status: status.clone(),
            config: config_rx,
            reload: reload_tx,
            daemon_uid: nix::unistd::geteuid().as_raw(),
            backup: backup.clone(),
            gitops: Some(gitops_handle),
            wal: wal.clone(),
        });
        {
            let cancel = late_cancel.clone();
            late_subsystems.spawn(async move {
                server.serve(context, cancel).await;
                ("control", Ok(()))
            });
        }
        if let Some(metrics) = metrics {
            let (status, cancel) = (status.clone(), cancel.clone());
            subsystems.spawn(async move {
                (
                    "metrics",
                    metrics.serve(status, cancel).await.map_err(|e| e.to_string()),
                )
            });
        }
        if !node.is_empty() {
            let (node, cancel) = (node.clone(), cancel.clone());
            subsystems.spawn(async move { ("node", node.run(cancel).await) });
        }
        if let Some(backup) = backup {
            // Stops with the plan's stop-jobs step: running uploads are
            // aborted (multipart aborted, catalog row failed).
            let cancel = cancel.clone();
            subsystems.spawn(async move {
                backup.recover().await;
                ("backup", backup.run(cancel).await)
            });
        }
        {
            // Always running: it waits while gitops.enabled is false, so a
            // reload can turn it on.
            let cancel = cancel.clone();
            subsystems.spawn(async move { ("gitops", gitops.run(cancel).await) });
        }
        if let Some(wal) = wal.clone() {
            let cancel = late_cancel.clone();
            late_subsystems.spawn(async move { ("wal", wal.run(cancel).await) });
        }
        subsystems.spawn(publish_status(status.clone(), cancel.clone()));
        if let Some(interval) = notify::watchdog_interval() {
            subsystems.spawn(feed_watchdog(store.clone(), interval, cancel.clone()));
        }

        let mut signals = match Signals::new() {
            Ok(signals) => signals,
            Err(err) => {
                error!(error = %err, "cannot install signal handlers");
                return ExitCode::FAILURE;
            }
        };

        let _ = status.set_agent_state(AgentState::Running);
        notify::ready(&status.snapshot().summary_line());
        info!(
            message_id = ids::AGENT_READY,
            socket = %socket_path.display(),
            pid = std::process::id(),
            "platform-agent ready"
        );

        let (reason, failed, system_shutdown) = loop {
            tokio::select! {
                _ = signals.term.recv() => break ("stopped by SIGTERM".to_string(), false, false),
                _ = signals.int.recv() => break ("stopped by SIGINT".to_string(), false, false),
                Some(()) = shutdown_announced.recv() => {
                    break ("the system is shutting down (logind PrepareForShutdown)".to_string(), false, true)
                }
                _ = signals.hup.recv() => { let _ = daemon.reload(); }
                Some(request) = reload_rx.recv() => {
                    let _ = request.reply.send(daemon.reload());
                }
                Some(joined) = subsystems.join_next() => {
                    let (reason, failed) = subsystem_exited(joined);
                    break (reason, failed, false);
                }
                Some(joined) = late_subsystems.join_next() => {
                    let (reason, failed) = subsystem_exited(joined);
                    break (reason, failed, false);
                }
            }
        };

        info!(message_id = ids::SHUTDOWN_STARTED, reason = %reason, "orderly shutdown: {reason}");
        let _ = status.set_agent_state(AgentState::Stopping);
        notify::stopping(&status.snapshot().summary_line());
        // Step 1 of the plan: no new work, running work finishes or is aborted.
        let in_place = !system_shutdown && take_restart_in_place_marker(&settings.control.socket);
        let run_plan = system_shutdown || (settings.shutdown.on_agent_stop == OnAgentStop::RunPlan && !in_place);
        if in_place {
            info!("restart in place requested (package upgrade): K3s and /data are left as they are");
        }
        if run_plan {
            info!(message_id = ids::PLAN_STARTED, trigger = %reason, steps = planned.len(), "running the shutdown plan");
        }
        let started = std::time::Instant::now();
        cancel.cancel();
        let deadline = settings.agent.shutdown_timeout;
        let stop_jobs = match tokio::time::timeout(deadline, async { while subsystems.join_next().await.is_some() {} })
            .await
        {
            Ok(()) => Outcome::Done,
            Err(_) => {
                warn!(deadline = %humantime::format_duration(deadline), "subsystems did not stop in time; aborting them");
                subsystems.shutdown().await;
                Outcome::TimedOut
            }
        };
        let mut reports = Vec::new();
        if run_plan {
            let report = StepReport {
                step: Step::StopJobs,
                outcome: stop_jobs,
                duration_ms: started.elapsed().as_millis() as u64,
            };
            shutdown::log_step(&report, planned[0].deadline_ms);
            reports.push(report);
            let context = PlanContext {
                k3s: node.k3s.as_ref(),
                volume: node.volume.as_ref(),
                status: &status,
            };
            let flush_at = planned
                .iter()
                .position(|p| p.step == Step::FlushWal)
                .unwrap_or(planned.len());
            reports.extend(shutdown::execute(&planned[..flush_at], &context).await);
            if let Some(flush) = planned.get(flush_at) {
                let flushing = std::time::Instant::now();
                let outcome = match (&flush.skip, &wal) {
                    (Some(reason), _) => Outcome::Skipped { reason: reason.clone() },
                    (None, None) => Outcome::Skipped {
                        reason: "the WAL archiver did not start".into(),
                    },
                    (None, Some(wal)) => {
                        match tokio::time::timeout(Duration::from_millis(flush.deadline_ms), wal.flush()).await {
                            Ok(()) => Outcome::Done,
                            Err(_) => Outcome::TimedOut,
                        }
                    }
                };
                stop_late(late_cancel, &mut late_subsystems).await;
                let report = StepReport {
                    step: Step::FlushWal,
                    outcome,
                    duration_ms: flushing.elapsed().as_millis() as u64,
                };
                shutdown::log_step(&report, flush.deadline_ms);
                reports.push(report);
                reports.extend(shutdown::execute(&planned[flush_at + 1..], &context).await);
            } else {
                stop_late(late_cancel, &mut late_subsystems).await;
            }
        } else {
            info!("shutdown.on_agent_stop = leave-running: K3s and /data are left as they are");
            stop_late(late_cancel, &mut late_subsystems).await;
        }
        if run_plan {
            // The delay lock goes last, after the plan's outcome is in the
            // journal and the state store: at poweroff, logind proceeds the
            // moment it is released, and what comes after may never be written.
            // Closing the lock's fd cannot fail, so its report is written
            // beforehand and logged once the lock is really gone.
            let release = StepReport {
                step: Step::ReleaseInhibitor,
                outcome: Outcome::Done,
                duration_ms: 0,
            };
            reports.push(release.clone());
            let failed_steps = reports
                .iter()
                .filter(|r| matches!(r.outcome, Outcome::Failed { .. } | Outcome::TimedOut))
                .count();
            info!(
                message_id = ids::PLAN_FINISHED,
                duration_ms = started.elapsed().as_millis() as u64,
                failed_steps,
                "shutdown plan finished in {} ms, {failed_steps} steps failed",
                started.elapsed().as_millis()
            );
            if let Err(err) = store.record_shutdown(run_id, &reports).await {
                warn!(error = %err, "cannot record the shutdown steps");
            }
            status.update(|s| s.last_shutdown = reports);
            drop(delay_lock);
            shutdown::log_step(&release, planned.last().map_or(0, |p| p.deadline_ms));
        } else {
            drop(delay_lock);
        }
        if let Err(err) = store.finish_run(run_id, &reason).await {
            warn!(error = %err, "cannot record the stop in the state store");
        }
        let _ = status.set_agent_state(AgentState::Stopped);
        info!(message_id = ids::AGENT_STOPPED, reason = %reason, "platform-agent stopped");
        if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }

    fn reload(&mut self) -> ReloadOutcome {
        match config::load(&self.sources) {
            Ok(loaded) => {
                let previous = self.config_tx.borrow().clone();
                for key in restart_only_changes(&previous, &loaded) {
                    warn!(key, "{key} changed; it takes effect when the agent restarts");
                }
                self.log.set_level(loaded.settings.agent.log_level);
                let files: Vec<String> = loaded.files.iter().map(|f| f.display().to_string()).collect();
                let mut generation = 0;
                self.status.update(|s| {
                    s.config.generation += 1;
                    generation = s.config.generation;
                    s.config.files = files.clone();
                    s.config.loaded_at = unix_now();
                    s.config.last_reload_error = None;
                });
                self.config_tx.send_replace(Arc::new(loaded));
                info!(message_id = ids::CONFIG_RELOADED, generation, "configuration reloaded");
                Ok((generation, files))
            }
            Err(errors) => {
                report_config_errors(&errors, "reload refused; still running on the previous configuration");
                let message = errors.to_string();
                self.status
                    .update(|s| s.config.last_reload_error = Some(message.clone()));
                Err(message)
            }
        }
    }
}

/// Keys whose new value needs a restart: they shape resources opened once at
/// start (the socket, the store, the object store).
fn restart_only_changes(old: &LoadedConfig, new: &LoadedConfig) -> Vec<String> {
    let values = |config: &LoadedConfig| -> BTreeMap<String, String> {
        config.effective().into_iter().map(|e| (e.key, e.value)).collect()
    };
    let (old, new) = (values(old), values(new));
    let restart_prefixes = ["control.", "agent.state_dir", "object_store.", "backup.", "metrics."];
    new.iter()
        .filter(|(key, value)| old.get(*key) != Some(value) && restart_prefixes.iter().any(|p| key.starts_with(p)))
        .map(|(key, _)| key.clone())
        .collect()
}

async fn probe_object_store(store: &dyn ObjectStore, status: &StatusHandle) {
    const PROBE_KEY: &str = "agent/probe";
    let description = store.describe();
    let result = async {
        let body = format!("probe from pid {} at {}\n", std::process::id(), unix_now());
        let written = store.put(PROBE_KEY, &mut body.as_bytes(), Default::default()).await?;
        let mut read_back = Vec::new();
        store.get(PROBE_KEY, &mut read_back).await?;
        store.delete(PROBE_KEY).await?;
        if read_back != body.as_bytes() || written.size != body.len() as u64 {
            return Err(crate::objstore::ObjectStoreError::Io {
                store: store.describe(),
                action: "verify",
                key: PROBE_KEY.into(),
                source: std::io::Error::other("read-back differs from what was written"),
            });
        }
        Ok(())
    }
    .await;
    let health = match result {
        Ok(()) => Health::Ok,
        Err(err) => {
            // Not fatal: the volume and K3s duties must not wait for S3.
            warn!(error = %err, store = %description, "object store probe failed");
            Health::Failed {
                reason: err.to_string(),
            }
        }
    };
    status.update(|s| {
        s.object_store.health = health;
        s.object_store.location = description;
        s.object_store.backend = s
            .object_store
            .location
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
    });
}

/// The package's maintainer scripts create this file right before
/// `systemctl restart` on upgrade, so that an upgrade restarts only the agent
/// and does not stop K3s or unmount /data. Honoured once, and only if fresh.
pub const RESTART_IN_PLACE_MARKER: &str = "restart-in-place";

fn take_restart_in_place_marker(socket: &std::path::Path) -> bool {
    let Some(marker) = socket.parent().map(|dir| dir.join(RESTART_IN_PLACE_MARKER)) else {
        return false;
    };
    let fresh = std::fs::metadata(&marker)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < Duration::from_secs(120));
    let _ = std::fs::remove_file(&marker);
    fresh
}

/// Holds logind's shutdown delay lock when the agent manages real things;
/// warns when logind's InhibitDelayMaxSec would cut the plan short.
async fn take_delay_lock(
    settings: &crate::config::Settings,
    planned: &[PlannedStep],
) -> (Option<DelayLock>, tokio::sync::mpsc::Receiver<()>) {
    let fallback = || async {
        let (lock, rx) = SimInhibitor.take().await.expect("the sim inhibitor cannot fail");
        (Some(lock), rx)
    };
    if !node::needs_systemd(settings) {
        return fallback().await;
    }
    let inhibitor = match LogindInhibitor::connect().await {
        Ok(inhibitor) => inhibitor,
        Err(err) => {
            warn!(error = %err, "no logind: the shutdown plan runs on SIGTERM only");
            return fallback().await;
        }
    };
    let needed = shutdown::total_deadline(planned);
    match inhibitor.max_delay().await {
        Ok(max) if max < needed => warn!(
            inhibit_delay_max = %humantime::format_duration(max),
            plan = %humantime::format_duration(needed),
            "logind's InhibitDelayMaxSec is shorter than the shutdown plan; install the packaged logind drop-in or raise it"
        ),
        Ok(_) => {}
        Err(err) => warn!(error = %err, "cannot read InhibitDelayMaxSec"),
    }
    match inhibitor.take().await {
        Ok((lock, rx)) => (Some(lock), rx),
        Err(err) => {
            warn!(error = %err, "cannot take logind's shutdown delay lock; the plan runs on SIGTERM only");
            fallback().await
        }
    }
}

/// Keeps systemd's STATUS= in step with the status model.
async fn publish_status(status: StatusHandle, cancel: CancellationToken) -> SubsystemResult {
    let mut changes = status.subscribe();
    let mut last = String::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return ("status", Ok(())),
            changed = changes.changed() => if changed.is_err() { return ("status", Ok(())) },
        }
        let line = changes.borrow_and_update().summary_line();
        if line != last {
            notify::status(&line);
            last = line;
        }
    }
}

/// Pings systemd's watchdog only while the state store answers, so that a
/// wedged agent is restarted instead of kept alive by a timer.
async fn feed_watchdog(store: Store, interval: Duration, cancel: CancellationToken) -> SubsystemResult {
    let mut ticker = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return ("watchdog", Ok(())),
            _ = ticker.tick() => {}
        }
        match tokio::time::timeout(interval / 4, store.ping()).await {
            Ok(Ok(())) => notify::watchdog(),
            Ok(Err(err)) => warn!(message_id = ids::WATCHDOG_CHECK_FAILED, error = %err, "watchdog check failed"),
            Err(_) => warn!(message_id = ids::WATCHDOG_CHECK_FAILED, "watchdog check timed out"),
        }
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Why the agent stops when a subsystem ended on its own.
fn subsystem_exited(joined: Result<SubsystemResult, tokio::task::JoinError>) -> (String, bool) {
    let (name, result) = match joined {
        Ok(done) => done,
        Err(err) => ("unknown", Err(format!("task panicked or was cancelled: {err}"))),
    };
    let detail = match &result {
        Ok(()) => "ended".to_string(),
        Err(e) => format!("failed: {e}"),
    };
    error!(
        message_id = ids::SUBSYSTEM_EXITED,
        subsystem = name,
        "subsystem {name} {detail}; shutting down"
    );
    (format!("subsystem {name} {detail}"), result.is_err())
}

/// Stops the control socket and the WAL archiver; a few seconds, then they
/// are aborted.
async fn stop_late(cancel: CancellationToken, late: &mut JoinSet<SubsystemResult>) {
    cancel.cancel();
    let drained = async { while late.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drained).await.is_err() {
        warn!("the control socket or the WAL archiver did not stop in time; aborting them");
        late.shutdown().await;
    }
}
