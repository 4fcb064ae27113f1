//! `ps-worker`: trains one worker of a job against running shards.
//!
//! ```text
//! ps-worker --config run.toml --servers 10.0.0.1:7000,10.0.0.2:7000 --index 0 --workers 2
//! ```
//! Progress goes to stdout as JSON lines (one event each); logs go to stderr.

use clap::Parser;

ps_common::jemalloc!();

#[derive(Parser, Debug)]
#[command(version, about = "One training worker of the parameter server")]
struct Cli {
    #[command(flatten)]
    args: ps_worker::cli::Args,
}

fn main() -> std::process::ExitCode {
    ps_common::error::exit_code(run())
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    ps_worker::cli::run(&cli.args)?;
    Ok(())
}
