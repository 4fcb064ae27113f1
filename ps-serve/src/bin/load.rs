//! `ps-serve-load`: a closed-loop load generator for `ps-serve`.
//!
//! N tasks each send a request, wait for its answer, and send the next, for
//! a fixed time, over gRPC or HTTP/JSON. It prints requests/s and latency
//! percentiles per concurrency, the failed requests, and the versions that
//! answered. With `--baseline`, it first times the bare in-process forward
//! pass of the same model version (loaded from the registry), batch 1 and
//! batch `--baseline-batch`, in the same run: the ceiling the service is
//! measured against.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ps_registry::Registry;
use ps_serve::grpc::pb::{self, prediction_client::PredictionClient};
use ps_serve::model::{Inputs, Servable};
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Interface {
    Grpc,
    Http,
}

/// Closed-loop load on a ps-serve MLP model (MNIST-shaped inputs).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// gRPC or HTTP.
    #[arg(long, value_enum, default_value = "grpc")]
    interface: Interface,
    /// The server's address for that interface.
    #[arg(long, default_value = "127.0.0.1:8500")]
    addr: String,
    /// The model name.
    #[arg(long, default_value = "mnist_mlp")]
    model: String,
    /// Concurrent requests, one measurement each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    concurrency: Vec<usize>,
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of load before each measurement, not counted.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Examples per request.
    #[arg(long, default_value_t = 1)]
    rows: usize,
    /// Features per example.
    #[arg(long, default_value_t = 784)]
    features: usize,
    /// Also time the bare forward pass of the served version, loaded from
    /// the registry.
    #[arg(long)]
    baseline: bool,
    /// The baseline's large batch.
    #[arg(long, default_value_t = 64)]
    baseline_batch: usize,
    /// Registry database [default: sqlite://<registry-root>/registry.db].
    #[arg(long, env = "PS_REGISTRY")]
    registry: Option<String>,
    #[arg(long, env = "PS_REGISTRY_ROOT", default_value = "registry")]
    registry_root: PathBuf,
    /// A label for the printed rows (e.g. "batching").
    #[arg(long, default_value = "")]
    tag: String,
}

/// What one measurement saw.
#[derive(Default)]
struct Tally {
    /// Latency of each successful request, in microseconds.
    latencies: Vec<u32>,
    failed: u64,
    /// The first few failure messages.
    errors: Vec<String>,
    /// Answers per model version.
    versions: BTreeMap<i64, u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.failed += other.failed;
        for e in other.errors {
            if self.errors.len() < 5 {
                self.errors.push(e);
            }
        }
        for (v, n) in other.versions {
            *self.versions.entry(v).or_default() += n;
        }
    }
}

/// One request's sender.
#[derive(Clone)]
enum Sender {
    Grpc(PredictionClient<tonic::transport::Channel>, pb::PredictRequest),
    Http(Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>, hyper::Uri, Bytes),
}

impl Sender {
    /// Sends one request; the version that answered.
    async fn send(&mut self) -> anyhow::Result<i64> {
        match self {
            Sender::Grpc(client, req) => {
                let r = client.predict(req.clone()).await?.into_inner();
                Ok(r.version)
            }
            Sender::Http(client, uri, body) => {
                let req = hyper::Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))?;
                let resp = client.request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&body)?;
                if !status.is_success() {
                    bail!("HTTP {status}: {}", v["error"]);
                }
                v["model_version"].as_i64().context("the answer names no model_version")
            }
        }
    }
}

async fn run_load(sender: &Sender, concurrency: usize, warmup: Duration, measure: Duration) -> Tally {
    let start = Instant::now();
    let (measure_from, end) = (start + warmup, start + warmup + measure);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut sender = sender.clone();
            tokio::spawn(async move {
                let mut t = Tally::default();
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let r = sender.send().await;
                    if sent < measure_from {
                        continue;
                    }
                    match r {
                        Ok(v) => {
                            t.latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            *t.versions.entry(v).or_default() += 1;
                        }
                        Err(e) => {
                            t.failed += 1;
                            if t.errors.len() < 5 {
                                t.errors.push(format!("{e:#}"));
                            }
                        }
                    }
                }
                t
            })
        })
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        if let Ok(t) = t.await {
            all.merge(t);
        }
    }
    all
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn row(name: &str, concurrency: &str, requests: usize, per_s: f64, p50: f64, p99: f64, rest: &str) {
    println!("{name:<26} {concurrency:>4} {requests:>9} {per_s:>10.0} {p50:>8.3} {p99:>8.3}  {rest}");
}

/// Times `model.predict` on batches of `rows` for about `seconds`:
/// (examples/s, mean ms per call).
fn bare(model: &Servable, rows: usize, features: usize, seconds: f64) -> (f64, f64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let inputs =
        Inputs::Dense { width: features, values: (0..rows * features).map(|_| rng.random()).collect() };
    let mut out = Vec::new();
    let (start, mut calls) = (Instant::now(), 0u64);
    while start.elapsed().as_secs_f64() < seconds {
        model.predict(&inputs, &mut out).expect("the baseline's inputs fit the model");
        calls += 1;
    }
    let s = start.elapsed().as_secs_f64();
    (calls as f64 * rows as f64 / s, s * 1000.0 / calls as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rows == 0 || args.concurrency.contains(&0) {
        bail!("--rows and --concurrency must be positive");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let values: Vec<f32> = (0..args.rows * args.features).map(|_| rng.random()).collect();
    let sender = match args.interface {
        Interface::Grpc => {
            let client = PredictionClient::connect(format!("http://{}", args.addr))
                .await
                .with_context(|| format!("connecting to {}", args.addr))?;
            let req = pb::PredictRequest {
                model: args.model.clone(),
                version: 0,
                inputs: Some(pb::predict_request::Inputs::Dense(pb::DenseInputs {
                    width: args.features as u32,
                    values: values.clone(),
                })),
            };
            Sender::Grpc(client, req)
        }
        Interface::Http => {
            let instances: Vec<&[f32]> = values.chunks(args.features).collect();
            let body = serde_json::to_vec(&serde_json::json!({ "instances": instances }))?;
            let uri: hyper::Uri = format!("http://{}/v1/models/{}:predict", args.addr, args.model).parse()?;
            let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build_http();
            Sender::Http(client, uri, Bytes::from(body))
        }
    };
    // One request first: the server answers, and names its version.
    let version = sender.clone().send().await.context("the first request failed")?;
    println!(
        "ps-serve-load: {:?} {} model {} (version {version}), {} example(s) of {} features per request, {} s per point",
        args.interface, args.addr, args.model, args.rows, args.features, args.seconds
    );
    println!(
        "{:<26} {:>4} {:>9} {:>10} {:>8} {:>8}  failed / versions",
        "what", "conc", "requests", "per_s", "p50_ms", "p99_ms"
    );
    if args.baseline {
        let (url, root) = ps_registry::location(args.registry.clone(), Some(args.registry_root.clone()));
        let registry = Registry::open(&url, &root).await.with_context(|| format!("opening {url}"))?;
        let saved = registry.load(&registry.version(&args.model, version).await?)?;
        let model = Servable::new(saved)?;
        for rows in [1, args.baseline_batch] {
            let (per_s, ms) = bare(&model, rows, args.features, args.seconds.min(3.0));
            let name = format!("bare forward, batch {rows}");
            row(&name, "-", 0, per_s, ms, f64::NAN, "examples/s, in process");
        }
    }
    for &c in &args.concurrency {
        let mut t =
            run_load(&sender, c, Duration::from_secs_f64(args.warmup), Duration::from_secs_f64(args.seconds))
                .await;
        t.latencies.sort_unstable();
        let n = t.latencies.len();
        let versions: Vec<String> = t.versions.iter().map(|(v, n)| format!("v{v}:{n}")).collect();
        let name = format!("{:?} {}", args.interface, args.tag).trim().to_lowercase();
        row(
            &name,
            &c.to_string(),
            n,
            n as f64 / args.seconds,
            percentile(&t.latencies, 0.5),
            percentile(&t.latencies, 0.99),
            &format!("{} failed / {}", t.failed, versions.join(" ")),
        );
        for e in &t.errors {
            println!("    failure: {e}");
        }
    }
    Ok(())
}
