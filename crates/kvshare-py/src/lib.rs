//! `kvshare._native`: Python bindings of kvshare (PyO3, abi3 for CPython >= 3.11).
//!
//! A thin layer over `kvshare-client` and `kvshare-core`: conversions, GIL release and errors.
//! Transport ([`ClusterClient`]), codecs, checksums and hashing stay in those crates. Every call
//! that compresses, decompresses, hashes or waits for the network releases the GIL; block
//! payloads are read from and decoded into the caller's buffers (buffer protocol: `bytes`,
//! `bytearray`, numpy arrays, CPU torch tensors through a `uint8` view of their storage).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvshare_client::{ClientError, ClientOptions, ClusterClient, KvClient, encode_blocks};
use kvshare_core::keys::{chained_block_key, vllm_block_key};
use kvshare_core::{
    BlockKey, Codec, CoreError, DType, EncodedBlock, KeyScheme, KvLayout, Namespace, VllmHashParams,
};
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use rayon::prelude::*;

pyo3::create_exception!(
    _native,
    KvshareError,
    PyException,
    "A kvshare call failed. `code` is the gRPC status name (e.g. \"UNAVAILABLE\") or None when \
     the failure has no status (connection setup, protocol, invalid input); `code_value` is its \
     number or None."
);

/// vLLM's fixed seed for `NONE_HASH` of cryptographic hash algorithms when `PYTHONHASHSEED`
/// is not set (vLLM >= 0.32, `vllm.v1.core.kv_cache_utils.DEFAULT_NONE_HASH_SEED`).
pub const VLLM_DEFAULT_SEED: &str = "vllm-none-hash";

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn kv_err(py: Python<'_>, message: String, code: Option<tonic::Code>) -> PyErr {
    let err = KvshareError::new_err(message);
    let value = err.value(py);
    let _ = value.setattr("code", code.map(code_name));
    let _ = value.setattr("code_value", code.map(|c| c as i32));
    err
}

/// Whether `code` is the cluster refusing this client's credentials (it answered: not a tier
/// that is down).
fn is_refusal(code: Option<tonic::Code>) -> bool {
    matches!(
        code,
        Some(tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
    )
}

fn client_err(py: Python<'_>, e: ClientError) -> PyErr {
    // Every member refusing the client (no token, an unknown token, a role that may not call
    // ClusterInfo) is reported as that refusal, with its code, not as an unreachable cluster.
    if let ClientError::NoMemberReachable {
        endpoints,
        last: Some(last),
    } = &e
        && is_refusal(last.code())
    {
        let message = format!(
            "the kvshare cluster ({endpoints}) refused this client: {last} (give \
             kvshare.Client a token=...; the vLLM connector reads \"token\" from \
             kv_connector_extra_config, else KVSHARE_TOKEN)"
        );
        return kv_err(py, message, last.code());
    }
    let code = e.code();
    kv_err(py, e.to_string(), code)
}

fn core_err(e: CoreError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// CPUs of the machine (not of this thread's affinity mask).
fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 { n as usize } else { 1 }
}

/// Lets a kvshare thread run on every CPU. Engines bind their compute threads to cores (vLLM's
/// CPU backend pins its workers and reserves the remaining cores for the scheduler and KV
/// connectors); threads inherit the mask of the thread that spawns them, which would confine
/// decompression to the engine's compute cores. `KVSHARE_UNPIN_THREADS=0` keeps the inherited
/// mask. The kernel intersects the mask with the process's cpuset.
fn unpin_thread() {
    if std::env::var("KVSHARE_UNPIN_THREADS").is_ok_and(|v| v == "0") {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for i in 0..online_cpus().min(libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(i, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Threads that decode and encode blocks (rayon) and drive the network (tokio).
fn worker_threads() -> usize {
    online_cpus().clamp(1, 8)
}

/// The extension's tokio runtime, built on first use (a failure to build it is raised).
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        // The codec pool: rayon's global pool, sized to the machine rather than to the
        // (possibly pinned) calling thread. Fails harmlessly if it already exists.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(worker_threads())
            .thread_name(|i| format!("kvshare-codec-{i}"))
            .start_handler(|_| unpin_thread())
            .build_global();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvshare-py")
            .on_thread_start(unpin_thread)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the kvshare runtime: {e}"))
    });
    rt.as_ref()
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.clone()))
}

// ---------------------------------------------------------------------------------------------
// Buffers
// ---------------------------------------------------------------------------------------------

/// A contiguous byte buffer exported by a Python object; released (with the GIL) on drop.
struct Buf {
    view: Box<pyo3::ffi::Py_buffer>,
    // Keeps an intermediate object (the numpy view of a torch tensor) alive.
    _owner: Py<PyAny>,
}

// SAFETY: the exporter keeps the memory alive and in place until `PyBuffer_Release`; we only
// touch the bytes (not Python objects) while the GIL is released, as every buffer consumer does.
unsafe impl Send for Buf {}
unsafe impl Sync for Buf {}

impl Buf {
    fn get(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Buf> {
        match Self::export(obj, writable) {
            Ok(b) => Ok(b),
            Err(e) => {
                // torch tensors do not export buffers: take a uint8 numpy view of their memory.
                if obj.hasattr("untyped_storage")? && obj.hasattr("numpy")? {
                    let torch = obj.py().import("torch")?;
                    let u8v = obj
                        .call_method0("detach")?
                        .call_method1("view", (torch.getattr("uint8")?,))?
                        .call_method0("numpy")?;
                    Self::export(&u8v, writable)
                } else {
                    Err(e)
                }
            }
        }
    }

    fn export(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Buf> {
        let mut view: Box<pyo3::ffi::Py_buffer> = Box::new(unsafe { std::mem::zeroed() });
        let flags = if writable {
            pyo3::ffi::PyBUF_WRITABLE
        } else {
            pyo3::ffi::PyBUF_SIMPLE
        };
        // SAFETY: `view` is a valid, zeroed Py_buffer; on success it is released in Drop.
        let rc = unsafe { pyo3::ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) };
        if rc != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        Ok(Buf {
            view,
            _owner: obj.clone().unbind(),
        })
    }

    fn len(&self) -> usize {
        self.view.len as usize
    }

    fn bytes(&self) -> &[u8] {
        if self.len() == 0 {
            return &[];
        }
        // SAFETY: PyBUF_SIMPLE/WRITABLE exports a contiguous region of `len` bytes.
        unsafe { std::slice::from_raw_parts(self.view.buf as *const u8, self.len()) }
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes_mut(&self) -> &mut [u8] {
        if self.len() == 0 {
            return &mut [];
        }
        // SAFETY: exported with PyBUF_WRITABLE (checked by the exporter); exclusive use is the
        // caller's contract, as for any buffer consumer.
        unsafe { std::slice::from_raw_parts_mut(self.view.buf as *mut u8, self.len()) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        Python::with_gil(|_| unsafe { pyo3::ffi::PyBuffer_Release(&mut *self.view) });
    }
}

fn keys_from(keys: Vec<Vec<u8>>) -> PyResult<Vec<BlockKey>> {
    keys.iter()
        .map(|k| BlockKey::from_slice(k).map_err(core_err))
        .collect()
}

/// The namespace digest of a `Namespace` or of 32 raw digest bytes.
fn digest_of(obj: &Bound<'_, PyAny>) -> PyResult<BlockKey> {
    if let Ok(ns) = obj.downcast::<PyNamespace>() {
        return Ok(ns.get().inner.digest());
    }
    let b: Vec<u8> = obj.extract().map_err(|_| {
        PyValueError::new_err("namespace must be a Namespace or its 32-byte digest")
    })?;
    BlockKey::from_slice(&b).map_err(core_err)
}

fn keys_to_py<'py>(py: Python<'py>, keys: &[BlockKey]) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, keys.iter().map(|k| PyBytes::new(py, k.as_bytes())))
}

// ---------------------------------------------------------------------------------------------
// Namespace
// ---------------------------------------------------------------------------------------------

/// Everything that makes two KV caches incompatible. Blocks of different namespaces never
/// match.
///
/// Args:
///     model: model id.
///     num_layers, num_kv_heads, head_dim: KV layout of one block (all layers, K and V).
///     dtype: "bf16", "f16", "f32" or "u8" (fp8/int8).
///     tokens_per_block: tokens per block.
///     revision: model revision (commit, tag or weights fingerprint); free text otherwise
///         (the vLLM connector adds the engine's KV memory layout here).
///     tp_rank, tp_size: tensor-parallel rank and size whose heads the blocks hold.
///     lora: LoRA adapter name, if any.
///     tenant_salt: isolation salt: namespaces with different salts never share blocks.
///     scheme: how keys are computed: "kvshare" (chained SHA-256 rooted at `digest`) or
///         "vllm" (vLLM's `sha256_cbor` block hashes, computed by the caller or by
///         `hash_blocks(..., scheme="vllm")`).
#[pyclass(name = "Namespace", module = "kvshare._native", frozen)]
struct PyNamespace {
    inner: Namespace,
}

#[pymethods]
impl PyNamespace {
    #[new]
    #[pyo3(signature = (model, *, num_layers, num_kv_heads, head_dim, dtype, tokens_per_block,
        revision = String::new(), tp_rank = 0, tp_size = 1, lora = None, tenant_salt = None,
        scheme = "kvshare"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: String,
        num_layers: u32,
        num_kv_heads: u32,
        head_dim: u32,
        dtype: &str,
        tokens_per_block: u32,
        revision: String,
        tp_rank: u32,
        tp_size: u32,
        lora: Option<String>,
        tenant_salt: Option<String>,
        scheme: &str,
    ) -> PyResult<Self> {
        let layout = KvLayout {
            num_layers,
            num_kv_heads,
            head_dim,
            dtype: DType::parse(dtype).map_err(core_err)?,
            tokens_per_block,
        };
        layout.validate().map_err(core_err)?;
        if tp_size == 0 || tp_rank >= tp_size {
            return Err(PyValueError::new_err(format!(
                "tp_rank {tp_rank} is not below tp_size {tp_size}"
            )));
        }
        let scheme = match scheme {
            "kvshare" | "chained" => KeyScheme::Chained,
            "vllm" | "sha256_cbor" => KeyScheme::VllmSha256Cbor(VllmHashParams::default()),
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown key scheme {other:?}; expected \"kvshare\" or \"vllm\""
                )));
            }
        };
        Ok(PyNamespace {
            inner: Namespace {
                model,
                revision,
                layout,
                tp_rank,
                tp_size,
                lora,
                tenant_salt,
                scheme,
            },
        })
    }

    /// The namespace digest (32 bytes): its identity on the wire, root of kvshare-scheme keys.
    #[getter]
    fn digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.digest().as_bytes())
    }

    /// Raw (uncompressed) bytes of one block.
    #[getter]
    fn block_bytes(&self) -> u64 {
        self.inner.layout.block_bytes()
    }

    /// Tokens per block.
    #[getter]
    fn tokens_per_block(&self) -> u32 {
        self.inner.layout.tokens_per_block
    }

    /// Key scheme: "kvshare" or "vllm".
    #[getter]
    fn scheme(&self) -> &'static str {
        match self.inner.scheme {
            KeyScheme::Chained => "kvshare",
            KeyScheme::VllmSha256Cbor(_) => "vllm",
        }
    }

    /// Model id.
    #[getter]
    fn model(&self) -> String {
        self.inner.model.clone()
    }

    /// Keys of every full block of `tokens` in the kvshare scheme (chained from `digest`).
    fn block_keys<'py>(&self, py: Python<'py>, tokens: Vec<u32>) -> PyResult<Bound<'py, PyList>> {
        if !matches!(self.inner.scheme, KeyScheme::Chained) {
            return Err(PyValueError::new_err(
                "block_keys is for the kvshare scheme; use vLLM's block hashes or \
                 hash_blocks(..., scheme=\"vllm\")",
            ));
        }
        let ns = self.inner.clone();
        let keys = py.allow_threads(move || ns.block_keys(&tokens));
        keys_to_py(py, &keys.map_err(core_err)?)
    }

    fn __repr__(&self) -> String {
        let l = &self.inner.layout;
        format!(
            "Namespace(model={:?}, revision={:?}, layers={}, kv_heads={}, head_dim={}, dtype={}, \
             tokens_per_block={}, tp={}/{}, lora={:?}, salted={}, scheme={}, digest={})",
            self.inner.model,
            self.inner.revision,
            l.num_layers,
            l.num_kv_heads,
            l.head_dim,
            l.dtype.name(),
            l.tokens_per_block,
            self.inner.tp_rank,
            self.inner.tp_size,
            self.inner.lora,
            self.inner.tenant_salt.is_some(),
            self.scheme(),
            &self.inner.digest().to_hex()[..16],
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Hashing
// ---------------------------------------------------------------------------------------------

fn vllm_seed(seed: Option<String>) -> String {
    seed.or_else(|| std::env::var("PYTHONHASHSEED").ok())
        .unwrap_or_else(|| VLLM_DEFAULT_SEED.to_string())
}

/// vLLM's `NONE_HASH` (root of every `sha256_cbor` chain): SHA-256 of the CBOR text of the
/// seed. `seed` defaults to `PYTHONHASHSEED` when set, else "vllm-none-hash" (vLLM's rule for
/// cryptographic hash algorithms).
#[pyfunction]
#[pyo3(signature = (seed = None))]
fn vllm_none_hash(py: Python<'_>, seed: Option<String>) -> Bound<'_, PyBytes> {
    let params = VllmHashParams {
        python_hash_seed: vllm_seed(seed),
        ..Default::default()
    };
    PyBytes::new(py, params.none_hash().as_bytes())
}

/// Block keys of every full block of `tokens` (a trailing partial block is not keyed).
///
/// scheme="kvshare": `key_i = SHA-256("kvshare/block/v1" || key_{i-1} || u32-LE tokens)`,
/// rooted at `parent`, else at `namespace.digest`.
///
/// scheme="vllm": vLLM's `sha256_cbor` (`hash_block_tokens`):
/// `h_i = SHA-256(CBOR([h_{i-1}, [tokens], extra_keys or None]))`, rooted at `parent`, else at
/// `vllm_none_hash(seed)`. Extra keys follow vLLM 0.32's tagged form and order:
/// `("lora", name, path)` on every block, then `("cache_salt", salt)` on block 0 only
/// (absolute index: `first_block` is the index of the first block of `tokens` in the request,
/// used when continuing a chain from `parent`).
#[pyfunction]
#[pyo3(signature = (tokens, block_size, *, scheme = "kvshare", namespace = None, parent = None,
    seed = None, lora = None, cache_salt = None, first_block = 0))]
#[allow(clippy::too_many_arguments)]
fn hash_blocks<'py>(
    py: Python<'py>,
    tokens: Vec<u32>,
    block_size: usize,
    scheme: &str,
    namespace: Option<PyRef<'py, PyNamespace>>,
    parent: Option<Vec<u8>>,
    seed: Option<String>,
    lora: Option<(String, Option<String>)>,
    cache_salt: Option<String>,
    first_block: usize,
) -> PyResult<Bound<'py, PyList>> {
    if block_size == 0 {
        return Err(PyValueError::new_err("block_size must be > 0"));
    }
    let parent = parent
        .map(|p| BlockKey::from_slice(&p).map_err(core_err))
        .transpose()?;
    let keys = match scheme {
        "kvshare" | "chained" => {
            let root = match (parent, &namespace) {
                (Some(p), _) => p,
                (None, Some(ns)) => ns.inner.digest(),
                (None, None) => {
                    return Err(PyValueError::new_err(
                        "scheme \"kvshare\" needs namespace= or parent= (the chain's root)",
                    ));
                }
            };
            py.allow_threads(move || {
                let mut parent = root;
                tokens
                    .chunks_exact(block_size)
                    .map(|b| {
                        parent = chained_block_key(&parent, b);
                        parent
                    })
                    .collect::<Vec<_>>()
            })
        }
        "vllm" | "sha256_cbor" => {
            let (lora_name, lora_path) = lora.unzip();
            let params = VllmHashParams {
                python_hash_seed: vllm_seed(seed),
                lora_name,
                lora_path: lora_path.flatten(),
                cache_salt,
                extra: Vec::new(),
            };
            let root = parent.unwrap_or_else(|| params.none_hash());
            py.allow_threads(move || {
                let mut parent = root;
                tokens
                    .chunks_exact(block_size)
                    .enumerate()
                    .map(|(i, b)| {
                        // Past usize::MAX blocks no index is 0: no salt, as for any later block.
                        let extra = params.extra_keys(first_block.saturating_add(i));
                        parent = vllm_block_key(&parent, b, extra);
                        parent
                    })
                    .collect::<Vec<_>>()
            })
        }
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown key scheme {other:?}; expected \"kvshare\" or \"vllm\""
            )));
        }
    };
    keys_to_py(py, &keys)
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// Outcome of `Client.put_blocks`.
#[pyclass(name = "PutResult", module = "kvshare._native", frozen, get_all)]
struct PutResult {
    /// Blocks newly stored (by at least one owner).
    stored: usize,
    /// Blocks every reachable owner already had.
    already_present: usize,
    /// Raw bytes of the uploaded blocks.
    raw_bytes: u64,
    /// Encoded bytes sent per copy (the wire carries this times the replicas reached).
    wire_bytes: u64,
}

#[pymethods]
impl PutResult {
    fn __repr__(&self) -> String {
        format!(
            "PutResult(stored={}, already_present={}, raw_bytes={}, wire_bytes={})",
            self.stored, self.already_present, self.raw_bytes, self.wire_bytes
        )
    }
}

/// Block status codes of `GetResult.status`.
const GET_OK: u8 = 0;
const GET_MISSING: u8 = 1;
const GET_CORRUPT: u8 = 2;

/// Outcome of `Client.get_blocks`.
#[pyclass(name = "GetResult", module = "kvshare._native", frozen, get_all)]
struct GetResult {
    /// Per requested key: 0 = decoded into `out`, 1 = missing (no owner had it or none
    /// answered), 2 = corrupt (failed to decode, checksum mismatch, or another namespace or
    /// layout); its region of `out` is then unspecified.
    status: Vec<i32>,
    /// Leading blocks decoded (the usable prefix).
    prefix_blocks: usize,
    /// Encoded bytes received.
    wire_bytes: u64,
    /// Raw bytes written into `out`.
    raw_bytes: u64,
    /// A description of each failed block (index, key prefix, reason).
    errors: Vec<String>,
}

#[pymethods]
impl GetResult {
    fn __repr__(&self) -> String {
        format!(
            "GetResult(blocks={}, prefix_blocks={}, wire_bytes={}, raw_bytes={}, errors={})",
            self.status.len(),
            self.prefix_blocks,
            self.wire_bytes,
            self.raw_bytes,
            self.errors.len()
        )
    }
}

/// Cluster-aware client of a kvshare cluster (wraps the Rust `ClusterClient`): learns the
/// membership from any of `endpoints` and sends gets and puts straight to each key's owners.
///
/// Args:
///     endpoints: "host:port,host:port" or a list of addresses (http:// optional).
///     codec: compression of uploaded blocks: "byteplane-huff" (default), "byteplane-zstd",
///         "byteplane-lz4", "lz4" or "none".
///     timeout_ms: deadline of each RPC.
///     connect_timeout_ms: deadline of connection setup.
///     tls_ca: path of the CA certificate(s) (PEM) that sign the nodes' certificates: connect
///         with TLS (every endpoint becomes https://).
///     tls_cert, tls_key: paths of a client certificate and its key (PEM), for nodes that
///         require one (mTLS); need ``tls_ca``.
///     token: bearer token sent on every call (``authorization: Bearer <token>``), for nodes
///         started with ``--auth-file``; None (or empty) sends none. Never shown by ``repr``
///         or in errors. Not read from the environment: pass ``os.environ["KVSHARE_TOKEN"]``
///         explicitly (the vLLM connector does).
///
/// Raises:
///     KvshareError: no endpoint answered, or the TLS files do not load; ``code`` is
///         ``"UNAUTHENTICATED"`` when the nodes refuse the token (or its absence) and
///         ``"PERMISSION_DENIED"`` when they refuse its role.
///     ValueError: ``tls_cert`` without ``tls_key`` (or the reverse), or without ``tls_ca``;
///         a token with characters a header cannot carry (spaces, control characters,
///         non-ASCII).
#[pyclass(name = "Client", module = "kvshare._native", frozen)]
struct PyClient {
    inner: Arc<ClusterClient>,
    codec: Codec,
    endpoints: Vec<String>,
    opts: ClientOptions,
}

fn parse_endpoints(obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    let list: Vec<String> = if let Ok(s) = obj.extract::<String>() {
        s.split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect()
    } else {
        obj.extract::<Vec<String>>()?
    };
    if list.is_empty() {
        return Err(PyValueError::new_err("no kvshare endpoints given"));
    }
    Ok(list)
}

/// Checks that a buffer of `len` bytes holds exactly `nkeys` blocks of `block_bytes`; returns
/// the block size.
fn check_blocks(what: &str, len: usize, nkeys: usize, block_bytes: u64) -> PyResult<usize> {
    let too_large = || {
        PyValueError::new_err(format!(
            "{nkeys} blocks of {block_bytes} bytes do not fit in memory"
        ))
    };
    let bb = usize::try_from(block_bytes).map_err(|_| too_large())?;
    let need = nkeys.checked_mul(bb).ok_or_else(too_large)?;
    if len != need {
        return Err(PyValueError::new_err(format!(
            "{what} has {len} bytes but {nkeys} blocks of {bb} bytes need {need}"
        )));
    }
    Ok(bb)
}

/// Checks a fetched block against the namespace and decodes it into `slot`: `(GET_OK, None)`,
/// or `GET_MISSING`/`GET_CORRUPT` with the reason. Blocks stored without a codec are verified
/// in place and copied once.
fn decode_into_slot(
    i: usize,
    key: &BlockKey,
    block: Option<EncodedBlock>,
    digest: &BlockKey,
    ns: &Namespace,
    slot: &mut [u8],
) -> (u8, Option<String>) {
    let key = &key.to_hex()[..16];
    let corrupt = |why: String| (GET_CORRUPT, Some(format!("block {i} ({key}): {why}")));
    let Some(b) = block else {
        return (GET_MISSING, Some(format!("block {i} ({key}): missing")));
    };
    if b.header.namespace != *digest || b.header.layout != ns.layout {
        return corrupt("header names another namespace or layout".into());
    }
    // Raw payloads are verified in place and not copied (decode shares their buffer).
    let raw = match b.decode() {
        Ok(v) => v,
        Err(e) => return corrupt(e.to_string()),
    };
    if raw.len() != slot.len() {
        return corrupt(format!("{} raw bytes, expected {}", raw.len(), slot.len()));
    }
    slot.copy_from_slice(&raw);
    (GET_OK, None)
}

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (endpoints, *, codec = "byteplane-huff", timeout_ms = 10_000,
        connect_timeout_ms = 2_000, tls_ca = None, tls_cert = None, tls_key = None,
        token = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        endpoints: &Bound<'_, PyAny>,
        codec: &str,
        timeout_ms: u64,
        connect_timeout_ms: u64,
        tls_ca: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        token: Option<String>,
    ) -> PyResult<Self> {
        let endpoints = parse_endpoints(endpoints)?;
        let codec = Codec::parse(codec).map_err(core_err)?;
        // Checked here so that a bad token is a ValueError before any connection (the message
        // never includes the token).
        kvshare_proto::transport::BearerToken::new(token.as_deref()).map_err(|_| {
            PyValueError::new_err(
                "token must be visible ASCII characters (no spaces or control characters)",
            )
        })?;
        let mut opts = ClientOptions {
            timeout: Duration::from_millis(timeout_ms),
            connect_timeout: Duration::from_millis(connect_timeout_ms),
            codec,
            token,
            ..ClientOptions::default()
        };
        if tls_cert.is_some() != tls_key.is_some() {
            return Err(PyValueError::new_err(
                "tls_cert and tls_key go together (a client certificate and its key)",
            ));
        }
        match &tls_ca {
            Some(ca) => {
                let identity = tls_cert.as_deref().zip(tls_key.as_deref());
                opts = opts
                    .with_tls_files(ca, identity)
                    .map_err(|e| client_err(py, e))?;
            }
            None if tls_cert.is_some() => {
                return Err(PyValueError::new_err(
                    "tls_cert needs tls_ca (the CA that signs the nodes' certificates)",
                ));
            }
            None => {}
        }
        let (eps, o) = (endpoints.clone(), opts.clone());
        let rt = runtime()?;
        let inner = py
            .allow_threads(move || rt.block_on(ClusterClient::connect(&eps, o)))
            .map_err(|e| client_err(py, e))?;
        Ok(PyClient {
            inner: Arc::new(inner),
            codec,
            endpoints,
            opts,
        })
    }

    /// Node ids of the members this client routes to.
    fn members(&self) -> Vec<String> {
        self.inner.members()
    }

    /// Codec used for uploads.
    #[getter]
    fn codec(&self) -> &'static str {
        self.codec.name()
    }

    /// How many leading `keys` the cluster holds (one round trip). `namespace` is a
    /// `Namespace` or its 32-byte digest.
    fn lookup(
        &self,
        py: Python<'_>,
        namespace: &Bound<'_, PyAny>,
        keys: Vec<Vec<u8>>,
    ) -> PyResult<usize> {
        let keys = keys_from(keys)?;
        let digest = digest_of(namespace)?;
        if keys.is_empty() {
            return Ok(0);
        }
        let (c, rt) = (self.inner.clone(), runtime()?);
        py.allow_threads(move || rt.block_on(c.lookup_keys(&digest, &keys)))
            .map_err(|e| client_err(py, e))
    }

    /// Compresses and uploads `len(keys)` blocks laid back to back in `data` (a buffer of
    /// `len(keys) * namespace.block_bytes` bytes) to each block's owners. `parent` is the key
    /// of the block before `keys[0]` in its prefix, if any (lets nodes evict chain tails first).
    ///
    /// Raises:
    ///     KvshareError: a block was rejected or no owner of it was reachable (`code` says
    ///         which); blocks other than the rejected ones may have been stored.
    #[pyo3(signature = (namespace, keys, data, *, parent = None))]
    fn put_blocks(
        &self,
        py: Python<'_>,
        namespace: &PyNamespace,
        keys: Vec<Vec<u8>>,
        data: &Bound<'_, PyAny>,
        parent: Option<Vec<u8>>,
    ) -> PyResult<PutResult> {
        let keys = keys_from(keys)?;
        let parent = parent
            .map(|p| BlockKey::from_slice(&p).map_err(core_err))
            .transpose()?;
        let buf = Buf::get(data, false)?;
        let ns = namespace.inner.clone();
        let bb = check_blocks("data", buf.len(), keys.len(), ns.layout.block_bytes())?;
        if keys.is_empty() {
            return Ok(PutResult {
                stored: 0,
                already_present: 0,
                raw_bytes: 0,
                wire_bytes: 0,
            });
        }
        let (c, codec, rt) = (self.inner.clone(), self.codec, runtime()?);
        let res = py.allow_threads(|| {
            let raws: Vec<&[u8]> = buf.bytes().chunks(bb).collect();
            let mut items = encode_blocks(&ns, &keys, 0, &raws, codec, worker_threads())?;
            if let Some(first) = items.first_mut() {
                first.parent = parent;
            }
            rt.block_on(c.put_blocks(items))
        });
        drop(buf);
        let rep = res.map_err(|e| client_err(py, e))?;
        Ok(PutResult {
            stored: rep.stored(),
            already_present: rep.already_present(),
            raw_bytes: rep.raw_bytes,
            wire_bytes: rep.wire_bytes,
        })
    }

    /// Fetches `keys` from their owners, verifies (namespace, layout, checksum) and decodes
    /// each block into its slot of `out` (a writable buffer of `len(keys) *
    /// namespace.block_bytes` bytes), decompressing on Rust threads without the GIL.
    ///
    /// A missing or corrupt block is reported in the result, never raised.
    ///
    /// Raises:
    ///     KvshareError: no member of the cluster is known (all unreachable).
    fn get_blocks(
        &self,
        py: Python<'_>,
        namespace: &PyNamespace,
        keys: Vec<Vec<u8>>,
        out: &Bound<'_, PyAny>,
    ) -> PyResult<GetResult> {
        let keys = keys_from(keys)?;
        let buf = Buf::get(out, true)?;
        let ns = namespace.inner.clone();
        let bb = check_blocks("out", buf.len(), keys.len(), ns.layout.block_bytes())?;
        if keys.is_empty() {
            return Ok(GetResult {
                status: vec![],
                prefix_blocks: 0,
                wire_bytes: 0,
                raw_bytes: 0,
                errors: vec![],
            });
        }
        let (c, rt) = (self.inner.clone(), runtime()?);
        let res = py.allow_threads(|| {
            let digest = ns.digest();
            let blocks = rt.block_on(c.get_blocks(&digest, &keys))?;
            if blocks.len() != keys.len() {
                return Err(ClientError::Protocol(format!(
                    "{} blocks answered for {} keys",
                    blocks.len(),
                    keys.len()
                )));
            }
            let wire: u64 = blocks
                .iter()
                .flatten()
                .map(|b| b.payload.len() as u64)
                .sum();
            let results: Vec<(u8, Option<String>)> = buf
                .bytes_mut()
                .par_chunks_mut(bb)
                .zip(blocks.into_par_iter())
                .enumerate()
                .map(|(i, (slot, b))| decode_into_slot(i, &keys[i], b, &digest, &ns, slot))
                .collect();
            Ok::<_, ClientError>((results, wire))
        });
        drop(buf);
        let (results, wire_bytes) = res.map_err(|e| client_err(py, e))?;
        let prefix_blocks = results.iter().take_while(|(s, _)| *s == GET_OK).count();
        let ok = results.iter().filter(|(s, _)| *s == GET_OK).count();
        Ok(GetResult {
            status: results.iter().map(|(s, _)| i32::from(*s)).collect(),
            prefix_blocks,
            wire_bytes,
            raw_bytes: (ok * bb) as u64,
            errors: results.into_iter().filter_map(|(_, e)| e).collect(),
        })
    }

    /// Deletes `keys` from every owner; returns how many copies existed. `namespace` is a
    /// `Namespace` or its 32-byte digest.
    fn delete(
        &self,
        py: Python<'_>,
        namespace: &Bound<'_, PyAny>,
        keys: Vec<Vec<u8>>,
    ) -> PyResult<u32> {
        let keys = keys_from(keys)?;
        let digest = digest_of(namespace)?;
        if keys.is_empty() {
            return Ok(0);
        }
        let c = self.inner.clone();
        let rt = runtime()?;
        py.allow_threads(move || rt.block_on(c.delete_keys(&digest, &keys)))
            .map_err(|e| client_err(py, e))
    }

    /// Counters and gauges of every healthy member (one dict per node, as the `Stats` RPC
    /// returns them; `namespaces` lists the node's top namespaces by bytes and by hits: digest,
    /// blocks, bytes, hits; `namespaces_total` counts all its namespaces).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (eps, opts, rt) = (self.endpoints.clone(), self.opts.clone(), runtime()?);
        let all = py
            .allow_threads(move || rt.block_on(member_stats(eps, opts)))
            .map_err(|e| client_err(py, e))?;
        let out = PyList::empty(py);
        for s in all {
            let d = PyDict::new(py);
            d.set_item("node_id", &s.node_id)?;
            for (k, v) in [
                ("capacity_bytes", s.capacity_bytes),
                ("stored_bytes", s.stored_bytes),
                ("stored_blocks", s.stored_blocks),
                ("stored_raw_bytes", s.stored_raw_bytes),
                ("stored_payload_bytes", s.stored_payload_bytes),
                ("lookups", s.lookups),
                ("hits", s.hits),
                ("misses", s.misses),
                ("puts_stored", s.puts_stored),
                ("puts_present", s.puts_present),
                ("puts_rejected", s.puts_rejected),
                ("evictions", s.evictions),
                ("bytes_in", s.bytes_in),
                ("bytes_out", s.bytes_out),
                ("deletes", s.deletes),
                ("uptime_seconds", s.uptime_seconds),
                ("namespaces_total", s.namespaces_total),
            ] {
                d.set_item(k, v)?;
            }
            let nss = PyList::empty(py);
            for n in &s.namespaces {
                let nd = PyDict::new(py);
                nd.set_item("namespace", PyBytes::new(py, &n.namespace))?;
                nd.set_item("blocks", n.blocks)?;
                nd.set_item("bytes", n.bytes)?;
                nd.set_item("hits", n.hits)?;
                nss.append(nd)?;
            }
            d.set_item("namespaces", nss)?;
            out.append(d)?;
        }
        Ok(out)
    }

    fn __repr__(&self) -> String {
        // Says whether a token is set, never the token.
        let token = if self
            .opts
            .token
            .as_deref()
            .is_some_and(|t| !t.trim().is_empty())
        {
            ", token=<redacted>"
        } else {
            ""
        };
        format!(
            "Client(endpoints={:?}, members={:?}, codec={}{token})",
            self.endpoints,
            self.inner.members(),
            self.codec.name()
        )
    }
}

fn endpoint_url(addr: &str, opts: &ClientOptions) -> String {
    kvshare_proto::transport::endpoint_url(addr, opts.tls.is_some())
}

async fn member_stats(
    endpoints: Vec<String>,
    opts: ClientOptions,
) -> Result<Vec<kvshare_proto::v1::StatsResponse>, ClientError> {
    let mut last = None;
    for ep in &endpoints {
        let mut c = match KvClient::connect(&endpoint_url(ep, &opts), opts.clone()).await {
            Ok(c) => c,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let info = match c.cluster_info().await {
            Ok(i) => i,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let mut out = Vec::new();
        for m in info.members.iter().filter(|m| m.healthy) {
            if let Ok(mut mc) =
                KvClient::connect(&endpoint_url(&m.grpc_addr, &opts), opts.clone()).await
                && let Ok(s) = mc.stats().await
            {
                out.push(s);
            }
        }
        return Ok(out);
    }
    Err(last.unwrap_or_else(|| ClientError::Protocol("no endpoints".into())))
}

/// xxh3-64 checksum of `data`, as block headers carry it.
#[pyfunction]
fn checksum(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<u64> {
    let buf = Buf::get(data, false)?;
    let sum = py.allow_threads(|| kvshare_core::checksum(buf.bytes()));
    drop(buf);
    Ok(sum)
}

/// Codec names accepted by `Client(codec=...)`.
#[pyfunction]
fn codecs() -> Vec<&'static str> {
    Codec::ALL.iter().map(|c| c.name()).collect()
}

/// The kvshare native extension.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("KvshareError", m.py().get_type::<KvshareError>())?;
    m.add("VLLM_DEFAULT_SEED", VLLM_DEFAULT_SEED)?;
    m.add("GET_OK", GET_OK)?;
    m.add("GET_MISSING", GET_MISSING)?;
    m.add("GET_CORRUPT", GET_CORRUPT)?;
    m.add_class::<PyNamespace>()?;
    m.add_class::<PyClient>()?;
    m.add_class::<PutResult>()?;
    m.add_class::<GetResult>()?;
    m.add_function(wrap_pyfunction!(hash_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(vllm_none_hash, m)?)?;
    m.add_function(wrap_pyfunction!(codecs, m)?)?;
    m.add_function(wrap_pyfunction!(checksum, m)?)?;
    Ok(())
}
