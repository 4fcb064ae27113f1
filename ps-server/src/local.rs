//! In-process shards on loopback, for tests, benchmarks and examples.
//!
//! [`LocalShards::start`] binds N listeners on `127.0.0.1:0` and runs
//! [`crate::serve`] on each as a task of the current tokio runtime; every
//! shard stops through its own shutdown signal.

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{Error, Result, ServerConfig};

/// N shards of one deployment, running in this process. [`LocalShards::stop`]
/// shuts them down gracefully; dropping the value aborts them.
pub struct LocalShards {
    /// `addrs[i]` is shard `i`'s `127.0.0.1:PORT`, as `ShardedClient::connect`
    /// takes it.
    pub addrs: Vec<String>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<Result<()>>>,
}

impl LocalShards {
    /// Starts `n` shards with default settings.
    pub async fn start(n: u32) -> Result<LocalShards> {
        Self::start_with(&ServerConfig::default(), n).await
    }

    /// Starts `n` shards configured like `config`, except that shard `i` gets
    /// `shard = i`, `num_shards = n`, listens on `127.0.0.1:0`
    /// (`config.listen` is ignored), and with a `data_socket` `PATH`, serves
    /// its Unix socket at `PATH-i`.
    pub async fn start_with(config: &ServerConfig, n: u32) -> Result<LocalShards> {
        let mut shards = LocalShards { addrs: Vec::new(), stops: Vec::new(), tasks: Vec::new() };
        for shard in 0..n {
            let data_socket = config.data_socket.as_ref().map(|p| {
                let mut p = p.clone().into_os_string();
                p.push(format!("-{shard}"));
                std::path::PathBuf::from(p)
            });
            let config = ServerConfig { shard, num_shards: n, data_socket, ..config.clone() };
            config.validate()?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|source| Error::Io { what: "bind 127.0.0.1:0".into(), source })?;
            let addr =
                listener.local_addr().map_err(|source| Error::Io { what: "local_addr".into(), source })?;
            let (tx, rx) = oneshot::channel();
            shards.tasks.push(tokio::spawn(crate::serve(config, listener, async {
                let _ = rx.await;
            })));
            shards.addrs.push(addr.to_string());
            shards.stops.push(tx);
        }
        Ok(shards)
    }

    /// Signals every shard to stop, waits until each has drained its
    /// requests, and returns the first shard's error, if any. A shard task
    /// that panicked re-raises its panic here.
    pub async fn stop(mut self) -> Result<()> {
        for tx in self.stops.drain(..) {
            let _ = tx.send(());
        }
        let mut result = Ok(());
        for task in self.tasks.drain(..) {
            match task.await {
                Ok(r) => result = result.and(r),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {} // cancelled: nothing left to wait for
            }
        }
        result
    }
}

impl Drop for LocalShards {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shards_start_on_loopback_and_stop() {
        let shards = LocalShards::start(3).await.unwrap();
        assert_eq!(shards.addrs.len(), 3);
        for a in &shards.addrs {
            assert!(a.starts_with("127.0.0.1:") && !a.ends_with(":0"), "{a}");
            tokio::net::TcpStream::connect(a).await.unwrap();
        }
        let addrs = shards.addrs.clone();
        shards.stop().await.unwrap();
        for a in &addrs {
            assert!(tokio::net::TcpStream::connect(a).await.is_err(), "{a} still accepts");
        }
    }

    #[tokio::test]
    async fn an_invalid_config_is_refused_before_anything_starts() {
        let mut config = ServerConfig::default();
        config.transport.max_message_mib = 0;
        assert!(matches!(LocalShards::start_with(&config, 2).await, Err(Error::Config(_))));
    }
}
