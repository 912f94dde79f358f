//! Compiles the protos with protox, a pure-Rust protobuf compiler, so no system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/sagad/v1/orchestrator.proto",
        "proto/sagad/participant/v1/participant.proto",
        "proto/sagad/demo/v1/demo.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let file_descriptors = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("sagad_descriptor.bin"),
        prost::Message::encode_to_vec(&file_descriptors),
    )?;
    // The client API answers a body that is not protobuf with INVALID_ARGUMENT (see
    // src/codec.rs). The participant protocol keeps prost's codec: there a reply sagad cannot
    // decode stays a transient failure, since the call may have taken effect.
    builder()
        .codec_path("crate::codec::RequestCodec")
        .compile_fds(protox::compile([files[0]], ["proto"])?)?;
    builder().compile_fds(protox::compile(&files[1..], ["proto"])?)?;
    Ok(())
}

fn builder() -> tonic_prost_build::Builder {
    tonic_prost_build::configure()
        .extern_path(".google.protobuf.Struct", "::pbjson_types::Struct")
        .extern_path(".google.protobuf.Value", "::pbjson_types::Value")
        .extern_path(".google.protobuf.ListValue", "::pbjson_types::ListValue")
        .extern_path(".google.protobuf.Timestamp", "::pbjson_types::Timestamp")
}
