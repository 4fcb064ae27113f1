//! The worker side of the parameter server.

pub mod data;
pub mod model;
