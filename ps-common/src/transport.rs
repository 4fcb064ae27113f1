//! Connection settings of every server and client channel, written once.
//!
//! [`TransportConfig`] is the one description of HTTP/2 windows and frames,
//! keep-alive, `TCP_NODELAY`, the connect timeout and the message limit.
//! Shards build their server with [`server`] (every RPC measured by
//! [`crate::metrics::RpcMetrics`]), [`incoming`] and [`service`];
//! workers build each channel with [`endpoint`] and [`client`], which
//! attaches the process's [`Credential`] to every call. Both sides
//! read the same struct, so a limit cannot be raised on one side only.
//!
//! TLS (issue 11) belongs here too: [`server`] and [`endpoint`] are the two
//! places that will apply it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};
use tower_layer::{Identity, Stack};

use crate::auth::Credential;
use crate::metrics::{RpcLayer, RpcMetrics};
use crate::wire::pb::parameter_server_client::ParameterServerClient;
use crate::wire::pb::parameter_server_server::{ParameterServer, ParameterServerServer};
use crate::{Error, Result};

/// HTTP/2 and socket settings shared by shards and workers (the `[transport]`
/// table of a shard config, `[job.client.transport]` of a run file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// HTTP/2 initial window of each stream (one request), in KiB. Large
    /// windows let a multi-MiB value buffer travel without waiting for
    /// WINDOW_UPDATE frames.
    pub stream_window_kib: u32,
    /// HTTP/2 initial window of a connection (all its streams), in KiB.
    pub connection_window_kib: u32,
    /// Largest HTTP/2 frame, in bytes: fewer, larger frames for the bulk
    /// value buffers.
    pub max_frame_bytes: u32,
    /// Client HTTP/2 PING interval (0: no pings); a dead shard is noticed
    /// within interval + timeout. Shards answer pings and send none.
    #[serde(rename = "keep_alive_interval_ms", with = "duration_ms")]
    pub keep_alive_interval: Duration,
    /// How long a client waits for a PING's answer before closing the channel.
    #[serde(rename = "keep_alive_timeout_ms", with = "duration_ms")]
    pub keep_alive_timeout: Duration,
    /// Ping idle channels too (a worker waiting at a BSP barrier is idle).
    pub keep_alive_while_idle: bool,
    /// `TCP_NODELAY` on every accepted and connected socket. Without it,
    /// responses of a few hundred KiB stall on Nagle's algorithm against
    /// delayed ACKs.
    pub tcp_nodelay: bool,
    /// Time allowed for one TCP connect attempt.
    #[serde(rename = "connect_timeout_ms", with = "duration_ms")]
    pub connect_timeout: Duration,
    /// Largest request or response accepted (decoded) or sent (encoded), in
    /// MiB; larger messages fail with RESOURCE_EXHAUSTED.
    pub max_message_mib: u32,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            stream_window_kib: 8 << 10,
            connection_window_kib: 16 << 10,
            max_frame_bytes: (1 << 20) - 1,
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(20),
            keep_alive_while_idle: true,
            tcp_nodelay: true,
            connect_timeout: Duration::from_secs(5),
            max_message_mib: 256,
        }
    }
}

/// HTTP/2's limits (RFC 9113 §6.5.2, §6.9.1).
const MIN_FRAME: u32 = 1 << 14;
const MAX_FRAME: u32 = (1 << 24) - 1;
const MAX_WINDOW_KIB: u32 = ((1 << 31) - 1) >> 10;

impl TransportConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidTransport(m));
        for (name, kib) in [
            ("stream_window_kib", self.stream_window_kib),
            ("connection_window_kib", self.connection_window_kib),
        ] {
            if !(64..=MAX_WINDOW_KIB).contains(&kib) {
                return bad(format!("{name} must be 64..={MAX_WINDOW_KIB}, got {kib}"));
            }
        }
        if !(MIN_FRAME..=MAX_FRAME).contains(&self.max_frame_bytes) {
            return bad(format!(
                "max_frame_bytes must be {MIN_FRAME}..={MAX_FRAME}, got {}",
                self.max_frame_bytes
            ));
        }
        if !self.keep_alive_interval.is_zero() && self.keep_alive_timeout.is_zero() {
            return bad("keep_alive_timeout_ms must be positive when keep-alive is on".into());
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout_ms must be positive".into());
        }
        // tonic counts message sizes in usize; 2047 MiB keeps them below 2^31.
        if self.max_message_mib == 0 || self.max_message_mib > 2047 {
            return bad(format!("max_message_mib must be 1..=2047, got {}", self.max_message_mib));
        }
        Ok(())
    }

    /// The message limit in bytes.
    pub fn max_message_bytes(&self) -> usize {
        (self.max_message_mib as usize) << 20
    }
}

/// A server builder with `config`'s HTTP/2 settings, every RPC measured in
/// `metrics`; add services, then serve on [`incoming`].
pub fn server(config: &TransportConfig, metrics: &RpcMetrics) -> Server<Stack<RpcLayer, Identity>> {
    // TLS (issue 11): `.tls_config(..)` goes here.
    Server::builder()
        .initial_stream_window_size(config.stream_window_kib << 10)
        .initial_connection_window_size(config.connection_window_kib << 10)
        .max_frame_size(config.max_frame_bytes)
        .tcp_nodelay(config.tcp_nodelay)
        .layer(metrics.layer())
}

/// The connections accepted on `listener`, with `TCP_NODELAY` set as
/// `config` says. (The builder's own `tcp_nodelay` only reaches listeners it
/// binds itself.)
pub fn incoming(
    config: &TransportConfig,
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<TcpStream>> + use<> {
    let nodelay = config.tcp_nodelay;
    tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), move |s| {
        s.inspect(|s| {
            // Best effort: a socket that refuses the option still works.
            let _ = s.set_nodelay(nodelay);
        })
    })
}

/// The generated shard service with `config`'s message limits.
pub fn service<T: ParameterServer>(config: &TransportConfig, svc: T) -> ParameterServerServer<T> {
    ParameterServerServer::new(svc)
        .max_decoding_message_size(config.max_message_bytes())
        .max_encoding_message_size(config.max_message_bytes())
}

/// The endpoint of a shard at `addr` (`host:port`, or a URI with a scheme),
/// with `config`'s connection settings. Nothing is connected yet.
pub fn endpoint(config: &TransportConfig, addr: &str) -> Result<Endpoint> {
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| Error::InvalidAddress { addr: addr.to_string(), reason: e.to_string() })?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(config.tcp_nodelay)
        .initial_stream_window_size(config.stream_window_kib << 10)
        .initial_connection_window_size(config.connection_window_kib << 10)
        .max_frame_size(config.max_frame_bytes);
    if !config.keep_alive_interval.is_zero() {
        endpoint = endpoint
            .http2_keep_alive_interval(config.keep_alive_interval)
            .keep_alive_timeout(config.keep_alive_timeout)
            .keep_alive_while_idle(config.keep_alive_while_idle);
    }
    // TLS (issue 11): `.tls_config(..)` goes here.
    Ok(endpoint)
}

/// A shard client: the generated client over a channel that attaches the
/// process's credential to every call.
pub type ShardClient = ParameterServerClient<InterceptedService<Channel, Credential>>;

/// The generated shard client over `channel`, with `config`'s message limits,
/// sending `credential` (a bearer token, or none) with every call.
pub fn client(config: &TransportConfig, channel: Channel, credential: Credential) -> ShardClient {
    ParameterServerClient::with_interceptor(channel, credential)
        .max_decoding_message_size(config.max_message_bytes())
        .max_encoding_message_size(config.max_message_bytes())
}

/// Serde helper: a [`Duration`] written as whole milliseconds (`*_ms` keys).
pub mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().try_into().unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let c = TransportConfig::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("keep_alive_interval_ms = 10000"), "{text}");
        assert_eq!(toml::from_str::<TransportConfig>(&text).unwrap(), c);
        assert_eq!(toml::from_str::<TransportConfig>("").unwrap(), c);
        assert_eq!(c.max_message_bytes(), 256 << 20);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<TransportConfig>("max_message_bytes = 1").is_err());
        let check = |text: &str| toml::from_str::<TransportConfig>(text).unwrap().validate();
        assert!(check("max_message_mib = 0").is_err());
        assert!(check("max_message_mib = 2048").is_err());
        assert!(check("max_frame_bytes = 1000").is_err());
        assert!(check("stream_window_kib = 2097152").is_err());
        assert!(check("connect_timeout_ms = 0").is_err());
        assert!(check("keep_alive_timeout_ms = 0").is_err());
        check("keep_alive_interval_ms = 0\nkeep_alive_timeout_ms = 0").unwrap();
        check("max_message_mib = 2047\nmax_frame_bytes = 16384").unwrap();
    }

    #[test]
    fn endpoints_accept_bare_addresses_and_uris() {
        let c = TransportConfig::default();
        assert_eq!(endpoint(&c, "127.0.0.1:7000").unwrap().uri().to_string(), "http://127.0.0.1:7000/");
        assert_eq!(endpoint(&c, "http://[::1]:7000").unwrap().uri().to_string(), "http://[::1]:7000/");
        assert!(matches!(endpoint(&c, "not an address"), Err(Error::InvalidAddress { .. })));
    }
}
