//! Get responses written to the wire without copying block bytes.
//!
//! tonic encodes every response message into its own buffer, so each byte of a block a Get
//! returns was copied once more on the node (and the copy's buffer faulted in): perf put that
//! copy at a fifth of a node's CPU on 1 MiB Gets. [`ZeroCopyGet`] sits in front of the generated
//! `KvCacheServer` and answers `Get` itself: the request is decoded and handed to the same
//! [`KvCache::get`] (auth, deadlines, routing, budget and metrics are unchanged), and each
//! response message is framed as two pieces: a small head (the gRPC length prefix, every field
//! but `data`, then the `data` field's tag and length) and the `data` bytes themselves, a slice
//! of the stored block that h2 writes to the socket with a vectored write. Protobuf allows
//! fields in any order, so any gRPC client decodes these messages as usual. Every other method
//! goes to tonic unchanged.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use kvshare_proto::v1 as pb;
use kvshare_proto::v1::kv_cache_server::{KvCache, KvCacheServer};
use prost::Message;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::get::GetStream;
use crate::service::KvCacheService;

/// The path of the Get method.
pub const GET_PATH: &str = "/kvshare.v1.KvCache/Get";

/// Largest Get request accepted (far above any key list a node allows).
const MAX_GET_REQUEST_BYTES: usize = 8 << 20;

/// Size of a gRPC message's length prefix.
const PREFIX_LEN: usize = 5;

/// Protobuf tag of `GetResponse.data` (field 6, length-delimited).
const DATA_TAG: u8 = (6 << 3) | 2;

/// The KvCache service with Get answered without copying block bytes (module docs).
#[derive(Clone)]
pub struct ZeroCopyGet {
    inner: KvCacheServer<KvCacheService>,
    service: KvCacheService,
    /// How long a Get request's body may take to arrive.
    request_timeout: Duration,
}

impl ZeroCopyGet {
    /// Wraps `inner`, which serves `service`, answering Gets through `service` directly.
    pub fn new(
        inner: KvCacheServer<KvCacheService>,
        service: KvCacheService,
        request_timeout: Duration,
    ) -> Self {
        ZeroCopyGet {
            inner,
            service,
            request_timeout,
        }
    }
}

impl NamedService for ZeroCopyGet {
    const NAME: &'static str = <KvCacheServer<KvCacheService> as NamedService>::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower::Service<::http::Request<Body>> for ZeroCopyGet {
    type Response = ::http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<::http::Request<Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: ::http::Request<Body>) -> Self::Future {
        if req.uri().path() != GET_PATH {
            return Box::pin(self.inner.call(req));
        }
        let service = self.service.clone();
        let timeout = self.request_timeout;
        Box::pin(async move { Ok(serve_get(service, req, timeout).await) })
    }
}

/// Answers one Get: decode, [`KvCache::get`], frame the stream.
async fn serve_get(
    service: KvCacheService,
    req: ::http::Request<Body>,
    timeout: Duration,
) -> ::http::Response<Body> {
    let (parts, body) = req.into_parts();
    let message = match tokio::time::timeout(timeout, read_request(&parts.headers, body)).await {
        Ok(Ok(m)) => m,
        Ok(Err(status)) => return status.into_http(),
        Err(_) => {
            return Status::deadline_exceeded(format!(
                "the Get request did not arrive within {timeout:?}"
            ))
            .into_http();
        }
    };
    let request = tonic::Request::from_http(::http::Request::from_parts(parts, message));
    match KvCache::get(&service, request).await {
        Ok(response) => {
            let (metadata, stream, _) = response.into_parts();
            let mut response = ::http::Response::new(Body::new(GetBody {
                stream,
                data: None,
                done: false,
            }));
            *response.headers_mut() = metadata.into_headers();
            response.headers_mut().insert(
                ::http::header::CONTENT_TYPE,
                ::http::HeaderValue::from_static("application/grpc"),
            );
            response
        }
        Err(status) => status.into_http(),
    }
}

/// Reads and decodes the one GetRequest of a call.
async fn read_request(headers: &::http::HeaderMap, body: Body) -> Result<pb::GetRequest, Status> {
    if let Some(enc) = headers.get("grpc-encoding")
        && enc.as_bytes() != b"identity"
    {
        return Err(Status::unimplemented(format!(
            "this node does not accept compressed requests (grpc-encoding {enc:?}); send them uncompressed"
        )));
    }
    let bytes = http_body_util::Limited::new(body, MAX_GET_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| {
            Status::resource_exhausted(format!(
                "reading the Get request failed (at most {MAX_GET_REQUEST_BYTES} bytes): {e}"
            ))
        })?
        .to_bytes();
    decode_request(&bytes)
}

/// Decodes a request body holding exactly one uncompressed gRPC message.
fn decode_request(bytes: &[u8]) -> Result<pb::GetRequest, Status> {
    let invalid = |m: String| Status::invalid_argument(format!("malformed Get request: {m}"));
    let Some((prefix, message)) = bytes.split_first_chunk::<PREFIX_LEN>() else {
        return Err(invalid(format!(
            "{} bytes, shorter than a gRPC message prefix",
            bytes.len()
        )));
    };
    if prefix[0] != 0 {
        return Err(Status::unimplemented(
            "this node does not accept compressed requests; send them uncompressed",
        ));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len != message.len() {
        return Err(invalid(format!(
            "the message prefix says {len} bytes but {} follow (a unary call carries one message)",
            message.len()
        )));
    }
    pb::GetRequest::decode(message).map_err(|e| invalid(e.to_string()))
}

/// The response body: each message as a head frame and a data frame, then the trailers.
struct GetBody {
    stream: GetStream,
    /// The data of the message whose head was just sent.
    data: Option<Bytes>,
    done: bool,
}

/// A message's head: the gRPC prefix, the encoded fields other than `data`, and `data`'s tag
/// and length (when it has data), so that head + data is the whole encoded message.
fn encode_head(mut msg: pb::GetResponse) -> Result<(Bytes, Bytes), Status> {
    let data = std::mem::take(&mut msg.data);
    let fields = msg.encoded_len();
    let data_field = if data.is_empty() {
        0
    } else {
        1 + prost::length_delimiter_len(data.len()) + data.len()
    };
    let total = u32::try_from(fields + data_field)
        .map_err(|_| Status::internal("a Get response message is over 4 GiB"))?;
    let mut head = BytesMut::with_capacity(PREFIX_LEN + fields + 11);
    head.put_u8(0);
    head.put_u32(total);
    msg.encode_raw(&mut head);
    if !data.is_empty() {
        head.put_u8(DATA_TAG);
        prost::encoding::encode_varint(data.len() as u64, &mut head);
    }
    Ok((head.freeze(), data))
}

/// Trailers ending the call with `status` (OK when `None`).
fn trailers(status: Option<Status>) -> ::http::HeaderMap {
    let mut map = ::http::HeaderMap::new();
    let status = status.unwrap_or_else(|| Status::ok(""));
    if status.add_header(&mut map).is_err() {
        map.insert("grpc-status", ::http::HeaderValue::from_static("13"));
    }
    map
}

impl http_body::Body for GetBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        match self.stream.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(msg))) => match encode_head(msg) {
                Ok((head, data)) => {
                    if !data.is_empty() {
                        self.data = Some(data);
                    }
                    Poll::Ready(Some(Ok(Frame::data(head))))
                }
                Err(status) => {
                    self.done = true;
                    Poll::Ready(Some(Ok(Frame::trailers(trailers(Some(status))))))
                }
            },
            Poll::Ready(Some(Err(status))) => {
                self.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(Some(status))))))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(None)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.data.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_plus_data_is_the_whole_message_in_any_decoder() {
        for data in [
            Bytes::new(),
            Bytes::from(vec![7u8; 300]),
            Bytes::from(vec![1u8; 70_000]),
        ] {
            let msg = pb::GetResponse {
                index: 3,
                key: Bytes::from(vec![2u8; 32]),
                found: true,
                header: Some(pb::BlockHeader {
                    raw_len: 9,
                    payload_checksum: Some(5),
                    ..Default::default()
                }),
                offset: 4096,
                data: data.clone(),
                last: true,
            };
            let (head, rest) = encode_head(msg.clone()).expect("encode");
            let mut wire = head.to_vec();
            wire.extend_from_slice(&rest);
            assert_eq!(wire[0], 0);
            let len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]) as usize;
            assert_eq!(len, wire.len() - PREFIX_LEN);
            let back = pb::GetResponse::decode(&wire[PREFIX_LEN..]).expect("decode");
            assert_eq!(back, msg);
            // The data travels as its own piece, not copied.
            assert_eq!(rest.as_ptr(), data.as_ptr());
        }
    }

    #[test]
    fn requests_are_checked() {
        let msg = pb::GetRequest {
            namespace: Bytes::from(vec![1u8; 32]),
            keys: vec![Bytes::from(vec![2u8; 32])],
            packed_keys: Bytes::new(),
        };
        let mut body = vec![0u8];
        body.extend_from_slice(&(msg.encoded_len() as u32).to_be_bytes());
        msg.encode(&mut body).expect("encode");
        assert_eq!(decode_request(&body).expect("decode"), msg);
        let short = decode_request(&body[..3]).unwrap_err();
        assert_eq!(short.code(), tonic::Code::InvalidArgument);
        let cut = decode_request(&body[..body.len() - 1]).unwrap_err();
        assert!(cut.message().contains("prefix says"), "{}", cut.message());
        let mut compressed = body.clone();
        compressed[0] = 1;
        assert_eq!(
            decode_request(&compressed).unwrap_err().code(),
            tonic::Code::Unimplemented
        );
    }
}
