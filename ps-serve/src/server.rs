//! The models served by one process, and the two listeners (gRPC and HTTP)
//! in front of them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use ps_common::inflight::{InFlight, InFlightLayer};
use ps_common::listen::Listener;
use ps_common::transport::{self, TransportConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::grpc::{PredictionService, pb::prediction_server::PredictionServer};
use crate::metrics::ServeMetrics;
use crate::slot::ModelSlot;

/// Every model name served here, and the process's metrics.
#[derive(Default)]
pub struct Models {
    slots: BTreeMap<String, Arc<ModelSlot>>,
    pub metrics: ServeMetrics,
}

impl Models {
    pub fn new(slots: impl IntoIterator<Item = Arc<ModelSlot>>) -> Models {
        Models {
            slots: slots.into_iter().map(|s| (s.name.clone(), s)).collect(),
            metrics: ServeMetrics::default(),
        }
    }

    /// The slot of `name`, or [`Error::UnknownModel`].
    pub fn get(&self, name: &str) -> Result<&Arc<ModelSlot>> {
        self.slots.get(name).ok_or_else(|| Error::UnknownModel(name.to_string()))
    }

    pub fn slots(&self) -> impl Iterator<Item = &Arc<ModelSlot>> {
        self.slots.values()
    }

    /// Every model has a version loaded.
    pub fn ready(&self) -> bool {
        self.slots.values().all(|s| s.is_ready())
    }
}

/// Limits of one request, the same on both interfaces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body or message, in bytes.
    pub max_request_bytes: usize,
    /// Bytes of requests being received or handled at once, both
    /// listeners together (`ps_common::inflight`).
    pub max_inflight_bytes: usize,
    /// Most open connections of each listener; one beyond it is closed at
    /// once (`ps_common::listen`).
    pub max_connections: usize,
    /// Most open connections of each listener from one peer host.
    pub max_connections_per_host: usize,
    /// Longest a request's body may take to arrive once its headers have:
    /// a client that stops sending mid-body, or trickles it, is answered 408
    /// and its connection closed (HTTP, `http::Body`), or DEADLINE_EXCEEDED
    /// (gRPC, `ps_common::inflight::InFlightLayer::within`).
    pub body_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 16 << 20,
            max_inflight_bytes: 256 << 20,
            max_connections: 1024,
            max_connections_per_host: 256,
            body_timeout: crate::http::BODY_TIMEOUT,
        }
    }
}

/// The listeners of a running server.
pub struct Running {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops both listeners (connections in progress are dropped).
    pub fn abort(&self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }

    /// Waits until a listener stops (it does not unless it fails).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Binds `grpc` and `http` (port 0: any free port) and serves `models` on
/// both, in plaintext (in-process tests).
pub async fn start(
    models: Arc<Models>,
    grpc: SocketAddr,
    http: SocketAddr,
    limits: Limits,
) -> Result<Running> {
    start_with(models, grpc, http, limits, &TransportConfig::default()).await
}

/// [`start`] with `transport`'s TLS on both listeners (HTTPS on `http`).
pub async fn start_with(
    models: Arc<Models>,
    grpc: SocketAddr,
    http: SocketAddr,
    limits: Limits,
    transport: &TransportConfig,
) -> Result<Running> {
    let tls_error = |e: ps_common::Error| Error::Io {
        what: "setting up TLS".into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
    };
    // Both TLS configurations first, so that a bad file binds nothing.
    // Request bytes in flight, charged as they arrive on either listener.
    let inflight = InFlight::new(limits.max_inflight_bytes as u64);
    let charge_grpc = InFlightLayer::new(&inflight, |r| Error::from(r).into())
        .within(limits.body_timeout, |limit| Error::SlowBody(limit).into());
    let grpc_server =
        transport::server(transport, &models.metrics.rpc).map_err(tls_error)?.layer(charge_grpc);
    let http_tls = match &transport.tls {
        Some(tls) => Some(transport::rustls_server_config(tls).map_err(tls_error)?),
        None => None,
    };
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|source| Error::Io { what: format!("binding {addr}"), source })
    };
    let (grpc_listener, http_listener) = (bind(grpc).await?, bind(http).await?);
    let local = |l: &TcpListener| {
        l.local_addr().map_err(|source| Error::Io { what: "reading the bound address".into(), source })
    };
    let (grpc, http) = (local(&grpc_listener)?, local(&http_listener)?);

    let service = PredictionServer::new(PredictionService(Arc::clone(&models)))
        .max_decoding_message_size(limits.max_request_bytes)
        .max_encoding_message_size(limits.max_request_bytes.max(64 << 20));
    let caps = (limits.max_connections, limits.max_connections_per_host);
    let incoming = transport::incoming(transport, grpc_listener, caps, "ps-serve gRPC");
    let http_listener = Listener::new(http_listener, limits.max_connections, true, "ps-serve HTTP")
        .per_host(limits.max_connections_per_host);
    let grpc_task = tokio::spawn(async move {
        let mut grpc_server = grpc_server;
        if let Err(e) = grpc_server.add_service(service).serve_with_incoming(incoming).await {
            tracing::error!("gRPC listener stopped: {e}");
        }
    });
    let router = crate::http::router(models, (limits.max_request_bytes, limits.body_timeout), inflight);
    let http_task = tokio::spawn(transport::serve_http(http_listener, router, http_tls));
    Ok(Running { grpc, http, tasks: vec![grpc_task, http_task] })
}
