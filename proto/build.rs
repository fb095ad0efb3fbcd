//! Compiles `proto/weir/v1/telemetry.proto` with a pure-Rust protobuf compiler (no system `protoc`).
//! The message types always build; the tonic service code only with the `grpc` feature, so the
//! wasm filter links prost alone.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/weir/v1/telemetry.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        // The server is generated below, from the same service definition but sending
        // `Outgoing` messages, which a directive encoded once can be.
        .build_server(false)
        .build_client(grpc)
        // prost's codec with weir.v1's size rules checked before decoding (src/codec.rs).
        .codec_path("crate::codec::CheckedCodec")
        .compile_fds(descriptors.clone())?;
    if grpc {
        tonic_build::manual::Builder::new()
            .build_client(false)
            .compile(&[telemetry_server(&descriptors)?]);
    }
    Ok(())
}

/// The `Telemetry` service as the proto file declares it, for tonic's manual generator: the
/// requests are `Report`s, the responses `crate::codec::Outgoing` (each a `ControllerMessage` on
/// the wire, encoded before or not). Taken from the descriptors, so a change of the service in
/// the proto file that this does not follow fails the build instead of serving something else.
fn telemetry_server(
    descriptors: &prost_types::FileDescriptorSet,
) -> Result<tonic_build::manual::Service, Box<dyn std::error::Error>> {
    let service = descriptors
        .file
        .iter()
        .flat_map(|file| &file.service)
        .find(|s| s.name() == "Telemetry")
        .ok_or("telemetry.proto declares no service Telemetry")?;
    let mut builder = tonic_build::manual::Service::builder()
        .name("Telemetry")
        .package("weir.v1");
    for method in &service.method {
        let expected = (
            method.name(),
            method.input_type(),
            method.output_type(),
            method.client_streaming(),
            method.server_streaming(),
        );
        if expected
            != (
                "Exchange",
                ".weir.v1.Report",
                ".weir.v1.ControllerMessage",
                true,
                true,
            )
        {
            return Err(format!(
                "service Telemetry's method {expected:?} is not the one build.rs generates a \
                 server for (rpc Exchange(stream Report) returns (stream ControllerMessage)): \
                 update telemetry_server() in proto/build.rs"
            )
            .into());
        }
        builder = builder.method(
            tonic_build::manual::Method::builder()
                .name("exchange")
                .route_name("Exchange")
                .input_type("crate::v1::Report")
                .output_type("crate::codec::Outgoing")
                .codec_path("crate::codec::CheckedCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        );
    }
    Ok(builder.build())
}
