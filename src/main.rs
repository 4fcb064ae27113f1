//! `ps-cluster`: the launcher. With no arguments it trains the reference MLP
//! on MNIST with 2 shard and 2 worker processes on loopback.
//!
//! ```text
//! ps-cluster                      # = ps-cluster train (examples/config/mnist.toml)
//! ps-cluster train --config examples/config/a9a.toml --workers 4
//! ps-cluster sweep examples/sweeps/mnist.toml   # a grid of runs, plots, summary
//! ps-cluster bench                # throughput figures beside same-run baselines
//! ps-cluster status --servers 127.0.0.1:7000,127.0.0.1:7001
//! ps-cluster train --resume runs/<run>                 # continue a stopped run
//! ps-cluster checkpoint --servers A,B --dir ckpts      # checkpoint running shards now
//! ps-cluster export runs/<run>    # the run's model as safetensors + card.json
//! ps-cluster models list          # the model registry: list, show, promote, rollback, diff
//! ps-cluster models export mnist_mlp:2 --format safetensors   # a registered version
//! ps-cluster models register runs/<run>/checkpoints/ckpt-N    # the model a checkpoint holds
//! ps-cluster certs --out tls --workers 4 --hosts hostA,hostB  # a dev CA and certificates
//! ps-cluster token --gen-key --key keys/token.key   # token keys (KEY and KEY.pub)
//! ps-cluster token --key keys/token.key --sub worker:3 --ttl 1h   # a bearer token
//! ps-cluster server ...           # one shard (same flags as ps-server)
//! ps-cluster worker ...           # one worker (same flags as ps-worker)
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use paramserver::artifact::{RunSummary, ShardStats};
use paramserver::render;
use paramserver::run::{self, Plan};
use ps_common::spec::Consistency;
use ps_worker::client::{ClientOptions, ShardedClient};
use ps_worker::config::RunConfig;

/// The reference job, used when no --config is given.
const DEFAULT_CONFIG: &str = include_str!("../examples/config/mnist.toml");

ps_common::jemalloc!();

#[derive(Parser, Debug)]
#[command(version, about = "Parameter-server training: local clusters, experiments, shards and workers")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a job on a local cluster of processes (the default command).
    Train(TrainArgs),
    /// Show each shard's clock table: who is where, who waits on whom.
    Status {
        #[arg(long, value_delimiter = ',', required = true)]
        servers: Vec<String>,
        /// TLS as `admin` (`admin.pem` in --tls-dir), or --plaintext.
        #[command(flatten)]
        tls: ps_common::transport::TlsArgs,
    },
    /// Make a development CA and the certificates of a cluster (PEM; keys
    /// mode 0600): `shard` and `serve` (server), `admin`, `reader` and
    /// `worker-N` (client; the Subject CN is the principal). See
    /// docs/SECURITY.md.
    Certs {
        /// Folder to write (must not hold a CA yet).
        #[arg(long)]
        out: PathBuf,
        /// Worker certificates to make (worker-0 ..).
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// More names or addresses of the shards' (and ps-serve's) hosts,
        /// besides localhost, 127.0.0.1 and ::1.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Print throughput figures, each beside a baseline from the same run.
    Bench {
        /// Epochs of each training measurement.
        #[arg(long, default_value_t = 1)]
        epochs: u32,
        /// Repetitions of each transport and apply measurement.
        #[arg(long, default_value_t = 20)]
        reps: u32,
        /// Run only these sections: training, transport, apply, checkpoint.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Run a grid of jobs (consistency x workers x straggler x seed), each on
    /// its own local cluster, then write results.csv, summary.md and plots.
    /// Rerunning resumes: points with results are skipped.
    Sweep {
        /// Sweep file: a run file plus [grid] (and [sweep]); see examples/sweeps/.
        file: PathBuf,
        /// Sweep folder [default: sweeps/<file stem>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Rerun every point, even those with results.
        #[arg(long)]
        fresh: bool,
        /// List the grid points and whether each is done; run nothing.
        #[arg(long)]
        list: bool,
        /// Rewrite the reports from the run folders; run nothing.
        #[arg(long)]
        report: bool,
    },
    /// Take a checkpoint of running shards now (they must have been started
    /// with --checkpoint-dir DIR; give the same DIR).
    Checkpoint {
        #[arg(long, value_delimiter = ',', required = true)]
        servers: Vec<String>,
        /// The shards' checkpoint folder.
        #[arg(long)]
        dir: PathBuf,
        /// Complete checkpoints to keep in DIR.
        #[arg(long, default_value_t = 3)]
        keep: usize,
        /// TLS as `admin` (`admin.pem` in --tls-dir), or --plaintext.
        #[command(flatten)]
        tls: ps_common::transport::TlsArgs,
        /// Sign the manifest with the keys in this folder (the shards'
        /// signing key; give the shards the same keys).
        #[arg(long, value_name = "KEYDIR")]
        keys: Option<PathBuf>,
    },
    /// Make a key set for signed (and encrypted) checkpoints and registry
    /// artifacts; or, with `reseal`, re-sign a checkpoint (docs/SECURITY.md).
    Keys(KeysArgs),
    /// Export a run's model as safetensors with a model card (docs/EXPORT.md).
    Export {
        /// Run folder (model.msgpack, summary.json, config.toml).
        run_dir: PathBuf,
        /// Output folder [default: RUN_DIR/export].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The model registry: list, show, register, promote, rollback, history, diff, export.
    Models(paramserver::models::Args),
    /// Make token keys, or print a bearer token for one principal
    /// (docs/SECURITY.md, "Roles and credentials").
    Token {
        /// The Ed25519 private key (PEM) that signs tokens; with --gen-key,
        /// where to write a new one (and its public half, KEY.pub).
        #[arg(long)]
        key: PathBuf,
        /// Make a new key pair: KEY (private, mode 0600) and KEY.pub (the
        /// shards' --auth-key).
        #[arg(long, conflicts_with_all = ["sub", "ttl"])]
        gen_key: bool,
        /// Who the token names: admin, reader or worker:N.
        #[arg(long, required_unless_present = "gen_key")]
        sub: Option<String>,
        /// How long the token is valid (e.g. 30m, 1h, 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Run one shard (as `ps-server`).
    Server(ps_server::cli::Args),
    /// Run one worker (as `ps-worker`).
    Worker(ps_worker::cli::Args),
}

#[derive(clap::Args, Debug, Default)]
struct TrainArgs {
    /// Run file (TOML); default: the reference MNIST job.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the number of shard processes.
    #[arg(long)]
    servers: Option<u32>,
    /// Override the number of worker processes.
    #[arg(long)]
    workers: Option<u32>,
    /// Override the number of epochs.
    #[arg(long)]
    epochs: Option<u32>,
    /// Override the consistency model: asp, bsp, or ssp:N.
    #[arg(long, value_parser = paramserver::sweep::parse_consistency)]
    consistency: Option<Consistency>,
    /// Where run folders are created [default: runs].
    #[arg(long)]
    runs_dir: Option<PathBuf>,
    /// Name of the run folder (after a timestamp).
    #[arg(long)]
    name: Option<String>,
    /// Override the push codec of every table: f32, fp16, bf16, int8,
    /// int8:stochastic, top_k:RATIO (per-table codecs: `[job.codecs]`).
    #[arg(long)]
    push_codec: Option<ps_common::compress::Codec>,
    /// Override the training-pull codec of every table: f32, fp16, bf16.
    #[arg(long)]
    pull_codec: Option<ps_common::compress::Codec>,
    /// Sign checkpoints with the keys in DIR (made by `ps-cluster keys`;
    /// with an encryption key, also encrypt them) [default: the run
    /// folder's keys/, made for a new run].
    #[arg(long, value_name = "DIR", conflicts_with = "no_seal")]
    keys: Option<PathBuf>,
    /// Write and read checkpoints unsigned.
    #[arg(long)]
    no_seal: bool,
    /// Fault injection: SIGKILL worker W after S seconds (`W:S`).
    #[arg(long, value_parser = parse_kill)]
    kill_worker: Option<(usize, Duration)>,
    /// Fault injection: SIGKILL shard N after S seconds (`N:S`), and not
    /// before the run's first complete checkpoint; the launcher restarts it
    /// from the newest checkpoint.
    #[arg(long, value_parser = parse_kill)]
    kill_server: Option<(usize, Duration)>,
    /// Continue a stopped run: its run folder (newest checkpoint) or one
    /// checkpoint folder. The run's own config is used; flags that change the
    /// job are refused.
    #[arg(long, conflicts_with_all = ["config", "servers", "workers", "consistency", "name", "push_codec", "pull_codec"])]
    resume: Option<PathBuf>,
    /// Run without TLS (`[cluster] plaintext = true`); by default every
    /// channel uses mutual TLS with certificates made in `<run>/tls/`.
    #[arg(long)]
    plaintext: bool,
}

/// `W:SECONDS`: a process index and a time after the start, finite and at
/// most a day (`0:nan` or `0:1e300` panicked making the `Duration`).
fn parse_kill(s: &str) -> Result<(usize, Duration), String> {
    const MAX: Duration = Duration::from_secs(24 * 3600);
    let (w, t) = s.split_once(':').ok_or_else(|| format!("expected W:SECONDS, got `{s}`"))?;
    let seconds: f64 = t.parse().map_err(|e| format!("{e}"))?;
    let after = Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|&d| d <= MAX)
        .ok_or_else(|| format!("SECONDS must be from 0 to {}, got `{t}`", MAX.as_secs()))?;
    Ok((w.parse().map_err(|e| format!("{e}"))?, after))
}

fn main() -> std::process::ExitCode {
    ps_common::error::exit_code(run())
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default_level = match &cli.command {
        Some(Command::Server(_)) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command.unwrap_or(Command::Train(TrainArgs::default())) {
        Command::Server(args) => Ok(ps_server::cli::run(&args)?),
        Command::Worker(args) => Ok(ps_worker::cli::run(&args)?),
        Command::Models(args) => tokio_runtime()?.block_on(paramserver::models::run(args)),
        Command::Token { key, gen_key: true, .. } => {
            let public = paramserver::credentials::generate_key(&key)?;
            eprintln!(
                "wrote {} (private: keep it) and {} (for the shards' --auth-key)",
                key.display(),
                public.display()
            );
            Ok(())
        }
        Command::Token { key, sub, ttl, .. } => {
            let sub = sub.context("--sub is required")?;
            let ttl = ttl.unwrap_or(Duration::from_secs(3600));
            println!("{}", paramserver::credentials::issue(&key, &sub, ttl)?);
            Ok(())
        }
        Command::Status { servers, tls } => {
            let transport = tls.client_transport("admin")?;
            tokio_runtime()?.block_on(status(servers, transport))
        }
        Command::Checkpoint { servers, dir, keep, tls, keys } => {
            let transport = tls.client_transport("admin")?;
            tokio_runtime()?.block_on(checkpoint(servers, dir, keep, transport, keys))
        }
        Command::Certs { out, workers, hosts, days } => {
            let opts = paramserver::certs::Options { workers, hosts, days };
            let files = paramserver::certs::create(&out, &opts)?;
            println!("wrote {} files to {}", files.len(), out.display());
            Ok(())
        }
        Command::Keys(args) => keys(args),
        Command::Bench { epochs, reps, only } => {
            let exe = std::env::current_exe().context("locating the ps-cluster executable")?;
            let opts = paramserver::bench::BenchOptions { epochs, reps, only };
            // From a task on the runtime's threads, as a worker runs: the
            // transport figures and their TCP baselines measured from
            // `block_on` paid a wake-up of the main thread per answer.
            let bench = async move { paramserver::bench::run_all(&exe, DEFAULT_CONFIG, &opts).await };
            Ok(tokio_runtime()?.block_on(async { tokio::spawn(bench).await })??)
        }
        Command::Sweep { file, out, fresh, list, report } => {
            let exe = std::env::current_exe().context("locating the ps-cluster executable")?;
            let opts = paramserver::sweep::Options { file, out, fresh, list, report_only: report, exe };
            let rows = tokio_runtime()?.block_on(paramserver::sweep::run(&opts))?;
            if !list && !rows.is_empty() {
                println!("{}", render::sweep_summary(&opts.out_dir()));
            }
            Ok(())
        }
        Command::Export { run_dir, out } => {
            let paths = paramserver::export::export_run(&run_dir, out.as_deref())?;
            println!("wrote {} and {}", paths.model.display(), paths.card.display());
            Ok(())
        }
        Command::Train(args) => {
            let summary = tokio_runtime()?.block_on(train(args))?;
            if !summary.failed.is_empty() {
                anyhow::bail!("{} worker(s) failed: {:?}", summary.failed.len(), summary.failed);
            }
            Ok(())
        }
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

async fn train(args: TrainArgs) -> anyhow::Result<RunSummary> {
    if let Some(path) = &args.resume {
        return resume(path, &args).await;
    }
    let (text, source) = match &args.config {
        Some(p) => (
            ps_common::files::read_text_capped(p, ps_common::files::MAX_TEXT_FILE)
                .with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (DEFAULT_CONFIG.to_string(), "built-in examples/config/mnist.toml".to_string()),
    };
    let mut config = RunConfig::from_toml(&text).with_context(|| format!("in {source}"))?;
    if let Some(v) = args.servers {
        config.cluster.servers = v;
    }
    if let Some(v) = args.workers {
        config.cluster.workers = v;
    }
    if let Some(v) = args.epochs {
        config.job.epochs = v;
    }
    if let Some(v) = args.consistency {
        config.job.consistency = v;
    }
    if let Some(v) = args.push_codec {
        config.job.codecs.push = v;
    }
    if let Some(v) = args.pull_codec {
        config.job.codecs.pull = v;
    }
    if args.plaintext {
        config.cluster.plaintext = true;
    }
    config.validate()?;
    let name = args.name.clone().unwrap_or_else(|| {
        args.config
            .as_ref()
            .and_then(|p| p.file_stem())
            .map_or("mnist".into(), |s| s.to_string_lossy().into_owned())
    });
    let run_dir = paramserver::cluster::new_run_dir(
        args.runs_dir.as_deref().unwrap_or(std::path::Path::new("runs")),
        &name,
    )?;
    eprintln!(
        "training {} on {} shard(s) and {} worker(s), {}; run folder {}\n\
         (Prometheus metrics of every process: the URLs in {})",
        source,
        config.cluster.servers,
        config.cluster.workers,
        config.job.consistency,
        run_dir.display(),
        run_dir.join(paramserver::cluster::METRICS_FILE).display()
    );
    let seal = match (&args.keys, args.no_seal) {
        (_, true) => Some(ps_common::seal::KeyPaths::default()),
        (Some(k), false) => Some(run::checkpoint_keys(&run_dir, Some(k), false)?),
        (None, false) => None,
    };
    execute(config, run_dir, None, seal, &args).await
}

/// `train --resume PATH`: PATH is a run folder (its newest checkpoint) or a
/// checkpoint folder inside one (`<run>/checkpoints/ckpt-N`).
async fn resume(path: &std::path::Path, args: &TrainArgs) -> anyhow::Result<RunSummary> {
    let run_dir = if path.join("config.toml").exists() {
        path.to_path_buf()
    } else {
        let run = path.parent().and_then(|p| p.parent()).filter(|r| r.join("config.toml").exists());
        run.with_context(|| format!("{} is neither a run folder nor a checkpoint in one", path.display()))?
            .to_path_buf()
    };
    let config_path = run_dir.join("config.toml");
    let text = ps_common::files::read_text_capped(&config_path, ps_common::files::MAX_TEXT_FILE)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let mut config = RunConfig::from_toml(&text).with_context(|| format!("in {}", config_path.display()))?;
    if let Some(v) = args.epochs {
        config.job.epochs = v;
    }
    if args.plaintext {
        config.cluster.plaintext = true;
    }
    let ckpt_path = if path == run_dir { run::checkpoint_root(&run_dir) } else { path.to_path_buf() };
    let seal = match (&args.keys, args.no_seal) {
        (_, true) => ps_common::seal::KeyPaths::default(),
        (keys, false) => run::checkpoint_keys(&run_dir, keys.as_deref(), false)?,
    };
    if seal.is_empty() && !args.no_seal {
        eprintln!("{} has no keys/: its checkpoints are unsigned and stay so", run_dir.display());
    }
    let ckpt = ps_server::checkpoint::resolve(&ckpt_path, &seal.load()?)?;
    let m = &ckpt.manifest;
    if m.num_shards != config.cluster.servers {
        anyhow::bail!(
            "{} holds {} shards; the run has {}",
            ckpt.dir.display(),
            m.num_shards,
            config.cluster.servers
        );
    }
    if m.job.as_deref().is_some_and(|job| job != config.fingerprint()) {
        anyhow::bail!("{} was taken of another job than {}", ckpt.dir.display(), config_path.display());
    }
    let cut: Vec<String> = m.workers.iter().map(|w| format!("worker {} at {}", w.worker, w.clock)).collect();
    eprintln!("resuming {} from {} ({})", run_dir.display(), ckpt.dir.display(), cut.join(", "));
    execute(config, run_dir, Some(ckpt.dir.clone()), Some(seal), args).await
}

async fn execute(
    config: RunConfig,
    run_dir: PathBuf,
    resume_from: Option<PathBuf>,
    seal: Option<ps_common::seal::KeyPaths>,
    args: &TrainArgs,
) -> anyhow::Result<RunSummary> {
    let exe = std::env::current_exe().context("locating the ps-cluster executable")?;
    let bars = render::Bars::new();
    let plan = Plan {
        kill_worker_after: args.kill_worker,
        kill_server_after: args.kill_server,
        resume_from,
        seal,
        ..Plan::new(&exe, config, run_dir)
    };
    let summary = run::run(plan, |w, e| bars.update(w, e)).await?;
    bars.finish();
    print!("{}", render::run_summary(&summary));
    Ok(summary)
}

async fn checkpoint(
    servers: Vec<String>,
    dir: PathBuf,
    keep: usize,
    transport: ps_common::transport::TransportConfig,
    keys: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut opts = ps_server::checkpoint::coordinator::Options::new(dir);
    opts.keep = keep.max(1);
    opts.transport = transport;
    opts.credential = paramserver::credentials::from_env()?;
    if let Some(k) = keys {
        opts.keys = ps_common::seal::KeyPaths::in_dir(&k).load()?;
    }
    let m = ps_server::checkpoint::coordinator::take_once(&servers, &opts).await?;
    let cut: Vec<String> = m.workers.iter().map(|w| format!("worker {} at {}", w.worker, w.clock)).collect();
    println!(
        "checkpoint {} complete: {} shard files, {} bytes; pushes held at most {:.1} ms; {:.1} ms in all; cut: {}",
        opts.root.join(&m.name).display(),
        m.shards.len(),
        m.bytes(),
        m.held_ms,
        m.total_ms,
        if cut.is_empty() { "no workers".to_string() } else { cut.join(", ") }
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
struct KeysArgs {
    /// Folder to write signing.key (0600), verify.pub and, with --encrypt,
    /// encryption.key (0600); existing key files are never overwritten.
    #[arg(long, required_unless_present = "reseal")]
    out: Option<PathBuf>,
    /// Also make an AES-256-GCM key: files sealed with it are encrypted.
    #[arg(long)]
    encrypt: bool,
    /// Re-sign this checkpoint folder (`<run>/checkpoints/ckpt-N`) with the
    /// keys in --with (a checkpoint written unsigned, or under old keys).
    #[arg(long, value_name = "CHECKPOINT", conflicts_with_all = ["out", "encrypt"])]
    reseal: Option<PathBuf>,
    /// With --reseal: the keys to sign with (none: remove the seal).
    #[arg(long = "with", value_name = "KEYDIR", requires = "reseal")]
    with_keys: Option<PathBuf>,
    /// With --reseal: the keys it is sealed with now (none: unsigned).
    #[arg(long, value_name = "KEYDIR", requires = "reseal")]
    from: Option<PathBuf>,
}

/// `ps-cluster keys`: a new key set, or a checkpoint re-sealed.
fn keys(args: KeysArgs) -> anyhow::Result<()> {
    let load = |dir: &Option<PathBuf>| match dir {
        Some(d) => ps_common::seal::KeyPaths::in_dir(d).load(),
        None => Ok(ps_common::seal::Keys::none()),
    };
    if let Some(ckpt) = &args.reseal {
        let (from, to) = (load(&args.from)?, load(&args.with_keys)?);
        let m = ps_server::checkpoint::reseal(ckpt, &from, &to)?;
        let how = to.fingerprint().map_or("unsigned".to_string(), |f| format!("signed by key {}", &f[..16]));
        println!("{}: {} shard files and the manifest rewritten, {how}", ckpt.display(), m.shards.len());
        return Ok(());
    }
    let out = args.out.context("--out DIR is required")?;
    let paths = ps_common::seal::generate(&out, args.encrypt)?;
    let keys = paths.load()?;
    for p in [&paths.signing_key, &paths.verify_key, &paths.encryption_key].into_iter().flatten() {
        println!("wrote {}", p.display());
    }
    println!("verify key fingerprint (SHA-256): {}", keys.fingerprint().unwrap_or_default());
    Ok(())
}

async fn status(
    servers: Vec<String>,
    transport: ps_common::transport::TransportConfig,
) -> anyhow::Result<()> {
    let opts = ClientOptions {
        transport,
        credential: paramserver::credentials::from_env()?,
        ..ClientOptions::default()
    };
    let client = ShardedClient::connect(&servers, u64::MAX, opts).await?;
    let stats: Vec<ShardStats> = client.stats().await?.iter().map(ShardStats::from_wire).collect();
    print!("{}", render::status(&stats));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kill time that is not a finite number of seconds up to a day is
    /// refused by the flag's parser (`0:nan`, `0:-1` and `0:1e300` panicked
    /// when the run started).
    #[test]
    fn kill_times_are_finite_and_bounded() {
        assert_eq!(parse_kill("1:2.5"), Ok((1, Duration::from_millis(2500))));
        for bad in ["0:nan", "0:-1", "0:1e300", "0:inf", "0:86401", "0", "x:1"] {
            assert!(parse_kill(bad).is_err(), "{bad} was accepted");
        }
    }

    /// The options `ps_common::jemalloc!` defines reach jemalloc: its
    /// `malloc_conf` symbol is this binary's (a renamed symbol prefix in a
    /// new tikv-jemalloc-sys would leave jemalloc on its defaults).
    #[test]
    fn jemalloc_purges_on_its_background_threads() {
        let (mut on, mut len) = (false, std::mem::size_of::<bool>());
        // SAFETY: a NUL-terminated name of a bool mallctl, read into a bool
        // whose size is given; nothing is written to jemalloc.
        let code = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"opt.background_thread".as_ptr(),
                (&raw mut on).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(code, 0, "mallctl opt.background_thread");
        assert!(on, "jemalloc runs without its background threads: malloc_conf was not read");
    }
}
