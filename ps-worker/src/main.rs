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

/// Reports an error as one line of its causes (`error: what: why`) and
/// exits with status 1. Returned from `main`, anyhow printed each cause
/// twice, and its backtrace whenever `RUST_BACKTRACE` was set, after every
/// mistyped flag or missing file; a panic still prints its own.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", ps_common::error::one_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
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
