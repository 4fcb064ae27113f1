//! The launcher library behind `ps-cluster`: start a local cluster of shard
//! and worker processes, watch it, stop it, and write a run folder.
//!
//! - [`cluster`] starts and stops the processes and streams worker events;
//!   [`run`] is one training run on such a cluster, writing its run folder.
//! - [`artifact`] holds the typed, versioned files of a run folder
//!   (`summary.json`, `stats.json`, `metrics.jsonl`), shared by every writer
//!   and reader.
//! - [`models`] is `ps-cluster models`, over the model registry
//!   ([`ps_registry`]), and registers a run's model when training ends.
//! - [`sweep`] runs a grid of runs and reports on them; [`plot`] draws its
//!   charts (SVG, through plotters).
//! - [`export`] writes a run's model as safetensors with a model card.
//! - [`render`] is what a person sees: progress bars, summaries, tables.
//! - [`bench`] prints throughput figures beside same-run baselines.
//! - [`certs`] makes a development CA and the cluster's certificates
//!   (`ps-cluster certs`; the local cluster's TLS).
//! - [`credentials`] is `ps-cluster token` (token keys, bearer tokens) and
//!   the per-process credentials the launcher issues to a local cluster.

pub mod artifact;
pub mod bench;
pub mod certs;
pub mod cluster;
pub mod credentials;
pub mod export;
pub mod models;
pub mod plot;
pub mod render;
pub mod run;
pub mod sweep;
