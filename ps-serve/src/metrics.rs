//! The prediction service's Prometheus metrics, served at `GET /metrics` on
//! its HTTP listener: prediction latency and examples per model, version and
//! interface; refused predictions; the version each model serves; every gRPC
//! call (`ps_common::metrics::RpcMetrics`) and the process's memory.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use ps_common::metrics::{ProcessCollector, Registry, RpcMetrics, latency_histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    model: String,
    version: i64,
    interface: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    model: String,
    interface: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

/// The metrics of one `ps-serve` process, with their registry.
#[derive(Debug)]
pub struct ServeMetrics {
    pub registry: Registry,
    pub rpc: RpcMetrics,
    seconds: Family<VersionLabels, Histogram, fn() -> Histogram>,
    examples: Family<VersionLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    version: Family<ModelLabels, Gauge>,
}

impl Default for ServeMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        ProcessCollector::register(&mut registry);
        let rpc = RpcMetrics::register(&mut registry);
        let m = ServeMetrics {
            rpc,
            seconds: Family::new_with_constructor(latency_histogram),
            examples: Family::default(),
            errors: Family::default(),
            version: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "ps_serve_predict_seconds",
            "Time to answer a prediction (parse, queue, batch, forward pass), by model version and interface",
            m.seconds.clone(),
        );
        registry.register(
            "ps_serve_examples",
            "Examples predicted, by model version and interface",
            m.examples.clone(),
        );
        registry.register(
            "ps_serve_errors",
            "Predictions refused or failed, by model, interface and gRPC code",
            m.errors.clone(),
        );
        registry.register("ps_serve_model_version", "The version each model serves now", m.version.clone());
        ServeMetrics { registry, ..m }
    }
}

impl ServeMetrics {
    /// Records a prediction of `examples` answered by `version` in `seconds`.
    pub fn predicted(
        &self,
        model: &str,
        version: i64,
        interface: &'static str,
        examples: usize,
        seconds: f64,
    ) {
        let labels = VersionLabels { model: model.to_string(), version, interface };
        self.seconds.get_or_create(&labels).observe(seconds);
        self.examples.get_or_create(&labels).inc_by(examples as u64);
    }

    /// Records a prediction that failed with `code` (a gRPC code name).
    pub fn failed(&self, model: &str, interface: &'static str, code: tonic::Code) {
        let labels = ErrorLabels { model: model.to_string(), interface, code: code_name(code) };
        self.errors.get_or_create(&labels).inc();
    }

    /// Sets the version `model` serves now.
    pub fn serving(&self, model: &str, version: i64) {
        self.version.get_or_create(&ModelLabels { model: model.to_string() }).set(version);
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}
