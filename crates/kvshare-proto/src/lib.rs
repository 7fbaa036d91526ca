//! Generated code for the `kvshare.v1` gRPC contract (see `proto/kvshare/v1/kvshare.proto`).
//!
//! Messages use `bytes::Bytes` for every `bytes` field, so payloads move between the network and
//! the store without copies.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The `kvshare.v1` package: messages, the `KvCache` client and server.
pub mod v1 {
    tonic::include_proto!("kvshare.v1");
}

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kvshare_descriptor");
