//! `ps-serve-load`: a closed-loop load generator for `ps-serve`.
//!
//! N tasks each send a request, wait for its answer, and send the next, for
//! a fixed time, over gRPC or HTTP/JSON. It prints requests/s and latency
//! percentiles per concurrency, the failed requests, and the versions that
//! answered. With `--baseline`, it first times the bare in-process forward
//! pass of the same model version (loaded from the registry), batch 1 and
//! batch `--baseline-batch`, in the same run: the ceiling the service is
//! measured against.
//!
//! Like every client here it speaks TLS (`--tls-dir`, with the `reader`
//! certificate for a server that asks for one) or, when told,
//! `--plaintext`: gRPC over TLS, or HTTPS with one connection per task.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
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
use ps_worker::data::{Split, load_mnist};

/// Pixels per MNIST image.
const FEATURES: usize = 784;

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
    /// The MNIST folder whose test images the requests carry, in turn.
    #[arg(long, default_value = "data/mnist")]
    mnist: PathBuf,
    /// Before the load, predict the whole MNIST test set through the
    /// service and print its accuracy beside the registry's.
    #[arg(long)]
    score: bool,
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
    /// Check every answer against the bare forward pass of the version it
    /// names (loaded from the registry); a mismatch counts as a failure.
    #[arg(long)]
    verify: bool,
    /// A label for the printed rows (e.g. "batching").
    #[arg(long, default_value = "")]
    tag: String,
    #[command(flatten)]
    tls: ps_common::transport::TlsArgs,
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

/// One client: the requests it sends, in turn.
#[derive(Clone)]
struct Sender {
    link: Link,
    /// Each request's examples, row-major, and their HTTP body.
    payloads: Arc<Vec<(Vec<f32>, Bytes)>>,
    next: usize,
    /// The payload of the last request sent.
    last: usize,
    model: String,
    verifier: Option<Arc<Verifier>>,
}

/// Checks answers against the bare forward pass of the version they name.
struct Verifier {
    registry: Arc<Registry>,
    model: String,
    versions: tokio::sync::Mutex<BTreeMap<i64, Arc<Servable>>>,
}

impl Verifier {
    async fn check(&self, version: i64, inputs: &[f32], outputs: &[f32]) -> anyhow::Result<()> {
        let model = {
            let mut versions = self.versions.lock().await;
            match versions.get(&version) {
                Some(m) => Arc::clone(m),
                None => {
                    let saved = self.registry.load(&self.registry.version(&self.model, version).await?)?;
                    let m = Arc::new(Servable::new(saved)?);
                    versions.insert(version, Arc::clone(&m));
                    m
                }
            }
        };
        let mut want = Vec::new();
        model.predict(&Inputs::Dense { width: FEATURES, values: inputs.to_vec() }, &mut want)?;
        if want.len() != outputs.len() || want.iter().zip(outputs).any(|(a, b)| (a - b).abs() > 1e-5) {
            bail!("version {version} answered outputs that are not its own");
        }
        Ok(())
    }
}

// One per client task: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Link {
    Grpc(PredictionClient<tonic::transport::Channel>),
    Http(Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>, hyper::Uri),
    /// HTTPS: each task opens its own connection on its first request.
    Https(Https, hyper::Uri, Own),
}

/// A task's own HTTPS connection, opened on first use; a clone (another
/// task) opens its own.
#[derive(Default)]
struct Own(Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>);

impl Clone for Own {
    fn clone(&self) -> Own {
        Own(None)
    }
}

/// How to open an HTTPS connection to the server.
#[derive(Clone)]
struct Https {
    addr: String,
    name: rustls_pki_types::ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
}

impl Https {
    async fn connect(&self) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect(&self.addr).await?;
        tcp.set_nodelay(true)?;
        let tls = self.connector.connect(self.name.clone(), tcp).await?;
        let (send, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(send)
    }
}

impl Sender {
    /// Sends the next request; the version that answered and the outputs.
    async fn send(&mut self) -> anyhow::Result<(i64, Vec<f32>)> {
        let (values, body) = &self.payloads[self.next % self.payloads.len()];
        self.last = self.next % self.payloads.len();
        self.next += 1;
        match &mut self.link {
            Link::Grpc(client) => {
                let req = pb::PredictRequest {
                    model: self.model.clone(),
                    version: 0,
                    inputs: Some(pb::predict_request::Inputs::Dense(pb::DenseInputs {
                        width: FEATURES as u32,
                        values: values.clone(),
                    })),
                };
                let r = client.predict(req).await?.into_inner();
                Ok((r.version, r.outputs))
            }
            Link::Http(..) | Link::Https(..) => {
                let post = |uri: &hyper::Uri| {
                    hyper::Request::post(uri.clone())
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                };
                let resp = match &mut self.link {
                    Link::Http(client, uri) => client.request(post(uri)?).await?,
                    Link::Https(https, uri, Own(connection)) => {
                        if connection.as_ref().is_none_or(|c| c.is_closed()) {
                            *connection = Some(https.connect().await?);
                        }
                        let send = connection.as_mut().context("no connection")?;
                        let mut req = post(uri)?;
                        let host = uri.authority().map(|a| a.as_str()).unwrap_or_default();
                        req.headers_mut().insert(hyper::header::HOST, host.parse()?);
                        send.send_request(req).await?
                    }
                    Link::Grpc(_) => unreachable!("matched above"),
                };
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&body)?;
                if !status.is_success() {
                    bail!("HTTP {status}: {}", v["error"]);
                }
                let version = v["model_version"].as_i64().context("the answer names no model_version")?;
                let outputs = v["predictions"]
                    .as_array()
                    .context("no predictions")?
                    .iter()
                    .flat_map(|row| row.as_array().into_iter().flatten())
                    .map(|p| p.as_f64().map(|p| p as f32).context("a prediction is not a number"))
                    .collect::<anyhow::Result<_>>()?;
                Ok((version, outputs))
            }
        }
    }
}

/// `rows`-example requests cut from `x` (row-major images), with their HTTP
/// bodies.
fn payloads(x: &[f32], rows: usize) -> anyhow::Result<Vec<(Vec<f32>, Bytes)>> {
    x.chunks(rows * FEATURES)
        .map(|values| {
            let instances: Vec<&[f32]> = values.chunks(FEATURES).collect();
            let body = serde_json::to_vec(&serde_json::json!({ "instances": instances }))?;
            Ok((values.to_vec(), Bytes::from(body)))
        })
        .collect()
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
                    let mut r = sender.send().await;
                    if let (Some(verifier), Ok((v, outputs))) = (&sender.verifier, &r) {
                        let inputs = &sender.payloads[sender.last].0;
                        if let Err(e) = verifier.check(*v, inputs, outputs).await {
                            r = Err(e);
                        }
                    }
                    if sent < measure_from {
                        continue;
                    }
                    match r {
                        Ok((v, _)) => {
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

/// Times `model.predict` on batches of `rows` images of `x` in turn, for
/// about `seconds`: (examples/s, mean ms per call).
fn bare(model: &Servable, x: &[f32], rows: usize, seconds: f64) -> (f64, f64) {
    let batches: Vec<Inputs> = x
        .chunks_exact(rows * FEATURES)
        .map(|v| Inputs::Dense { width: FEATURES, values: v.to_vec() })
        .collect();
    let mut out = Vec::new();
    let (start, mut calls) = (Instant::now(), 0u64);
    while start.elapsed().as_secs_f64() < seconds {
        let inputs = &batches[calls as usize % batches.len()];
        model.predict(inputs, &mut out).expect("the baseline's inputs fit the model");
        calls += 1;
    }
    let s = start.elapsed().as_secs_f64();
    (calls as f64 * rows as f64 / s, s * 1000.0 / calls as f64)
}

fn main() -> std::process::ExitCode {
    ps_common::error::exit_code(run())
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rows == 0 || args.concurrency.contains(&0) {
        bail!("--rows and --concurrency must be positive");
    }
    let test = load_mnist(&args.mnist, Split::Test)
        .with_context(|| format!("reading the MNIST test set in {}", args.mnist.display()))?;
    let x = test.x.as_slice().context("MNIST images are row-major")?;
    let transport = args.tls.client_transport("reader")?;
    let link = match (args.interface, &transport.tls) {
        (Interface::Grpc, _) => {
            let endpoint = ps_common::transport::endpoint(&transport, &args.addr)?;
            let channel = endpoint.connect().await.with_context(|| format!("connecting to {}", args.addr))?;
            Link::Grpc(PredictionClient::new(channel))
        }
        (Interface::Http, None) => {
            let uri: hyper::Uri = format!("http://{}/v1/models/{}:predict", args.addr, args.model).parse()?;
            Link::Http(Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build_http(), uri)
        }
        (Interface::Http, Some(tls)) => {
            let uri: hyper::Uri =
                format!("https://{}/v1/models/{}:predict", args.addr, args.model).parse()?;
            let host = tls.server_name.clone().unwrap_or_else(|| uri.host().unwrap_or_default().to_string());
            let mut config = ps_common::transport::rustls_client_config(tls)?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let https = Https {
                addr: args.addr.clone(),
                name: rustls_pki_types::ServerName::try_from(host)?,
                connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            };
            Link::Https(https, uri, Own::default())
        }
    };
    let mut sender = Sender {
        link,
        payloads: Arc::new(payloads(x, args.rows)?),
        next: 0,
        last: 0,
        model: args.model.clone(),
        verifier: None,
    };
    // One request first: the server answers, and names its version.
    let (version, _) = sender.clone().send().await.context("the first request failed")?;
    println!(
        "ps-serve-load: {:?} {} model {} (version {version}), {} MNIST test image(s) per request, {} s per point",
        args.interface, args.addr, args.model, args.rows, args.seconds
    );
    let registry = match args.baseline || args.score || args.verify {
        true => {
            let (url, root) = ps_registry::location(args.registry.clone(), Some(args.registry_root.clone()));
            Some(Arc::new(Registry::open(&url, &root).await.with_context(|| format!("opening {url}"))?))
        }
        false => None,
    };
    if let Some(registry) = registry.as_ref().filter(|_| args.verify) {
        let versions = tokio::sync::Mutex::default();
        let registry = Arc::clone(registry);
        sender.verifier = Some(Arc::new(Verifier { registry, model: args.model.clone(), versions }));
    }
    if let Some(registry) = registry.as_ref().filter(|_| args.score) {
        let mut scorer = Sender { payloads: Arc::new(payloads(x, 100)?), ..sender.clone() };
        let mut correct = 0usize;
        for batch in test.y.chunks(100) {
            let (v, outputs) = scorer.send().await?;
            if v != version {
                bail!("the served version changed from {version} to {v} while scoring");
            }
            for (probs, &label) in outputs.chunks(10).zip(batch) {
                let best = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
                correct += usize::from(best == Some(label as usize));
            }
        }
        // Online weights (version 0) have no registry entry.
        let registered = match version {
            0 => None,
            v => registry.version(&args.model, v).await?.metrics.get("test_accuracy").copied(),
        };
        println!(
            "served accuracy on the {} MNIST test images: {:.4} (the registry's test_accuracy of version {version}: {})",
            test.y.len(),
            correct as f64 / test.y.len() as f64,
            registered.map_or("none".into(), |a| format!("{a:.4}"))
        );
    }
    if let Some(registry) = registry.as_ref().filter(|_| args.baseline) {
        let saved = registry.load(&registry.version(&args.model, version).await?)?;
        let model = Servable::new(saved)?;
        for rows in [1, args.baseline_batch] {
            let (per_s, ms) = bare(&model, x, rows, args.seconds.min(3.0));
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
