//! The gitproxy wire contract, generated from `proto/gitproxy/v1/*.proto`.
//!
//! The `.proto` files are the documented contract; this crate only exposes the
//! generated types, the service stubs and the encoded file descriptor set that
//! the servers publish through gRPC reflection.

#![allow(clippy::all, missing_docs)]

pub mod codec;

/// Package `gitproxy.v1`.
pub mod v1 {
    tonic::include_proto!("gitproxy.v1");
}

/// Encoded `FileDescriptorSet` of every gitproxy proto file, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gitproxy_descriptor");
