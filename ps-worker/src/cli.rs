//! Command-line front end of a worker, shared by the `ps-worker` binary and
//! the launcher's `ps-cluster worker` subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::event::{Event, Reporter, StdoutReporter};
use crate::metrics::{MetricsReporter, WorkerMetrics};
use crate::session::WorkerId;
use crate::train;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Run file (TOML) whose [job] table describes the training job.
    #[arg(long, env = "PS_WORKER_CONFIG")]
    pub config: PathBuf,
    /// Shard addresses in shard order, comma-separated (host:port,...).
    #[arg(long, value_delimiter = ',', required = true)]
    pub servers: Vec<String>,
    /// This worker's index, 0..workers (Kubernetes: an indexed Job's
    /// completion index, through `PS_WORKER_INDEX`).
    #[arg(long, env = "PS_WORKER_INDEX")]
    pub index: usize,
    /// Number of workers in the job.
    #[arg(long)]
    pub workers: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9100;
    /// port 0: a free port, told in a `metrics` event on stdout). HTTPS when
    /// the worker has a TLS certificate, which then also needs the
    /// serverAuth usage (`ps-cluster certs` makes them so).
    #[arg(long, env = "PS_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// TLS: this worker's certificate is `worker-INDEX.pem` in --tls-dir.
    #[command(flatten)]
    pub tls: ps_common::transport::TlsArgs,
    /// This worker's bearer token (`ps-cluster token --sub worker:N`), sent
    /// with every call; shards with auth on refuse calls without one.
    #[arg(long, env = "PS_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// Trains one worker; progress events go to stdout as JSON lines.
pub fn run(args: &Args) -> Result<()> {
    let text = ps_common::files::read_text_capped(&args.config, ps_common::files::MAX_TEXT_FILE)
        .map_err(|source| Error::Io { what: format!("reading {}", args.config.display()), source })?;
    let mut config =
        RunConfig::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", args.config.display())))?;
    let transport = &mut config.job.client.transport;
    args.tls.apply(transport, &format!("worker-{}", args.index))?;
    transport.validate()?;
    transport.require_security()?;
    config.job.client.credential =
        ps_common::auth::Credential::from_optional_file(args.token_file.as_deref())?;
    if args.index >= args.workers {
        return Err(Error::Config(format!(
            "--index {} must be below --workers {}",
            args.index, args.workers
        )));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads())
        .enable_all()
        .build()
        .map_err(|source| Error::Io { what: "starting the runtime".into(), source })?;
    let id = WorkerId { index: args.index, count: args.workers };
    let (servers, metrics) = (args.servers.clone(), args.metrics);
    // /metrics over HTTPS with the worker's own certificate, when it has one.
    let metrics_tls = match &config.job.client.transport.tls {
        Some(tls) if metrics.is_some() && tls.cert.is_some() => {
            Some(ps_common::transport::metrics_server_config(tls)?)
        }
        _ => None,
    };
    let https = metrics_tls.is_some();
    let training = async move {
        let Some(addr) = metrics else {
            return train::run(&config.job, &servers, id, &mut StdoutReporter).await;
        };
        let (registry, metrics) = WorkerMetrics::registry(id.index);
        let (bound, task) = ps_common::metrics::serve(addr, Arc::new(registry), metrics_tls)
            .await
            .map_err(|source| Error::Io { what: format!("binding the metrics listener {addr}"), source })?;
        let scheme = if https { "https" } else { "http" };
        tracing::info!(addr = %bound, "metrics on {scheme}://{bound}/metrics");
        StdoutReporter.report(Event::Metrics { worker: id.index, addr: bound });
        let mut reporter = MetricsReporter { inner: &mut StdoutReporter, metrics };
        let result = train::run(&config.job, &servers, id, &mut reporter).await;
        task.abort();
        result
    };
    // The training runs as a task on the runtime's threads, not in
    // `block_on` on this one: there, every answer a runtime thread's I/O
    // driver received had to wake this thread first (measured on the
    // reference run, 2 + 2: 25 to 30% more samples/s as a task).
    runtime.block_on(async move {
        match tokio::spawn(training).await {
            Ok(result) => result,
            // Not cancelled: nothing aborts it, and the runtime outlives it.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    })
}

/// Runtime threads: `PS_THREADS`, default 2 (measured: one thread per process
/// was 10% slower on the reference run with 4 processes on 2 cores, not pinned;
/// the knob is for larger machines). The launcher gives a process it pins to
/// one CPU 1.
fn threads() -> usize {
    std::env::var("PS_THREADS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(2)
}
