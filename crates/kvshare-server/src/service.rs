//! The `kvshare.v1.KvCache` gRPC service of one node: a thin adapter that validates each
//! request, answers it from the local store or through [`routing`](crate::routing), and records
//! its metrics. The node's state lives in [`state`](crate::state), uploads in
//! [`put`](crate::put).

use std::sync::Arc;
use std::time::Instant;

use kvshare_core::BlockKey;

use crate::auth::{Space, Tenant};
use kvshare_proto::transport::is_no_forward;
use kvshare_proto::v1 as pb;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::capacity;
use crate::deadline;
use crate::get::{self, GetStream};
use crate::metrics::Method;
use crate::put::PutSession;
use crate::request::parse_namespaced_keys;
use crate::routing;
use crate::state::{NodeState, Scope};

/// What the service knows about a request once it is admitted.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The request carries the do-not-forward header.
    pub no_forward: bool,
    /// The tenant it acts for.
    pub tenant: Tenant,
    /// The caller sees every tenant (admin, peer, or auth off).
    pub all_tenants: bool,
}

/// The gRPC service.
#[derive(Clone)]
pub struct KvCacheService {
    state: Arc<NodeState>,
}

impl KvCacheService {
    /// A service over `state`.
    pub fn new(state: Arc<NodeState>) -> Self {
        KvCacheService { state }
    }

    /// Admits the request (protected mode, token, role: [`crate::auth`]), runs `handler` and
    /// records the RPC's latency and status code.
    async fn serve<Req, T>(
        &self,
        method: Method,
        request: Request<Req>,
        handler: impl AsyncFnOnce(Ctx, Request<Req>) -> Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let t0 = Instant::now();
        let no_forward = is_no_forward(request.metadata());
        let admitted = self.admit(
            method,
            no_forward,
            request.remote_addr(),
            request.metadata(),
        );
        let r = match admitted {
            Ok(ctx) => {
                let until = deadline::from_metadata(request.metadata());
                deadline::scope(until, handler(ctx, request)).await
            }
            Err(s) => Err(s),
        };
        self.record_rpc(method, t0, r.map(Response::new))
    }

    /// Admits a `method` request from `remote` with these headers (protected mode, token,
    /// role): what it may do and for which tenant.
    pub(crate) fn admit(
        &self,
        method: Method,
        no_forward: bool,
        remote: Option<std::net::SocketAddr>,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Ctx, Status> {
        let (tenant, all_tenants) =
            self.state
                .auth
                .admit_parts(&self.state.store, method, no_forward, remote, metadata)?;
        Ok(Ctx {
            no_forward,
            tenant,
            all_tenants,
        })
    }

    /// The node this service serves.
    pub(crate) fn state(&self) -> &Arc<NodeState> {
        &self.state
    }

    /// Records an RPC's latency and status code, and passes its result through.
    pub(crate) fn record_rpc<T>(
        &self,
        method: Method,
        t0: Instant,
        r: Result<T, Status>,
    ) -> Result<T, Status> {
        let code = r.as_ref().err().map_or(Code::Ok, Status::code);
        self.state
            .metrics
            .observe_rpc(method, code, t0.elapsed().as_secs_f64());
        r
    }

    /// Namespace and keys of a Lookup, Get or Delete, validated against this node's limits, and
    /// where the request is answered.
    pub(crate) fn target(
        &self,
        ctx: &Ctx,
        namespace: &[u8],
        keys: &[bytes::Bytes],
        packed_keys: &[u8],
    ) -> Result<(Space, Vec<BlockKey>, Scope), Status> {
        let (ns, keys) =
            parse_namespaced_keys(namespace, keys, packed_keys, self.state.limits.max_keys)?;
        Ok((
            ctx.tenant.space_of(ns),
            keys,
            self.state.scope(ctx.no_forward),
        ))
    }

    async fn lookup(
        &self,
        ctx: Ctx,
        request: Request<pb::LookupRequest>,
    ) -> Result<pb::LookupResponse, Status> {
        let (s, req) = (&self.state, request.get_ref());
        let no_forward = ctx.no_forward;
        let (ns, keys, scope) = self.target(&ctx, &req.namespace, &req.keys, &req.packed_keys)?;
        let (present, nodes) = match scope {
            Scope::Local => (s.store.presence(ns.store, &keys), vec![s.node_id.clone()]),
            Scope::Cluster(view) => {
                let p = routing::lookup(s, &view, &ns, &keys).await;
                (
                    p,
                    view.members().iter().map(|m| m.node_id.clone()).collect(),
                )
            }
        };
        let hit = present.iter().take_while(|p| **p).count();
        if no_forward {
            s.count_peer_request(Method::lookup);
        } else {
            s.metrics.count_client_lookup(
                keys.len() as u64,
                hit as u64,
                u64::from(s.store.tokens_per_block(&ns.store)),
            );
        }
        Ok(pb::LookupResponse {
            hit_blocks: hit as u32,
            nodes: if hit > 0 { nodes } else { vec![] },
            present: if req.per_key { present } else { vec![] },
        })
    }

    async fn get(&self, ctx: Ctx, request: Request<pb::GetRequest>) -> Result<GetStream, Status> {
        let chunk = self.state.limits.get_chunk_size;
        self.get_stream(ctx, request.get_ref(), chunk)
    }

    /// The response stream of a Get, its blocks in messages of at most `chunk` payload bytes.
    pub(crate) fn get_stream(
        &self,
        ctx: Ctx,
        req: &pb::GetRequest,
        chunk: usize,
    ) -> Result<GetStream, Status> {
        let no_forward = ctx.no_forward;
        let (ns, keys, scope) = self.target(&ctx, &req.namespace, &req.keys, &req.packed_keys)?;
        if no_forward {
            self.state.count_peer_request(Method::get);
        }
        Ok(get::respond(
            self.state.clone(),
            ns,
            keys,
            scope,
            !no_forward,
            chunk,
        ))
    }

    async fn delete(
        &self,
        ctx: Ctx,
        request: Request<pb::DeleteRequest>,
    ) -> Result<pb::DeleteResponse, Status> {
        let (s, req) = (&self.state, request.get_ref());
        let (ns, keys, scope) = self.target(&ctx, &req.namespace, &req.keys, &req.packed_keys)?;
        let deleted = match scope {
            Scope::Local => s.remove_local(ns.store, &keys),
            Scope::Cluster(view) => routing::delete(s, &view, &ns, &keys).await,
        };
        s.metrics.deletes.inc_by(u64::from(deleted));
        Ok(pb::DeleteResponse { deleted })
    }
}

impl KvCacheService {
    async fn put(
        &self,
        ctx: Ctx,
        request: Request<Streaming<pb::PutRequest>>,
    ) -> Result<pb::PutResponse, Status> {
        if ctx.no_forward {
            self.state.count_peer_request(Method::put);
        }
        let session = PutSession::new(&self.state, ctx.no_forward, ctx.tenant);
        session.run(request.into_inner()).await
    }

    async fn stats(
        &self,
        ctx: Ctx,
        request: Request<pb::StatsRequest>,
    ) -> Result<pb::StatsResponse, Status> {
        let top = request.get_ref().top_namespaces;
        Ok(if ctx.all_tenants {
            self.state.stats(top)
        } else {
            self.state.tenant_stats(&ctx.tenant, top)
        })
    }

    async fn cluster_info(
        &self,
        _: Ctx,
        _: Request<pb::ClusterInfoRequest>,
    ) -> Result<pb::ClusterInfoResponse, Status> {
        let s = &self.state;
        Ok(pb::ClusterInfoResponse {
            node_id: s.node_id.clone(),
            members: s.cluster.members_info(),
            replicas: s.cluster.replicas(),
            placement: kvshare_core::placement::PLACEMENT_NAME.into(),
            instance_id: s.cluster.instance_id.clone(),
            started_unix_ms: s.cluster.started_unix_ms,
            configured_replicas: s.cluster.configured_replicas(),
            bulk_port: u32::from(s.bulk_port),
        })
    }

    /// Admin: changes this node's capacity (never forwarded: one call per node).
    async fn set_capacity(
        &self,
        _: Ctx,
        request: Request<pb::SetCapacityRequest>,
    ) -> Result<pb::SetCapacityResponse, Status> {
        let bytes = capacity::check_capacity(request.get_ref().capacity_bytes)?;
        capacity::set_capacity(&self.state, bytes).await
    }
}

/// The `KvCache` trait: every RPC goes through [`KvCacheService::serve`] (admission: protected
/// mode, token and role; do-not-forward header, latency and status metrics) to the handler of the same name above.
macro_rules! kv_cache_rpcs {
    ($($rpc:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl pb::kv_cache_server::KvCache for KvCacheService {
            type GetStream = GetStream;
            $(
                async fn $rpc(&self, request: Request<$req>) -> Result<Response<$resp>, Status> {
                    let handler = async |nf, r| KvCacheService::$rpc(self, nf, r).await;
                    self.serve(Method::$rpc, request, handler).await
                }
            )*
        }
    };
}

kv_cache_rpcs! {
    lookup(pb::LookupRequest) -> pb::LookupResponse;
    put(Streaming<pb::PutRequest>) -> pb::PutResponse;
    get(pb::GetRequest) -> GetStream;
    delete(pb::DeleteRequest) -> pb::DeleteResponse;
    stats(pb::StatsRequest) -> pb::StatsResponse;
    cluster_info(pb::ClusterInfoRequest) -> pb::ClusterInfoResponse;
    set_capacity(pb::SetCapacityRequest) -> pb::SetCapacityResponse;
}
