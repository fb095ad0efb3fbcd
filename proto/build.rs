//! Compiles `proto/weir/v1/telemetry.proto` with a pure-Rust protobuf compiler (no system `protoc`).
//! The message types always build; the tonic service code only with the `grpc` feature, so the
//! wasm filter links prost alone.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/weir/v1/telemetry.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        // prost's codec with weir.v1's size rules checked before decoding (src/codec.rs).
        .codec_path("crate::codec::CheckedCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
