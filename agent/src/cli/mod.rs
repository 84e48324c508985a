//! Command line: `run` is the daemon; every other subcommand is a client of
//! the daemon's control socket, except `config check`, which needs no daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, ConfigSources, EffectiveEntry};
use crate::control::protocol::ErrorCode;
use crate::control::{Client, ClientError, Request, Response};
use crate::status::{Health, Status};
use crate::supervisor::{self, EX_CONFIG, EX_UNAVAILABLE};

/// sysexits.h: permission denied.
const EX_NOPERM: u8 = 77;
/// sysexits.h: no such input (unknown job or backup).
const EX_NOINPUT: u8 = 66;
/// sysexits.h: cannot create output (a restore refused to overwrite a live
/// target).
const EX_CANTCREAT: u8 = 73;
/// sysexits.h: temporary failure, try again (the job is busy).
const EX_TEMPFAIL: u8 = 75;

#[derive(Debug, Parser)]
#[command(
    name = "platform-agent",
    version,
    about = "Host caretaker for a single-node K3s GitOps server"
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Configuration file or directory; repeat to layer several. Without it
    /// the drop-in directories under /usr/lib, /etc and /run are read.
    #[arg(long, short = 'c', global = true, value_name = "PATH")]
    config: Vec<PathBuf>,
    /// Control socket to talk to (default: control.socket from the configuration).
    #[arg(long, global = true, env = "PLATFORM_AGENT_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (what the systemd unit starts).
    Run,
    /// Show the agent's live status.
    Status {
        /// Print the status model as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the configuration (root only); the agent keeps the old one if the new one is invalid.
    Reload,
    /// Print the version of this binary and of the running agent.
    Version,
    /// Print the ordered shutdown plan with each step's deadline, without running it.
    ShutdownPlan {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check or show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Backups: run a job now, list and show the catalog, prune, verify.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Restore a backup (root only): the newest, or one named by --id.
    Restore(RestoreArgs),
    /// GitOps: fetch and apply now (root only), or with --diff show what would change.
    Reconcile {
        /// Only show what would change; write nothing.
        #[arg(long)]
        diff: bool,
        #[arg(long)]
        json: bool,
    },
    /// PostgreSQL's archive_command: `platform-agent wal-push %p %f`; exits 0 only once the file is durable.
    WalPush {
        /// %p: the file (relative to PGDATA, the working directory).
        path: PathBuf,
        /// %f: its name.
        name: String,
    },
    /// PostgreSQL's restore_command: `platform-agent wal-fetch %f %p`; exits 1 when the file is not archived.
    WalFetch {
        /// %f: the file PostgreSQL wants.
        name: String,
        /// %p: where to put it.
        path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Run a job now and wait for it (root only).
    Now {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// List the catalog, newest first.
    List {
        #[arg(long)]
        job: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show one catalog entry.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Apply retention now (root only), or with --dry-run show what it would keep and delete, and why.
    Prune {
        #[arg(long)]
        job: Option<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Read a backup back, check its SHA-256 and test-restore it to a scratch target (root only).
    Verify {
        /// Catalog id (default: the newest backup of --job).
        id: Option<i64>,
        #[arg(long)]
        job: Option<String>,
        /// Only read the object back and compare its checksum.
        #[arg(long)]
        checksum_only: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// What to restore: pg (postgres), vault, k3s or files.
    #[arg(value_parser = parse_kind)]
    kind: crate::backup::BackupKind,
    /// The job, when several back up this kind.
    #[arg(long)]
    job: Option<String>,
    /// A catalog id (see `backup list`).
    #[arg(long, conflicts_with = "latest")]
    id: Option<i64>,
    /// The newest backup (the default).
    #[arg(long)]
    latest: bool,
    /// PostgreSQL: which database's backup, when the job dumps several.
    #[arg(long)]
    database: Option<String>,
    /// Where to restore: a database name (pg), a path (k3s: the state.db
    /// file; files: a directory). Default: where it came from.
    #[arg(long)]
    target: Option<String>,
    /// Overwrite a live target (an existing database, a running K3s, existing files; always needed for Vault).
    #[arg(long)]
    force: bool,
    /// PostgreSQL: do not restore ownership and privileges.
    #[arg(long)]
    no_owner: bool,
    /// PostgreSQL point-in-time recovery to this RFC 3339 time, from a
    /// pg-basebackup job's base backup and the WAL archive (no daemon needed).
    #[arg(long, value_name = "TIME", requires = "target_dir")]
    pitr: Option<String>,
    /// With --pitr: the empty directory to restore the cluster into.
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    /// With --pitr: the base backup's catalog id (default: the newest that finished before TIME).
    #[arg(long, value_name = "ID", requires = "pitr")]
    from: Option<i64>,
    #[arg(long)]
    json: bool,
}

fn parse_kind(word: &str) -> Result<crate::backup::BackupKind, String> {
    crate::backup::BackupKind::parse(word)
        .ok_or_else(|| format!("{word:?}: expected pg, vault, k3s, files or pg-basebackup"))
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check configuration files without starting anything; exit 78 if invalid.
    Check {
        /// Files or directories to check, layered in order (default: --config or the drop-in directories).
        files: Vec<PathBuf>,
    },
    /// Show the configuration, each value with the file and line it came from.
    Show {
        /// The merged configuration the running agent uses (the default; kept for clarity).
        #[arg(long)]
        effective: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = ConfigSources::from_args(&cli.global.config);
    match cli.command {
        Command::Run => supervisor::run(sources),
        // The WAL commands run once per segment: their own short paths.
        Command::WalPush { path, name } => {
            crate::wal::client::push(&sources, cli.global.socket.as_deref(), &path, &name)
        }
        Command::WalFetch { name, path } => crate::wal::client::fetch(&sources, &name, &path),
        Command::Restore(args) if args.pitr.is_some() => restore_pitr(&cli.global, &sources, &args),
        Command::Config(ConfigCommand::Check { files }) => {
            let sources = if files.is_empty() {
                sources
            } else {
                ConfigSources::Explicit(files)
            };
            config_check(&sources)
        }
        command => match client_command(&cli.global, &sources, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("platform-agent: {err}");
                ExitCode::from(client_exit_code(&err))
            }
        },
    }
}

/// `restore pg --pitr`: runs here, not in the daemon (see `wal::restore`).
fn restore_pitr(global: &GlobalArgs, sources: &ConfigSources, args: &RestoreArgs) -> ExitCode {
    if args.kind != crate::backup::BackupKind::Postgres {
        eprintln!("platform-agent: --pitr restores PostgreSQL only (restore pg --pitr ...)");
        return ExitCode::from(64);
    }
    let loaded = match config::load(sources) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("platform-agent: {errors}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("platform-agent: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let (Some(target), Some(dir)) = (args.pitr.as_deref(), args.target_dir.as_deref()) else {
        return ExitCode::from(64);
    };
    match runtime.block_on(crate::wal::restore::pitr(
        &loaded.settings,
        &global.config,
        target,
        dir,
        args.from,
    )) {
        Ok(report) => {
            println!(
                "restored base backup {} (WAL from {}) into {}; recovery to {} is set up:\nstart PostgreSQL on {} and it replays the archived WAL, then promotes",
                report.base_backup,
                report.start_segment,
                report.target_dir.display(),
                report.target_time,
                report.target_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("platform-agent: {err}");
            ExitCode::FAILURE
        }
    }
}

fn config_check(sources: &ConfigSources) -> ExitCode {
    match config::load(sources) {
        Ok(loaded) => {
            println!("configuration OK ({} files)", loaded.files.len());
            for file in &loaded.files {
                println!("  {}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for err in &errors.0 {
                eprintln!("{err}");
            }
            ExitCode::from(EX_CONFIG)
        }
    }
}

fn client_exit_code(err: &ClientError) -> u8 {
    match err {
        ClientError::NotRunning { .. } => EX_UNAVAILABLE,
        ClientError::PermissionDenied { .. } => EX_NOPERM,
        ClientError::Refused { code, .. } => match code {
            ErrorCode::PermissionDenied => EX_NOPERM,
            ErrorCode::ConfigInvalid => EX_CONFIG,
            ErrorCode::Unavailable => EX_UNAVAILABLE,
            ErrorCode::NotFound => EX_NOINPUT,
            ErrorCode::Busy => EX_TEMPFAIL,
            ErrorCode::Refused => EX_CANTCREAT,
            ErrorCode::BadRequest | ErrorCode::TooLarge | ErrorCode::Failed => 1,
        },
        ClientError::Io { .. } | ClientError::Protocol { .. } => 1,
    }
}

/// --socket, then $PLATFORM_AGENT_SOCKET (both via clap), then the
/// configuration, then the built-in default.
fn socket_path(global: &GlobalArgs, sources: &ConfigSources) -> PathBuf {
    if let Some(socket) = &global.socket {
        return socket.clone();
    }
    match config::load(sources) {
        Ok(loaded) => loaded.settings.control.socket,
        Err(_) => config::ControlSettings::default().socket,
    }
}

fn call(global: &GlobalArgs, sources: &ConfigSources, request: Request) -> Result<Response, ClientError> {
    let path = socket_path(global, sources);
    // Reload re-reads every file and probes; give it longer than a read.
    // Long requests send a progress frame at least every 5 s.
    let timeout = match request {
        Request::Reload => Duration::from_secs(60),
        Request::BackupPrune { .. } => Duration::from_secs(300),
        // A pass fetches over the network (at most 5 min) and then writes.
        Request::Reconcile { .. } => Duration::from_secs(330),
        ref long if long.streams_progress() => Duration::from_secs(120),
        _ => Duration::from_secs(15),
    };
    let mut client = Client::connect(&path, timeout)?;
    if request.streams_progress() {
        let mut bar = ProgressBar::new();
        let result = client.call_with_progress(&request, |report| bar.show(report));
        bar.finish();
        result
    } else {
        client.call(&request)
    }
}

/// A one-line progress bar on stderr, drawn only on a terminal.
struct ProgressBar {
    tty: bool,
    drawn: bool,
}

impl ProgressBar {
    fn new() -> Self {
        use std::io::IsTerminal;
        ProgressBar {
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    fn show(&mut self, report: &crate::backup::ProgressReport) {
        if !self.tty {
            return;
        }
        let mut line = format!("{}: ", report.phase);
        if report.total > 0 {
            let fraction = (report.done as f64 / report.total as f64).clamp(0.0, 1.0);
            let filled = (fraction * 30.0) as usize;
            line.push_str(&format!(
                "[{}{}] {:>3.0}% {} / {}",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                fraction * 100.0,
                human_bytes(report.done),
                human_bytes(report.total)
            ));
        } else {
            line.push_str(&human_bytes(report.done));
        }
        eprint!("\r\x1b[2K{line}");
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
        }
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("replies serialize"));
}

/// A reply as JSON (`--json`, for scripts) or rendered for people.
fn print_reply<T: serde::Serialize>(json: bool, value: &T, render: impl FnOnce(&T) -> String) {
    if json {
        print_json(value);
    } else {
        print!("{}", render(value));
    }
}

fn backup_command(global: &GlobalArgs, sources: &ConfigSources, command: BackupCommand) -> Result<(), ClientError> {
    match command {
        BackupCommand::Now { job, json } => match call(global, sources, Request::BackupNow { job })? {
            Response::Backups { backups } => {
                print_reply(json, &backups, |b| render_backups(b));
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        BackupCommand::List { job, limit, json } => {
            match call(
                global,
                sources,
                Request::BackupList {
                    job,
                    limit: Some(limit),
                },
            )? {
                Response::Backups { backups } => {
                    print_reply(json, &backups, |b| render_backups(b));
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        BackupCommand::Show { id, json } => match call(global, sources, Request::BackupShow { id })? {
            Response::Backup { backup } => {
                print_reply(json, &backup, |b| render_backup(b));
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        BackupCommand::Prune { job, dry_run, json } => {
            match call(global, sources, Request::BackupPrune { job, dry_run })? {
                Response::PrunePlan { dry_run, decisions } => {
                    print_reply(json, &decisions, |d| render_prune(dry_run, d));
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        BackupCommand::Verify {
            id,
            job,
            checksum_only,
            json,
        } => match call(
            global,
            sources,
            Request::BackupVerify {
                id,
                job,
                restore_test: !checksum_only,
            },
        )? {
            Response::Verified { report } => {
                print_reply(json, &report, |r| format!("{}\n", r.summary));
                Ok(())
            }
            other => Err(unexpected(other)),
        },
    }
}

fn restore_command(global: &GlobalArgs, sources: &ConfigSources, args: RestoreArgs) -> Result<(), ClientError> {
    let request = Request::Restore(crate::backup::RestoreRequest {
        kind: args.kind,
        job: args.job,
        id: args.id,
        database: args.database,
        target: args.target,
        force: args.force,
        no_owner: args.no_owner,
    });
    match call(global, sources, request)? {
        Response::Restored { report } => {
            print_reply(args.json, &report, |r| {
                format!(
                    "restored {} ({}) to {}: {}\n",
                    if r.id > 0 {
                        format!("backup {}", r.id)
                    } else {
                        "the newest object".to_string()
                    },
                    r.key,
                    r.target,
                    r.summary
                )
            });
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

fn format_ms(ms: i64) -> String {
    crate::backup::format_time(ms)
}

fn render_backups(backups: &[crate::backup::BackupRecord]) -> String {
    if backups.is_empty() {
        return "no backups recorded\n".into();
    }
    let mut out = format!(
        "{:>6}  {:<12} {:<12} {:<9} {:<21} {:>9} {:>10}  {}\n",
        "ID", "JOB", "TARGET", "STATE", "STARTED", "DURATION", "SIZE", "KEY / ERROR"
    );
    for b in backups {
        let duration = b
            .duration_ms()
            .map(|ms| humantime::format_duration(Duration::from_secs((ms / 1000).max(0) as u64)).to_string())
            .unwrap_or_else(|| "-".into());
        let size = b.bytes.map(human_bytes).unwrap_or_else(|| "-".into());
        let detail = match (&b.error, &b.key) {
            (Some(error), _) => error.replace('\n', " "),
            (None, Some(key)) => key.clone(),
            (None, None) => String::new(),
        };
        out.push_str(&format!(
            "{:>6}  {:<12} {:<12} {:<9} {:<21} {:>9} {:>10}  {}\n",
            b.id,
            b.job,
            b.target,
            b.state.as_str(),
            format_ms(b.started_ms),
            duration,
            size,
            detail
        ));
    }
    out
}

fn render_backup(b: &crate::backup::BackupRecord) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let lines = [
        ("id", b.id.to_string()),
        ("job", b.job.clone()),
        ("kind", b.kind.clone()),
        ("target", b.target.clone()),
        ("state", b.state.as_str().to_string()),
        (
            "trigger",
            format!("{} (attempt {}, run {})", b.trigger, b.attempt, b.batch),
        ),
        ("key", opt(b.key.clone())),
        ("started", format_ms(b.started_ms)),
        ("finished", opt(b.finished_ms.map(format_ms))),
        (
            "stored",
            opt(b.bytes.map(|n| format!("{} ({n} bytes)", human_bytes(n)))),
        ),
        (
            "source bytes",
            opt(b.raw_bytes.map(|n| format!("{} ({n} bytes)", human_bytes(n)))),
        ),
        ("sha256", opt(b.sha256.clone())),
        ("source sha256", opt(b.raw_sha256.clone())),
        ("encoding", format!("{}, encryption {}", b.compression, b.encryption)),
        ("verified", opt(b.verified_ms.map(format_ms))),
        (
            "test restore",
            opt(b
                .tested_ms
                .map(|t| format!("{}: {}", format_ms(t), b.test_result.clone().unwrap_or_default()))),
        ),
        ("pruned", opt(b.pruned_ms.map(format_ms))),
        ("error", opt(b.error.clone())),
    ];
    lines.iter().map(|(k, v)| format!("{k:<14} {v}\n")).collect()
}

fn render_prune(dry_run: bool, decisions: &[crate::backup::Decision]) -> String {
    use crate::backup::retention::Verdict;
    if decisions.is_empty() {
        return "no backups to consider\n".into();
    }
    let mut out = String::new();
    if dry_run {
        out.push_str("dry run: nothing is deleted\n");
    }
    for d in decisions {
        let verdict = match (d.verdict, dry_run) {
            (Verdict::Keep, _) => "keep",
            (Verdict::Delete, true) => "delete",
            (Verdict::Delete, false) => "deleted",
        };
        out.push_str(&format!(
            "{verdict:<8} {:>6}  {}  {}  {}\n",
            d.id,
            format_ms(d.started_ms),
            d.key,
            d.reasons.join("; ")
        ));
    }
    out
}

fn unexpected(response: Response) -> ClientError {
    ClientError::Protocol {
        path: PathBuf::new(),
        message: format!("unexpected reply {response:?}"),
    }
}

fn client_command(global: &GlobalArgs, sources: &ConfigSources, command: Command) -> Result<(), ClientError> {
    match command {
        Command::Status { json } => match call(global, sources, Request::Status)? {
            Response::Status { status } if json => {
                println!("{}", serde_json::to_string_pretty(&status).expect("status serializes"));
                Ok(())
            }
            Response::Status { status } => {
                print!("{}", render_status(&status));
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        Command::Reload => match call(global, sources, Request::Reload)? {
            Response::Reloaded { generation, files } => {
                println!(
                    "configuration reloaded (generation {generation}, {} files)",
                    files.len()
                );
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        Command::Version => {
            println!("platform-agent {}", env!("CARGO_PKG_VERSION"));
            match call(global, sources, Request::Version) {
                Ok(Response::Version { version, protocol }) => {
                    println!("running agent {version} (protocol {protocol})");
                    Ok(())
                }
                Ok(other) => Err(unexpected(other)),
                Err(ClientError::NotRunning { .. }) => {
                    println!("running agent: none");
                    Ok(())
                }
                Err(err) => Err(err),
            }
        }
        Command::ShutdownPlan { json } => {
            let steps = match call(global, sources, Request::ShutdownPlan) {
                Ok(Response::ShutdownPlan { steps }) => steps,
                Ok(other) => return Err(unexpected(other)),
                Err(ClientError::NotRunning { path, .. }) => {
                    eprintln!(
                        "note: no agent answers on {}; showing the plan for the configuration files",
                        path.display()
                    );
                    let loaded = config::load(sources).map_err(|errors| ClientError::Refused {
                        request: "shutdown-plan",
                        code: ErrorCode::ConfigInvalid,
                        message: errors.to_string(),
                    })?;
                    crate::shutdown::plan(&loaded.settings)
                }
                Err(err) => return Err(err),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&steps).expect("plan serializes"));
            } else {
                print!("{}", render_plan(&steps));
            }
            Ok(())
        }
        Command::Config(ConfigCommand::Show { effective: _, json }) => {
            let (files, entries) = match call(global, sources, Request::ConfigShow) {
                Ok(Response::Config { files, entries }) => (files, entries),
                Ok(other) => return Err(unexpected(other)),
                Err(ClientError::NotRunning { path, .. }) => {
                    eprintln!(
                        "note: no agent answers on {}; showing the files as they would load now",
                        path.display()
                    );
                    match config::load(sources) {
                        Ok(loaded) => (
                            loaded.files.iter().map(|f| f.display().to_string()).collect(),
                            loaded.effective(),
                        ),
                        Err(errors) => {
                            return Err(ClientError::Refused {
                                request: "config-show",
                                code: ErrorCode::ConfigInvalid,
                                message: errors.to_string(),
                            })
                        }
                    }
                }
                Err(err) => return Err(err),
            };
            if json {
                let value = serde_json::json!({ "files": files, "entries": entries });
                println!("{}", serde_json::to_string_pretty(&value).expect("json serializes"));
            } else {
                print!("{}", render_effective(&files, &entries));
            }
            Ok(())
        }
        Command::Backup(command) => backup_command(global, sources, command),
        Command::Restore(args) => restore_command(global, sources, args),
        Command::Reconcile { diff, json } => match call(global, sources, Request::Reconcile { diff })? {
            Response::Reconciled { report } => {
                if json {
                    print_json(&report);
                } else {
                    print!("{}", crate::gitops::render_report(&report));
                }
                // The files were applied but the prune was not: scripts
                // must see that (exit 73, as for other refusals).
                match report.prune_refused {
                    Some(reason) if !report.dry_run => Err(ClientError::Refused {
                        request: "reconcile",
                        code: ErrorCode::Refused,
                        message: reason,
                    }),
                    _ => Ok(()),
                }
            }
            other => Err(unexpected(other)),
        },
        Command::Run
        | Command::Config(ConfigCommand::Check { .. })
        | Command::WalPush { .. }
        | Command::WalFetch { .. } => unreachable!("handled in main"),
    }
}

fn render_plan(steps: &[crate::shutdown::PlannedStep]) -> String {
    let mut out = String::from(
        "ordered shutdown plan (on poweroff, and on agent stop unless shutdown.on_agent_stop = \"leave-running\"):\n",
    );
    for (i, step) in steps.iter().enumerate() {
        let deadline = humantime::format_duration(Duration::from_millis(step.deadline_ms)).to_string();
        let mut line = format!("  {}. {:<18} deadline {:>6}", i + 1, step.step.as_str(), deadline);
        if let Some(skip) = &step.skip {
            line.push_str(&format!("  (skipped: {skip})"));
        }
        out.push_str(&line);
        out.push('\n');
    }
    let total = crate::shutdown::total_deadline(steps);
    out.push_str(&format!(
        "  total at most {}; logind's InhibitDelayMaxSec must cover it\n",
        humantime::format_duration(total)
    ));
    out
}

fn render_effective(files: &[String], entries: &[EffectiveEntry]) -> String {
    let mut out = String::new();
    out.push_str("# files, lowest precedence first:\n");
    for file in files {
        out.push_str(&format!("#   {file}\n"));
    }
    let key_width = entries.iter().map(|e| e.key.len()).max().unwrap_or(0);
    let value_width = entries.iter().map(|e| e.value.len()).max().unwrap_or(0).min(48);
    for entry in entries {
        out.push_str(&format!(
            "{:key_width$} = {:value_width$}  # {}\n",
            entry.key, entry.value, entry.source
        ));
    }
    out
}

fn render_status(status: &Status) -> String {
    let uptime = crate::status::unix_now().saturating_sub(status.agent.started_at);
    let mut out = format!(
        "platform-agent {}  {}  pid {}  up {}\n",
        status.agent.version,
        status.agent.state.as_str(),
        status.agent.pid,
        humantime::format_duration(Duration::from_secs(uptime))
    );
    let detail = |name: &str| -> String {
        match name {
            "store" => format!("{} (schema {})", status.store.path, status.store.schema_version),
            "control" => format!(
                "{} (served {}, denied {})",
                status.control.socket, status.control.requests_served, status.control.requests_denied
            ),
            "object_store" => status.object_store.location.clone(),
            "metrics" => format!("{} (scrapes {})", status.metrics.listen, status.metrics.scrapes),
            "gitops" => status
                .gitops_status
                .as_ref()
                .map(|g| {
                    let applied = g
                        .applied_revision
                        .as_deref()
                        .map_or("nothing", |r| &r[..r.len().min(12)]);
                    format!(
                        "{} {}: applied {applied}, {} files managed",
                        g.url, g.reference, g.files_managed
                    )
                })
                .unwrap_or_default(),
            _ => String::new(),
        }
    };
    for (name, health) in status.sections() {
        let mut line = format!("  {:<13} {:<9} {}", name, health.word(), detail(name));
        if let Some(reason) = health.reason() {
            line.push_str(&format!(" {reason}"));
        }
        if matches!(health, Health::Disabled) {
            line = format!("  {:<13} {}", name, health.word());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for job in &status.backup_jobs {
        let result = job.last_result.map(|r| r.as_str()).unwrap_or("never ran");
        let mut line = format!("    backup {:<12} {:<9}", job.job, result);
        if let Some(at) = job.last_success_at {
            let ago = crate::status::unix_now().saturating_sub(at);
            line.push_str(&format!(
                " last success {} ago",
                humantime::format_duration(Duration::from_secs(ago))
            ));
        }
        if let Some(bytes) = job.last_bytes {
            line.push_str(&format!(", {}", human_bytes(bytes)));
        }
        if let Some(next) = job.next_run {
            let until = next.saturating_sub(crate::status::unix_now());
            line.push_str(&format!(
                ", next in {}",
                humantime::format_duration(Duration::from_secs(until))
            ));
        }
        if job.last_result == Some(crate::status::BackupResult::Failure) {
            if let Some(error) = &job.last_error {
                line.push_str(&format!(": {}", error.replace('\n', " ")));
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(wal) = &status.wal_status {
        out.push_str(&format!(
            "    wal {} last {} archived {} conflicts {} failures {} queue {} gaps {}\n",
            wal.mode,
            wal.last_archived.as_deref().unwrap_or("none"),
            wal.archived_total,
            wal.conflicts_total,
            wal.failures_total,
            wal.queue_segments + wal.pending_segments,
            wal.gaps.len()
        ));
    }
    out.push_str(&format!(
        "  {:<13} generation {}, {} files\n",
        "config",
        status.config.generation,
        status.config.files.len()
    ));
    if let Some(err) = &status.config.last_reload_error {
        out.push_str(&format!("  last reload refused: {}\n", err.replace('\n', "; ")));
    }
    if let Some(previous) = &status.agent.previous_run {
        out.push_str(&format!("  previous run: {previous}\n"));
    }
    out
}
