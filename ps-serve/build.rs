//! Compiles `proto/ps/serve/v1/serve.proto` with protox (pure Rust, no
//! system `protoc`), as ps-common does for the shard protocol.
//!
//! `SparseInputs` is hand-written (`ps_serve::grpc::SparseInputs`): it keeps
//! its rows encoded until the server reads them with a bound on their count.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "../proto/ps/serve/v1/serve.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["../proto"])?;
    tonic_prost_build::configure()
        .extern_path(".ps.serve.v1.SparseInputs", "crate::grpc::SparseInputs")
        .compile_fds(fds)?;
    Ok(())
}
