//! One served model name: where its versions come from ([`Source`]), the
//! version served now, and the hot swap.
//!
//! The version served now is an `Arc<Loaded>` behind a lock held only to
//! clone or replace the pointer. A request clones it once, when it arrives,
//! and keeps it to the end: a swap replaces the pointer for later requests,
//! while requests in flight finish on the version they started with, which
//! stays in memory until the last of them drops it. So a swap fails no
//! request, and every answer names the version that produced it.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ps_registry::Registry;

use crate::batch::{BatchConfig, Batcher};
use crate::error::{Error, Result};
use crate::model::{Inputs, Servable};
use crate::online::Online;

/// Registry versions other than the current one kept loaded for requests
/// that name them (`/versions/N`), most recently used last.
const PINNED_CACHE: usize = 4;

/// Where a served model's versions come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// One registry version, never swapped.
    Version(i64),
    /// The version a registry label points to, followed as it moves.
    Label(String),
    /// The newest registry version, followed as versions are added.
    Latest,
    /// A live training cluster, re-read every refresh.
    Online,
}

impl Source {
    /// `NAME` (label `production`), `NAME@LABEL`, `NAME:N` or
    /// `NAME:latest` (as `ps-cluster models` names versions): the model
    /// name and its source.
    pub fn parse(spec: &str) -> Result<(String, Source)> {
        let (name, source) = if let Some((name, version)) = spec.split_once(':') {
            let source = match version {
                "latest" => Source::Latest,
                v => Source::Version(v.parse().map_err(|_| {
                    Error::bad(format!("`{spec}`: `{v}` is neither a version number nor `latest`"))
                })?),
            };
            (name, source)
        } else {
            let (name, label) = spec.split_once('@').unwrap_or((spec, "production"));
            ps_registry::check_label(label)?;
            (name, Source::Label(label.to_string()))
        };
        ps_registry::check_model_name(name)?;
        Ok((name.to_string(), source))
    }

    fn describe(&self) -> String {
        match self {
            Source::Version(v) => format!("registry:v{v}"),
            Source::Label(l) => format!("registry:{l}"),
            Source::Latest => "registry:latest".into(),
            Source::Online => "online".into(),
        }
    }
}

/// How fresh online weights are.
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    /// When the weights were read from the shards.
    pub read_at: Instant,
    /// The lowest clock of any live worker at that read.
    pub min_clock: u64,
}

impl Freshness {
    pub fn age(&self) -> Duration {
        self.read_at.elapsed()
    }
}

/// A version in memory.
#[derive(Debug)]
pub struct Loaded {
    /// The registry version (0 for online weights).
    pub version: i64,
    pub model: Servable,
    /// Unix milliseconds.
    pub loaded_at_ms: u64,
    pub freshness: Option<Freshness>,
}

/// The answer to one request.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub version: i64,
    /// Outputs per example.
    pub width: usize,
    pub outputs: Vec<f32>,
    pub freshness: Option<Freshness>,
}

/// What [`ModelSlot::status`] reports.
#[derive(Debug, Clone)]
pub struct Status {
    pub version: i64,
    pub source: String,
    pub kind: &'static str,
    pub input: String,
    pub output_width: usize,
    pub loaded_at_ms: u64,
    pub history: Vec<i64>,
    pub freshness: Option<Freshness>,
    /// With batching: (forward passes run, examples they held).
    pub batches: Option<(u64, u64)>,
}

/// One model name served here.
pub struct ModelSlot {
    pub name: String,
    source: Source,
    registry: Option<Arc<Registry>>,
    online: Option<Online>,
    current: RwLock<Option<Arc<Loaded>>>,
    /// Versions served, oldest first (swaps included).
    history: Mutex<Vec<i64>>,
    pinned: Mutex<Vec<Arc<Loaded>>>,
    /// Held while a version for [`ModelSlot::resolve`] is loaded: one load at
    /// a time, so that concurrent requests naming a version not in memory
    /// wait for one copy of it instead of each reading its own.
    loading: tokio::sync::Mutex<()>,
    batcher: Option<Batcher>,
    /// Most examples in one request.
    max_request_rows: usize,
}

impl ModelSlot {
    /// A model served from `registry` (every source but [`Source::Online`]).
    pub fn from_registry(
        name: String,
        source: Source,
        registry: Arc<Registry>,
        batching: Option<BatchConfig>,
        max_request_rows: usize,
    ) -> ModelSlot {
        ModelSlot::new(name, source, Some(registry), None, batching, max_request_rows)
    }

    /// A model served from a live cluster.
    pub fn from_cluster(
        name: String,
        online: Online,
        batching: Option<BatchConfig>,
        max_request_rows: usize,
    ) -> ModelSlot {
        ModelSlot::new(name, Source::Online, None, Some(online), batching, max_request_rows)
    }

    fn new(
        name: String,
        source: Source,
        registry: Option<Arc<Registry>>,
        online: Option<Online>,
        batching: Option<BatchConfig>,
        max_request_rows: usize,
    ) -> ModelSlot {
        let batcher = batching.map(|b| Batcher::new(&name, b));
        ModelSlot {
            name,
            source,
            registry,
            online,
            current: RwLock::new(None),
            history: Mutex::new(Vec::new()),
            pinned: Mutex::new(Vec::new()),
            loading: tokio::sync::Mutex::new(()),
            batcher,
            max_request_rows,
        }
    }

    /// The version served now.
    pub fn current(&self) -> Result<Arc<Loaded>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Error::NotReady(self.name.clone()))
    }

    pub fn is_ready(&self) -> bool {
        self.current().is_ok()
    }

    /// Most examples in one request: the interfaces stop reading a request
    /// at the next one.
    pub fn max_request_rows(&self) -> usize {
        self.max_request_rows
    }

    /// The version a request asks for: the current one, or registry version
    /// `v` (loaded on first use, a few kept).
    pub async fn resolve(&self, version: Option<i64>) -> Result<Arc<Loaded>> {
        let current = self.current();
        let Some(v) = version else { return current };
        if let Ok(c) = &current
            && c.version == v
        {
            return current;
        }
        let unknown = || Error::UnknownVersion { model: self.name.clone(), version: v };
        let Some(registry) = &self.registry else { return Err(unknown()) };
        let cached = || {
            let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
            let i = pinned.iter().position(|l| l.version == v)?;
            let hit = pinned.remove(i);
            pinned.push(Arc::clone(&hit));
            Some(hit)
        };
        if let Some(hit) = cached() {
            return Ok(hit);
        }
        let _loading = self.loading.lock().await;
        // Loaded by the request this one waited for.
        if let Some(hit) = cached() {
            return Ok(hit);
        }
        let loaded = match load(registry, &self.name, v).await {
            Err(Error::Registry(ps_registry::Error::NoVersion { .. })) => return Err(unknown()),
            other => Arc::new(other?),
        };
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        if pinned.len() >= PINNED_CACHE {
            pinned.remove(0);
        }
        pinned.push(Arc::clone(&loaded));
        Ok(loaded)
    }

    /// Predicts `inputs` with the version asked for (or the current one).
    pub async fn predict(&self, version: Option<i64>, inputs: Inputs) -> Result<Prediction> {
        self.predict_on(self.resolve(version).await?, inputs).await
    }

    /// Predicts `inputs` with `loaded` (from [`ModelSlot::resolve`]).
    pub async fn predict_on(&self, loaded: Arc<Loaded>, inputs: Inputs) -> Result<Prediction> {
        let rows = inputs.rows();
        if rows > self.max_request_rows {
            return Err(Error::bad(format!(
                "{rows} examples in one request; the limit is {}",
                self.max_request_rows
            )));
        }
        loaded.model.check(&inputs)?;
        let (version, width, freshness) = (loaded.version, loaded.model.output_width(), loaded.freshness);
        let outputs = match &self.batcher {
            Some(b) => b.predict(loaded, inputs).await?,
            None => {
                let mut out = Vec::new();
                loaded.model.predict(&inputs, &mut out)?;
                out
            }
        };
        // Finite inputs far outside what a model was trained on (an MLP's
        // features at 1e37) can overflow its sums: refused, not answered
        // with NaN (which JSON cannot carry).
        if let Some(i) = outputs.iter().position(|v| !v.is_finite()) {
            return Err(Error::bad(format!(
                "the prediction for example {} is not a finite number: its inputs overflow the model's \
                 arithmetic (they are far outside the range it was trained on)",
                i / width.max(1)
            )));
        }
        Ok(Prediction { version, width, outputs, freshness })
    }

    /// Loads what the source serves now if it is not the current version,
    /// and swaps it in. Returns whether it swapped. On an error the current
    /// version stays.
    pub async fn refresh(&self) -> Result<bool> {
        let loaded = if let Some(online) = &self.online {
            let (saved, freshness) = online.read().await?;
            let model = tokio::task::spawn_blocking(move || Servable::new(saved))
                .await
                .map_err(|e| Error::Internal(format!("loading task: {e}")))??;
            Loaded { version: 0, model, loaded_at_ms: unix_ms(), freshness: Some(freshness) }
        } else {
            let registry = self.registry.as_ref().expect("a registry slot has a registry");
            let target = match &self.source {
                Source::Version(v) => *v,
                Source::Label(label) => registry.label(&self.name, label).await?,
                Source::Latest => registry.latest(&self.name).await?.version,
                Source::Online => unreachable!("online slots have `online`"),
            };
            if self.current().is_ok_and(|c| c.version == target) {
                return Ok(false);
            }
            load(registry, &self.name, target).await?
        };
        let version = loaded.version;
        let previous = self.current.write().unwrap_or_else(|p| p.into_inner()).replace(Arc::new(loaded));
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if previous.is_none() || self.online.is_none() {
            history.push(version);
        }
        if let Some(p) = previous.filter(|_| self.online.is_none()) {
            tracing::info!(model = %self.name, from = p.version, to = version, "swapped version");
        }
        Ok(true)
    }

    /// Refreshes every `every`, forever (errors are logged; the current
    /// version keeps serving).
    pub fn spawn_watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let slot = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = slot.refresh().await {
                    tracing::warn!(model = %slot.name, "refresh failed, serving on: {e}");
                }
            }
        })
    }

    pub fn status(&self) -> Result<Status> {
        let c = self.current()?;
        Ok(Status {
            version: c.version,
            source: match &self.online {
                Some(o) => format!("online:{}", o.describe()),
                None => self.source.describe(),
            },
            kind: c.model.kind(),
            input: c.model.input(),
            output_width: c.model.output_width(),
            loaded_at_ms: c.loaded_at_ms,
            history: self.history.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            freshness: c.freshness,
            batches: self.batcher.as_ref().map(Batcher::counts),
        })
    }
}

/// Registry version `version` of `model`, checked and built off the
/// runtime's threads (reading and hashing a large artifact blocks).
async fn load(registry: &Arc<Registry>, model: &str, version: i64) -> Result<Loaded> {
    let v = registry.version(model, version).await?;
    let registry = Arc::clone(registry);
    let model = tokio::task::spawn_blocking(move || Servable::new(registry.load(&v)?))
        .await
        .map_err(|e| Error::Internal(format!("loading task: {e}")))??;
    Ok(Loaded { version, model, loaded_at_ms: unix_ms(), freshness: None })
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_named_as_the_models_command_names_versions() {
        let p = |s: &str| Source::parse(s).map_err(|e| e.to_string());
        assert_eq!(p("mnist").unwrap(), ("mnist".into(), Source::Label("production".into())));
        assert_eq!(p("mnist@staging").unwrap(), ("mnist".into(), Source::Label("staging".into())));
        assert_eq!(p("mnist:3").unwrap(), ("mnist".into(), Source::Version(3)));
        assert_eq!(p("mnist:latest").unwrap(), ("mnist".into(), Source::Latest));
        assert!(p("mnist:x").unwrap_err().contains("neither a version number nor `latest`"));
        assert!(p("mnist:99999999999999999999").is_err());
        assert!(p("@production").is_err());
        assert!(p("mnist@Bad Label").is_err());
    }
}
