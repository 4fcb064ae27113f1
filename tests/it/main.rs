//! One integration-test binary, one module per area. Every test that needs
//! a server starts it in-process on 127.0.0.1:0 (or as a child process) and
//! stops it itself.

mod auth;
mod checkpoint;
mod cluster;
mod codecs;
mod compress;
mod dataplane;
mod export;
mod hostile;
mod manifests;
mod models;
mod multihost;
mod properties;
mod service;
mod stragglers;
mod tls;
mod train;
mod util;
