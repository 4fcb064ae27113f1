//! `ps-server`: runs one parameter-server shard until SIGINT or SIGTERM.
//!
//! ```text
//! ps-server --shard 0 --num-shards 2 --listen 0.0.0.0:7000
//! ps-server --config shard0.toml
//! ```
//! Once the shard is ready, the first line on stdout is `listening on ADDR`
//! and, with `--metrics`, the second is `metrics on ADDR` (useful with port 0).

use clap::Parser;

ps_common::jemalloc!();

#[derive(Parser, Debug)]
#[command(version, about = "One shard of the parameter server")]
struct Cli {
    #[command(flatten)]
    args: ps_server::cli::Args,
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
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    ps_server::cli::run(&cli.args)?;
    Ok(())
}
