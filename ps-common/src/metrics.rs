//! Prometheus metrics shared by every process: the per-RPC layer of every
//! tonic server, the process collector, and the `/metrics` endpoint.
//!
//! Each process owns one [`Registry`] (a value, never a global: shards
//! started in one test process keep their own). What a process already
//! counts (a shard's store counters, its clock set) is read at scrape time by
//! a [`prometheus_client::collector::Collector`]; what nothing counted yet
//! (RPC latencies, waits, phase times) is a histogram of its own.
//!
//! [`RpcMetrics`] follows go-grpc-prometheus's names, which Grafana
//! dashboards know: `grpc_server_handled_total{grpc_service, grpc_method,
//! grpc_code}` and `grpc_server_handling_seconds`, plus the wire bytes of
//! each method (`grpc_server_received_bytes_total`, `..._sent_bytes_total`:
//! gRPC frames as they travel, compressed or not, before HTTP/2 framing).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::Frame;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;
use tonic::body::Body;

/// The content type of the text exposition format written by [`render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets from 100 us to 30 s (1, 2.5, 5 a decade): an RPC on
/// loopback takes under a millisecond, a BSP read may wait for seconds.
pub const LATENCY_BUCKETS: [f64; 17] =
    [1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A histogram with [`latency_buckets`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: String,
    grpc_method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_code: &'static str,
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// Per-RPC counts, latencies and bytes of one process's gRPC servers.
#[derive(Clone, Debug)]
pub struct RpcMetrics {
    handled: Family<HandledLabels, Counter>,
    seconds: HistogramFamily,
    received: Family<MethodLabels, Counter>,
    sent: Family<MethodLabels, Counter>,
}

impl RpcMetrics {
    /// Registers the RPC metrics in `registry`.
    pub fn register(registry: &mut Registry) -> RpcMetrics {
        let m = RpcMetrics {
            handled: Family::default(),
            seconds: Family::new_with_constructor(latency_histogram),
            received: Family::default(),
            sent: Family::default(),
        };
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, by method and gRPC status code",
            m.handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Time from a request's headers to the end of its response, by method",
            m.seconds.clone(),
        );
        registry.register(
            "grpc_server_received_bytes",
            "Request body bytes received (gRPC frames), by method",
            m.received.clone(),
        );
        registry.register(
            "grpc_server_sent_bytes",
            "Response body bytes sent (gRPC frames), by method",
            m.sent.clone(),
        );
        m
    }

    /// Metrics that go nowhere (a server nobody scrapes, in tests).
    pub fn unregistered() -> RpcMetrics {
        RpcMetrics::register(&mut Registry::default())
    }

    /// The tower layer that measures every RPC of a server.
    pub fn layer(&self) -> RpcLayer {
        RpcLayer(self.clone())
    }
}

/// See [`RpcMetrics::layer`].
#[derive(Clone, Debug)]
pub struct RpcLayer(RpcMetrics);

impl<S> tower_layer::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService { inner, metrics: self.0.clone() }
    }
}

/// The service made by [`RpcLayer`].
#[derive(Clone, Debug)]
pub struct RpcService<S> {
    inner: S,
    metrics: RpcMetrics,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// `/pkg.Service/Method` -> (`pkg.Service`, `Method`); anything else is one
/// label value, `other` (a scanner's path must not grow the label set).
fn method_labels(path: &str) -> MethodLabels {
    let split = path.strip_prefix('/').and_then(|p| p.split_once('/'));
    let (service, method) = match split {
        Some((s, m)) if !s.is_empty() && !m.is_empty() && !m.contains('/') && s.len() + m.len() < 128 => {
            (s, m)
        }
        _ => ("other", "other"),
    };
    MethodLabels { grpc_service: service.to_string(), grpc_method: method.to_string() }
}

/// gRPC status codes by number, as go-grpc-prometheus names them.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The name of the `grpc-status` in `headers`, if there is one.
fn code_of(headers: &http::HeaderMap) -> Option<&'static str> {
    let v = headers.get("grpc-status")?;
    let n: usize = v.to_str().ok()?.parse().ok()?;
    Some(CODE_NAMES.get(n).copied().unwrap_or("Unknown"))
}

impl<S> tower_service::Service<http::Request<Body>> for RpcService<S>
where
    S: tower_service::Service<http::Request<RequestBody>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ResponseBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let started = Instant::now();
        let labels = method_labels(req.uri().path());
        let metrics = self.metrics.clone();
        let received = metrics.received.get_or_create_owned(&labels);
        let req = req.map(|inner| RequestBody { inner, bytes: 0, counter: received });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // A trailers-only answer (an error) carries its code in the headers.
            let code = code_of(resp.headers());
            Ok(resp.map(|inner| ResponseBody { inner, bytes: 0, code, started, labels, metrics }))
        })
    }
}

/// A request body that counts its bytes (added when the body is dropped).
pub struct RequestBody {
    inner: Body,
    bytes: u64,
    counter: Counter,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &r
            && let Some(data) = frame.data_ref()
        {
            this.bytes += data.len() as u64;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.counter.inc_by(self.bytes);
    }
}

/// A response body that counts its bytes and reads the status code from the
/// trailers; the RPC is recorded when the body is dropped (sent, or the
/// client went away: `Canceled` unless a code was seen).
pub struct ResponseBody {
    inner: Body,
    bytes: u64,
    code: Option<&'static str>,
    started: Instant,
    labels: MethodLabels,
    metrics: RpcMetrics,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &r {
            if let Some(data) = frame.data_ref() {
                this.bytes += data.len() as u64;
            } else if let Some(trailers) = frame.trailers_ref() {
                this.code = code_of(trailers).or(this.code);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.sent.get_or_create(&self.labels).inc_by(self.bytes);
        m.seconds.get_or_create(&self.labels).observe(self.started.elapsed().as_secs_f64());
        let handled = HandledLabels {
            grpc_service: std::mem::take(&mut self.labels.grpc_service),
            grpc_method: std::mem::take(&mut self.labels.grpc_method),
            grpc_code: self.code.unwrap_or("Canceled"),
        };
        m.handled.get_or_create(&handled).inc();
    }
}

/// `process_resident_memory_bytes` and `process_start_time_seconds` (the
/// Prometheus client conventions), read from `/proc` at scrape time; absent
/// where `/proc` is not.
#[derive(Debug)]
pub struct ProcessCollector {
    start_time_s: f64,
}

impl ProcessCollector {
    /// Registers the collector; call it once, at process start.
    pub fn register(registry: &mut Registry) {
        let start_time_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        registry.register_collector(Box::new(ProcessCollector { start_time_s }));
    }
}

/// Resident memory of this process in bytes (Linux `VmRSS`).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(rss) = resident_bytes() {
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                rss as f64,
            )?;
        }
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time since the Unix epoch",
            self.start_time_s,
        )
    }
}

/// Writes one unlabelled gauge from a collector.
pub fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

/// The registry in the text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; a metric that fails to encode ends
    // the text early, which a scraper reports.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    out
}

/// `GET /metrics` of `registry`, as an axum router.
pub fn router(registry: Arc<Registry>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = Arc::clone(&registry);
            async move { ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], render(&registry)) }
        }),
    )
}

/// Most open connections of a `/metrics` listener (scrapers and probes
/// hold one or two each), and from one host.
const MAX_CONNECTIONS: usize = 64;
const MAX_CONNECTIONS_PER_HOST: usize = 16;

/// Binds `addr` and serves `GET /metrics` of `registry` on it, over HTTPS
/// with `tls` (plain HTTP without), in a task of the current runtime.
/// Returns the bound address (port 0: a free port) and the task, which runs
/// until aborted.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let router = router(registry);
    let listener = crate::listen::Listener::new(listener, MAX_CONNECTIONS, true, "/metrics")
        .per_host(MAX_CONNECTIONS_PER_HOST);
    let task = tokio::spawn(crate::transport::serve_http(listener, router, tls));
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_come_from_the_path_and_unknown_paths_share_one() {
        let l = method_labels("/ps.v1.ParameterServer/PullDense");
        assert_eq!((l.grpc_service.as_str(), l.grpc_method.as_str()), ("ps.v1.ParameterServer", "PullDense"));
        for bad in ["/", "/x", "//y", "/a/b/c", "nothing"] {
            assert_eq!(method_labels(bad).grpc_service, "other", "{bad}");
        }
        let mut h = http::HeaderMap::new();
        assert_eq!(code_of(&h), None);
        h.insert("grpc-status", "4".parse().unwrap());
        assert_eq!(code_of(&h), Some("DeadlineExceeded"));
        h.insert("grpc-status", "99".parse().unwrap());
        assert_eq!(code_of(&h), Some("Unknown"));
    }

    #[test]
    fn the_process_collector_reports_memory() {
        let mut registry = Registry::default();
        ProcessCollector::register(&mut registry);
        let text = render(&registry);
        assert!(text.contains("# TYPE process_start_time_seconds gauge"), "{text}");
        if std::path::Path::new("/proc/self/status").exists() {
            let line = text.lines().find(|l| l.starts_with("process_resident_memory_bytes ")).expect(&text);
            let bytes: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
            assert!(bytes > 1e5, "{line}");
        }
    }
}
