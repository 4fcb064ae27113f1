//! Compiles `proto/ps/serve/v1/serve.proto` with protox (pure Rust, no
//! system `protoc`), as ps-common does for the shard protocol.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "../proto/ps/serve/v1/serve.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["../proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
