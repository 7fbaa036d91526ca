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

/// `google.rpc.Status`, the standard payload of gRPC's `grpc-status-details-bin` trailer.
///
/// A failed `Put` carries its `PutResponse` (every block's outcome) packed in an `Any` in
/// `details`, so standard tooling (grpcio's `grpc_status`, grpcurl) can read it.
pub mod rpc {
    use prost::Message;

    /// `google.rpc.Status`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RpcStatus {
        /// gRPC status code.
        #[prost(int32, tag = "1")]
        pub code: i32,
        /// Developer-facing message.
        #[prost(string, tag = "2")]
        pub message: String,
        /// Typed details.
        #[prost(message, repeated, tag = "3")]
        pub details: Vec<prost_types::Any>,
    }

    /// Type URL of `kvshare.v1.PutResponse` inside an `Any`.
    pub const PUT_RESPONSE_TYPE_URL: &str = "type.googleapis.com/kvshare.v1.PutResponse";

    /// Encodes status details carrying a `PutResponse`.
    pub fn encode_put_details(code: i32, message: &str, resp: &crate::v1::PutResponse) -> Vec<u8> {
        RpcStatus {
            code,
            message: message.to_string(),
            details: vec![prost_types::Any {
                type_url: PUT_RESPONSE_TYPE_URL.into(),
                value: resp.encode_to_vec(),
            }],
        }
        .encode_to_vec()
    }

    /// Extracts the `PutResponse` from status details, if they carry one.
    pub fn decode_put_details(details: &[u8]) -> Option<crate::v1::PutResponse> {
        let st = RpcStatus::decode(details).ok()?;
        st.details
            .iter()
            .find(|a| a.type_url == PUT_RESPONSE_TYPE_URL)
            .and_then(|a| crate::v1::PutResponse::decode(a.value.as_slice()).ok())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn put_details_round_trip() {
            let resp = crate::v1::PutResponse {
                outcomes: vec![crate::v1::BlockOutcome {
                    code: 3,
                    reason: "x".into(),
                    ..Default::default()
                }],
            };
            let d = encode_put_details(3, "m", &resp);
            assert_eq!(decode_put_details(&d), Some(resp));
            assert_eq!(decode_put_details(b"\xff\xff"), None);
        }
    }
}
