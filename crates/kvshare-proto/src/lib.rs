//! Generated code for the `kvshare.v1` gRPC contract (see `proto/kvshare/v1/kvshare.proto`).
//!
//! Messages use `bytes::Bytes` for every `bytes` field, so payloads move between the network and
//! the store without copies.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The `kvshare.v1` package: messages, the `KvCache` client and server.
pub mod v1 {
    tonic::include_proto!("kvshare.v1");
}

pub mod bulk;
pub mod tls;

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kvshare_descriptor");

/// Wire settings shared by nodes and clients: message limits, HTTP/2 windows, and the header
/// that keeps a request on the node that receives it.
pub mod transport {
    use std::time::Duration;

    use tonic::transport::{Channel, Endpoint};

    pub use crate::tls::ClientTls;
    use crate::tls::TlsConnector;
    use crate::v1::kv_cache_client::KvCacheClient;

    /// Largest gRPC message a node or client accepts or sends: a 64 MiB block chunk plus framing.
    pub const MAX_MESSAGE_BYTES: usize = 80 << 20;
    /// Initial HTTP/2 stream window: large enough that one block chunk does not wait for window
    /// updates.
    pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
    /// Initial HTTP/2 connection window (several streams in flight on one connection).
    pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;
    /// Largest HTTP/2 frame: 1 MiB frames halve per-frame overhead on bulk transfers.
    pub const MAX_FRAME_BYTES: u32 = 1 << 20;

    /// Metadata header that tells a node to answer from its own store and not forward the
    /// request to other members (set by forwarding nodes and by smart clients that already
    /// routed to the owner).
    pub const NO_FORWARD_HEADER: &str = "x-kvshare-hop";
    /// Value of [`NO_FORWARD_HEADER`].
    pub const NO_FORWARD_VALUE: &str = "local";

    /// True when `metadata` asks the receiving node not to forward.
    pub fn is_no_forward(metadata: &tonic::metadata::MetadataMap) -> bool {
        metadata
            .get(NO_FORWARD_HEADER)
            .is_some_and(|v| v.as_bytes() == NO_FORWARD_VALUE.as_bytes())
    }

    /// Marks a request as "answer from your own store, do not forward".
    pub fn mark_no_forward<T>(request: &mut tonic::Request<T>) {
        request.metadata_mut().insert(
            NO_FORWARD_HEADER,
            tonic::metadata::MetadataValue::from_static(NO_FORWARD_VALUE),
        );
    }

    /// `endpoint` with the shared HTTP/2 settings (no Nagle, large windows and frames) and a
    /// connect timeout.
    pub fn tune_endpoint(endpoint: Endpoint, connect_timeout: Duration) -> Endpoint {
        endpoint
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES))
    }

    /// The URL of a node's gRPC address: `host:port` gets `https://` with TLS, `http://`
    /// without; an address with a scheme keeps it, except that `http://` becomes `https://`
    /// with TLS (a TLS client never sends plaintext).
    pub fn endpoint_url(addr: &str, tls: bool) -> String {
        let rest = addr
            .strip_prefix("http://")
            .or_else(|| addr.strip_prefix("https://"));
        match (rest, tls) {
            (Some(rest), true) => format!("https://{rest}"),
            (Some(_), false) => addr.to_string(),
            (None, true) => format!("https://{addr}"),
            (None, false) => format!("http://{addr}"),
        }
    }

    /// A channel to `endpoint` that connects on first use (and reconnects when the connection
    /// breaks): over TLS with `tls`, else plain TCP. Every channel of nodes and clients is made
    /// here or by [`connect`].
    pub fn channel_lazy(endpoint: &Endpoint, tls: Option<&ClientTls>) -> Channel {
        match tls {
            Some(tls) => endpoint.connect_with_connector_lazy(TlsConnector::new(tls.clone())),
            None => endpoint.connect_lazy(),
        }
    }

    /// Connects a channel to `endpoint` now: over TLS with `tls`, else plain TCP.
    pub async fn connect(
        endpoint: &Endpoint,
        tls: Option<&ClientTls>,
    ) -> Result<Channel, tonic::transport::Error> {
        match tls {
            Some(tls) => {
                endpoint
                    .connect_with_connector(TlsConnector::new(tls.clone()))
                    .await
            }
            None => endpoint.connect().await,
        }
    }

    /// A `KvCache` client over `channel` that accepts and sends messages up to
    /// [`MAX_MESSAGE_BYTES`].
    pub fn kv_client(channel: Channel) -> KvCacheClient<Channel> {
        KvCacheClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Metadata header that carries the bearer token (`authorization: Bearer <token>`).
    pub const AUTHORIZATION_HEADER: &str = "authorization";

    /// Metadata header with which a node forwarding a request names the tenant it acts for.
    /// A receiving node honours it only from callers authenticated as `peer` or `admin`.
    pub const TENANT_HEADER: &str = "x-kvshare-tenant";

    /// An interceptor that adds `authorization: Bearer <token>` to every request; a no-op
    /// without a token.
    #[derive(Clone, Default)]
    pub struct BearerToken {
        value: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    }

    impl std::fmt::Debug for BearerToken {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            // Never print the token.
            let shown = if self.value.is_some() {
                "Some(<redacted>)"
            } else {
                "None"
            };
            f.debug_struct("BearerToken")
                .field("token", &shown)
                .finish()
        }
    }

    /// A token that cannot go in a header (characters outside visible ASCII).
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("the token must be visible ASCII characters (no spaces or control characters)")]
    pub struct InvalidToken;

    impl BearerToken {
        /// An interceptor sending `token` (surrounding whitespace removed; `None` or an empty
        /// token: sends nothing).
        pub fn new(token: Option<&str>) -> Result<Self, InvalidToken> {
            let Some(t) = token.map(str::trim).filter(|t| !t.is_empty()) else {
                return Ok(BearerToken::default());
            };
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(InvalidToken);
            }
            let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {t}").parse().map_err(|_| InvalidToken)?;
            v.set_sensitive(true);
            Ok(BearerToken { value: Some(v) })
        }

        /// Whether a token is sent.
        pub fn is_set(&self) -> bool {
            self.value.is_some()
        }
    }

    impl tonic::service::Interceptor for BearerToken {
        fn call(
            &mut self,
            mut request: tonic::Request<()>,
        ) -> Result<tonic::Request<()>, tonic::Status> {
            if let Some(v) = &self.value {
                request
                    .metadata_mut()
                    .insert(AUTHORIZATION_HEADER, v.clone());
            }
            Ok(request)
        }
    }

    /// A secret string (a bearer token) whose `Debug` and `Display` never show it, so a struct
    /// holding one (command-line arguments, configuration) can derive `Debug` and be logged.
    /// Parses from any string (`FromStr`), so `clap` takes it as an argument type.
    #[derive(Clone, Default, PartialEq, Eq)]
    pub struct Secret(String);

    impl Secret {
        /// Wraps `value`.
        pub fn new(value: impl Into<String>) -> Self {
            Secret(value.into())
        }

        /// The secret itself, for the one place that sends or hashes it.
        pub fn expose(&self) -> &str {
            &self.0
        }
    }

    impl std::fmt::Debug for Secret {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("<redacted>")
        }
    }

    impl std::fmt::Display for Secret {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("<redacted>")
        }
    }

    impl std::str::FromStr for Secret {
        type Err = std::convert::Infallible;

        fn from_str(s: &str) -> Result<Self, Self::Err> {
            Ok(Secret(s.to_string()))
        }
    }

    impl From<String> for Secret {
        fn from(value: String) -> Self {
            Secret(value)
        }
    }

    /// A `KvCache` client that sends a bearer token (when it has one) on every request.
    pub type KvClient =
        KvCacheClient<tonic::service::interceptor::InterceptedService<Channel, BearerToken>>;

    /// A [`KvClient`] over `channel` sending `token`, with the message limits of [`kv_client`].
    pub fn kv_client_with_token(channel: Channel, token: BearerToken) -> KvClient {
        KvCacheClient::with_interceptor(channel, token)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use tonic::service::Interceptor;

        #[test]
        fn bearer_token_adds_the_header_only_when_set() {
            let mut none = BearerToken::new(None).expect("none");
            let r = none.call(tonic::Request::new(())).expect("call");
            assert!(r.metadata().get(AUTHORIZATION_HEADER).is_none());
            assert!(!BearerToken::new(Some("  ")).expect("blank").is_set());
            let mut t = BearerToken::new(Some(" s3cret ")).expect("token");
            let r = t.call(tonic::Request::new(())).expect("call");
            assert_eq!(
                r.metadata()
                    .get(AUTHORIZATION_HEADER)
                    .map(|v| v.to_str().ok()),
                Some(Some("Bearer s3cret"))
            );
            assert!(!format!("{t:?}").contains("s3cret"));
            assert_eq!(BearerToken::new(Some("a b")).err(), Some(InvalidToken));
            assert_eq!(BearerToken::new(Some("é")).err(), Some(InvalidToken));
        }

        #[test]
        fn secrets_never_print() {
            let s: Secret = "s3cret-value".parse().unwrap_or_default();
            assert_eq!(s.expose(), "s3cret-value");
            for shown in [format!("{s:?}"), format!("{s}"), format!("{:?}", Some(&s))] {
                assert!(!shown.contains("s3cret"), "{shown}");
                assert!(shown.contains("redacted"), "{shown}");
            }
            assert_eq!(Secret::from("x".to_string()), Secret::new("x"));
        }
    }
}

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

#[cfg(test)]
mod transport_tests {
    use super::transport::endpoint_url;

    #[test]
    fn endpoint_urls() {
        assert_eq!(endpoint_url("a:1", false), "http://a:1");
        assert_eq!(endpoint_url("a:1", true), "https://a:1");
        assert_eq!(endpoint_url("http://a:1", true), "https://a:1");
        assert_eq!(endpoint_url("http://a:1", false), "http://a:1");
        assert_eq!(endpoint_url("https://a:1", true), "https://a:1");
        assert_eq!(endpoint_url("https://a:1", false), "https://a:1");
    }
}
