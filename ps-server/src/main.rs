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

fn main() -> std::process::ExitCode {
    ps_common::error::exit_code(run())
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
