//! Compiles `proto/ps/v1/*.proto` with protox (a pure-Rust protobuf compiler),
//! so no system `protoc` is needed, and feeds the descriptors to tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "../proto";
    let files = ["../proto/ps/v1/ps.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, [proto_root])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
