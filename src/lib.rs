//! The launcher library behind `ps-cluster`: start a local cluster of shard
//! and worker processes, watch it, stop it, and write a run folder.

pub mod bench;
pub mod cluster;
pub mod plot;
pub mod run;
pub mod sweep;
