//! Generates the tonic/prost code from `gitproxy/v1/*.proto`.
//!
//! protoc comes from the `protoc-bin-vendored` crate unless `PROTOC` is set,
//! so a fresh machine builds without installing anything.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY-free: build scripts are single-threaded here.
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["gitproxy/v1/tunnel.proto", "gitproxy/v1/admin.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // The Tunnel service has a method named `Connect`, which would clash with
    // the generated `TunnelClient::connect(dst)` constructor: clients are
    // built from a `Channel` with `new` instead.
    tonic_prost_build::configure()
        .build_transport(false)
        // Small initial stream buffers: see src/codec.rs.
        .codec_path("crate::codec::SmallBufferCodec")
        .bytes(".gitproxy.v1.Data.data")
        .bytes(".gitproxy.v1.ResponseHead.body")
        .bytes(".gitproxy.v1.RequestHead.body")
        .file_descriptor_set_path(out.join("gitproxy_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
