fn main() -> std::process::ExitCode {
    platform_agent::cli::main()
}
