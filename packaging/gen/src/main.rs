//! `platform-agent-gen OUT_DIR`: writes bash/zsh/fish completions and the
//! man page, generated from the same clap definition the binary parses with,
//! so they cannot drift from `--help`.

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;
use platform_agent::cli::Cli;

fn main() -> std::io::Result<()> {
    let out: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/packaging/gen"));
    std::fs::create_dir_all(out.join("completions"))?;
    let mut command = Cli::command();
    for (shell, file) in [
        (Shell::Bash, "platform-agent.bash"),
        (Shell::Zsh, "_platform-agent"),
        (Shell::Fish, "platform-agent.fish"),
    ] {
        let mut buffer = Vec::new();
        clap_complete::generate(shell, &mut command, "platform-agent", &mut buffer);
        std::fs::write(out.join("completions").join(file), buffer)?;
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).section("8").render(&mut page)?;
    std::fs::write(out.join("platform-agent.8"), page)?;
    Ok(())
}
