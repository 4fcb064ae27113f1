//! A shard's Prometheus metrics (`ps-server --metrics ADDR` serves them at
//! `/metrics`).
//!
//! Most are read at scrape time from what the shard keeps anyway
//! ([`ShardCollector`]: the store's counters and table sizes, the clock set,
//! the staleness histogram); [`ShardMetrics`] holds the few measured only for
//! metrics: the time a training read waits at the consistency gate, and the
//! last checkpoint written. Every series carries the label `shard`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use ps_common::metrics::{ProcessCollector, Registry, RpcMetrics, gauge, latency_histogram};

use crate::service::Shard;

/// What a shard measures only for its metrics.
#[derive(Debug)]
pub struct ShardMetrics {
    /// How long each training read (pull with a clock) waited for the
    /// consistency model (BSP/SSP) to let it through; ASP reads record 0.
    pub read_wait: Histogram,
    /// How long each checkpoint held this shard's pushes.
    pub checkpoint_hold: Histogram,
    /// When this shard last wrote its part of a checkpoint (Unix ms; 0: never).
    last_checkpoint_ms: AtomicU64,
    last_checkpoint_bytes: AtomicU64,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            read_wait: latency_histogram(),
            checkpoint_hold: latency_histogram(),
            last_checkpoint_ms: AtomicU64::new(0),
            last_checkpoint_bytes: AtomicU64::new(0),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl ShardMetrics {
    /// Records a checkpoint file written now, of `bytes`, that held pushes
    /// for `held`.
    pub fn checkpoint_written(&self, bytes: u64, held: Duration) {
        self.checkpoint_hold.observe(held.as_secs_f64());
        self.last_checkpoint_bytes.store(bytes, Relaxed);
        self.last_checkpoint_ms.store(unix_ms(), Relaxed);
    }
}

/// The registry of one shard: process, RPC and shard metrics, every series
/// labelled `shard`. Returns it with the RPC metrics the server layer feeds.
pub fn registry(shard: &Arc<Shard>) -> (Registry, RpcMetrics) {
    let index = shard.store.shard().to_string();
    let mut registry = Registry::with_labels(std::iter::once(("shard".into(), index.into())));
    ProcessCollector::register(&mut registry);
    let rpc = RpcMetrics::register(&mut registry);
    registry.register(
        "ps_read_wait_seconds",
        "Time a training read waited at the consistency gate (BSP/SSP) before it was served",
        shard.metrics.read_wait.clone(),
    );
    registry.register(
        "ps_checkpoint_hold_seconds",
        "Time a checkpoint held this shard's pushes (hold, drain and copy)",
        shard.metrics.checkpoint_hold.clone(),
    );
    registry.register_collector(Box::new(ShardCollector(Arc::clone(shard))));
    (registry, rpc)
}

/// Reads the shard's own counters at scrape time.
pub struct ShardCollector(pub Arc<Shard>);

impl fmt::Debug for ShardCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardCollector(shard {})", self.0.store.shard())
    }
}

fn counter<N: EncodeCounterValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> Result<(), fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for ShardCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), fmt::Error> {
        let shard = &self.0;
        let c = &shard.store.counters;
        for (name, help, v) in [
            ("ps_pulls", "Pull requests served", &c.pulls),
            ("ps_pushes", "Pushes applied", &c.pushes),
            (
                "ps_duplicate_pushes",
                "Pushes acknowledged as duplicates (a retry of an applied seq)",
                &c.duplicate_pushes,
            ),
            ("ps_rejected_requests", "Requests refused with an error status", &c.rejected),
            ("ps_values_pulled", "Parameter values returned by pulls", &c.values_pulled),
            ("ps_values_pushed", "Gradient values applied by pushes", &c.values_pushed),
            (
                "ps_nonfinite_updates",
                "Block updates not applied: they would have made a value non-finite",
                &c.nonfinite_updates,
            ),
            (
                "ps_clipped_gradient_values",
                "Gradient values clipped to limits.max_gradient",
                &c.clipped_values,
            ),
            (
                "ps_values_copied_on_write",
                "Dense values an update copied first because a pull's answer being written still held them",
                &c.values_copied_on_write,
            ),
            ("ps_over_budget", "Allocations refused over the memory budget", &shard.store.budget.refused),
            ("ps_rate_limited", "Requests refused by the rate limit", &shard.rate.limited),
            (
                "ps_inflight_refused",
                "Requests refused over limits.max_inflight_mib (bytes of requests in flight)",
                &shard.inflight.refused,
            ),
        ] {
            counter(&mut e, name, help, v.load(Relaxed))?;
        }
        counter(
            &mut e,
            "ps_consistency_wait_seconds",
            "Total time reads spent blocked at the consistency gate",
            shard.clocks.wait_micros() as f64 / 1e6,
        )?;
        // Backup workers: pushes that came after N - b others finished their
        // iteration (dropped, or applied with a staleness weight).
        counter(
            &mut e,
            "ps_late_pushes_dropped",
            "Late pushes dropped (backup workers, late = \"drop\")",
            shard.clocks.late_dropped.load(Relaxed),
        )?;
        counter(
            &mut e,
            "ps_late_pushes_weighted",
            "Late pushes applied with a staleness weight (backup workers, late = \"weight\")",
            shard.clocks.late_weighted.load(Relaxed),
        )?;

        let tables = shard.store.table_sizes();
        {
            let mut m = e.encode_descriptor(
                "ps_table_blocks",
                "Blocks this shard holds per table (dense chunks or sparse rows)",
                None,
                MetricType::Gauge,
            )?;
            for t in &tables {
                let labels = [("table", t.name.as_str()), ("kind", t.kind)];
                ConstGauge::new(t.blocks as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "ps_table_memory_bytes",
                "Estimated memory of a table's blocks on this shard (values, optimizer state, per-block overhead)",
                None,
                MetricType::Gauge,
            )?;
            for t in &tables {
                let labels = [("table", t.name.as_str()), ("kind", t.kind)];
                ConstGauge::new(t.bytes as i64).encode(m.encode_family(&labels)?)?;
            }
        }

        // Staleness: bucket i counts applied pushes of staleness i, the last
        // one everything at or above its index (ARCHITECTURE.md).
        let hist = shard.clocks.histogram();
        if !hist.is_empty() {
            let (mut cumulative, mut sum, mut buckets) = (0u64, 0f64, Vec::with_capacity(hist.len()));
            for (i, &n) in hist.iter().enumerate() {
                cumulative += n;
                sum += i as f64 * n as f64;
                let le = if i + 1 == hist.len() { f64::INFINITY } else { i as f64 };
                buckets.push((le, cumulative));
            }
            let m = e.encode_descriptor(
                "ps_push_staleness_iterations",
                "Observed staleness of applied pushes, in iterations (the last bucket's pushes count at its lower bound in the sum)",
                None,
                MetricType::Histogram,
            )?;
            let mut m = m;
            m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, cumulative, &buckets, None)?;
        }

        let members = shard.clocks.status();
        {
            let mut m = e.encode_descriptor(
                "ps_member_clock",
                "Each member's clock on this shard",
                None,
                MetricType::Gauge,
            )?;
            for w in &members {
                let worker = w.worker.to_string();
                ConstGauge::new(w.clock as i64).encode(m.encode_family(&[("worker", worker.as_str())])?)?;
            }
        }
        gauge(&mut e, "ps_members", "Workers in the clock set", members.len() as f64)?;
        let blocked = members.iter().filter(|m| m.waiting_for.is_some()).count();
        gauge(&mut e, "ps_members_blocked", "Members blocked in a read right now", blocked as f64)?;
        let budget = &shard.store.budget;
        gauge(&mut e, "ps_budget_used_bytes", "Bytes of the memory budget in use", budget.used() as f64)?;
        gauge(&mut e, "ps_budget_limit_bytes", "The shard's memory budget", budget.limit() as f64)?;
        let inflight = &shard.inflight;
        gauge(
            &mut e,
            "ps_inflight_bytes",
            "Bytes of requests being received or handled",
            inflight.used() as f64,
        )?;

        let last = shard.metrics.last_checkpoint_ms.load(Relaxed);
        if last > 0 {
            gauge(
                &mut e,
                "ps_checkpoint_last_timestamp_seconds",
                "When this shard last wrote its part of a checkpoint (Unix time)",
                last as f64 / 1e3,
            )?;
            gauge(
                &mut e,
                "ps_checkpoint_age_seconds",
                "Seconds since this shard last wrote its part of a checkpoint",
                unix_ms().saturating_sub(last) as f64 / 1e3,
            )?;
            gauge(
                &mut e,
                "ps_checkpoint_last_bytes",
                "Size of this shard's file in the last checkpoint",
                shard.metrics.last_checkpoint_bytes.load(Relaxed) as f64,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ps_common::optim::Rule;
    use ps_common::spec::{Init, TableSpec};
    use ps_common::transport::{self, TransportConfig};
    use ps_common::wire::pb;

    use super::*;
    use crate::clock::Clocks;
    use crate::gate::Gate;
    use crate::service::Service;
    use crate::store::Store;

    /// Served RPCs (by method and code, with their bytes) and the store's
    /// tables show in the text a scrape reads.
    #[tokio::test]
    async fn rpcs_and_tables_show_in_the_text() {
        let shard = Arc::new(Shard {
            store: Store::new(0, 1),
            clocks: Clocks::default(),
            gate: Gate::default(),
            max_wait: Duration::from_secs(1),
            checkpoint_dir: None,
            seal: Default::default(),
            queue: Default::default(),
            metrics: ShardMetrics::default(),
            rate: crate::budget::RateLimiter::new(&Default::default()),
            inflight: ps_common::inflight::InFlight::new(1 << 30),
            limits: Default::default(),
            auth: None,
            data_port: Default::default(),
            data_socket: Default::default(),
        });
        let (registry, rpc) = registry(&shard);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = TransportConfig::default();
        let server = transport::server(&t, &rpc)
            .unwrap()
            .add_service(transport::service(&t, Service(Arc::clone(&shard))))
            .serve_with_incoming(transport::incoming(&t, listener, (16, 16), "test"));
        let server = tokio::spawn(server);
        let channel = transport::endpoint(&t, &addr).unwrap().connect().await.unwrap();
        let mut client = transport::client(&t, channel, Default::default());

        let spec = TableSpec::dense("w", &[10], Init::zeros(), Rule::sgd(0.5).into());
        let table = Some(pb::TableSpec::from(&spec));
        client.register(pb::RegisterRequest { table, num_shards: 1 }).await.unwrap();
        let refused = client.register(pb::RegisterRequest { table: None, num_shards: 1 }).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        let chunks = vec![pb::ChunkId { tensor: "w".into(), index: 0 }];
        client.pull_dense(pb::PullDenseRequest { chunks, meta: None }).await.unwrap();

        let expected = [
            r#"grpc_server_handled_total{shard="0",grpc_service="ps.v1.ParameterServer",grpc_method="Register",grpc_code="OK"} 1"#,
            r#"grpc_server_handled_total{shard="0",grpc_service="ps.v1.ParameterServer",grpc_method="Register",grpc_code="InvalidArgument"} 1"#,
            r#"grpc_server_handling_seconds_count{shard="0",grpc_service="ps.v1.ParameterServer",grpc_method="PullDense"} 1"#,
            r#"ps_pulls_total{shard="0"} 1"#,
            r#"ps_rejected_requests_total{shard="0"} 1"#,
            r#"ps_table_blocks{shard="0",table="w",kind="dense"} 1"#,
            // 10 floats (SGD keeps no state) and the per-block overhead.
            r#"ps_table_memory_bytes{shard="0",table="w",kind="dense"} 117"#,
        ];
        // An RPC is recorded when the server drops its response body, which
        // may be just after the client has the answer.
        let mut text = String::new();
        for _ in 0..200 {
            text = ps_common::metrics::render(&registry);
            if expected.iter().all(|l| text.contains(l)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for line in expected {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // The pull's answer: 10 floats in one chunk, plus protobuf and gRPC framing.
        let sent = (text.lines())
            .find(|l| l.starts_with("grpc_server_sent_bytes_total") && l.contains(r#""PullDense""#))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .expect(&text);
        assert!((45..100).contains(&sent), "{sent} bytes sent for a 40-byte chunk");
        server.abort();
    }
}
