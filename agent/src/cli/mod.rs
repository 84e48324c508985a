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
            ErrorCode::BadRequest | ErrorCode::TooLarge => 1,
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
    let timeout = match request {
        Request::Reload => Duration::from_secs(60),
        _ => Duration::from_secs(15),
    };
    Client::connect(&path, timeout)?.call(&request)
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
        Command::Run | Command::Config(ConfigCommand::Check { .. }) => unreachable!("handled in main"),
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
