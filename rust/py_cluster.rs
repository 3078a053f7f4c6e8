//! `_core.Cluster`: the cluster core as Python sees it. `ollama_distributed.
//! cluster.ClusterService` is its only user and keeps the stable contract;
//! this layer converts once at the edge (config in, JSON or bytes out) and
//! maps errors to `ollama_distributed.errors`.
//!
//! Everything that binds sockets or spawns tasks runs on the core's shared
//! runtime (`python::runtime()`); reading a stream is polled wherever
//! pyo3-async-runtimes polls it, since quinn's streams need no reactor.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::PyPermissionError;
use pyo3::prelude::*;

use crate::blobs::BlobError;
use crate::cluster::{self, ClusterConfig, ClusterError};
use crate::consensus::Command;
use crate::forward::{self, ForwardError};
use crate::python::runtime;
use crate::transport::tls::TlsMaterial;
use crate::tunnel::TunnelError;
use bytes::Bytes;

pyo3::import_exception!(ollama_distributed.errors, PeerUnavailableError);
pyo3::import_exception!(ollama_distributed.errors, DigestMismatchError);
// Every other core failure: a typed error of the package (also a RuntimeError).
pyo3::import_exception!(ollama_distributed.errors, CoreError);
pyo3::import_exception!(ollama_distributed.errors, BlobBusyError);
// 507, as the registry pull's full disk: the store could not write.
pyo3::import_exception!(ollama_distributed.models.fsutil, StorageError);

fn cluster_err(e: ClusterError) -> PyErr {
    match e {
        ClusterError::JoinRefused(m) => PyPermissionError::new_err(format!("join refused: {m}")),
        other => CoreError::new_err(other.to_string()),
    }
}

fn forward_err(e: ForwardError) -> PyErr {
    match e {
        ForwardError::Unavailable(m) => PeerUnavailableError::new_err(m),
        ForwardError::Remote { status, message } => Python::attach(|py| {
            let build = || -> PyResult<PyErr> {
                let f = py
                    .import("ollama_distributed.errors")?
                    .getattr("from_status")?;
                Ok(PyErr::from_value(f.call1((status, message.clone()))?))
            };
            build().unwrap_or_else(|e| e)
        }),
    }
}

fn blob_err(e: BlobError) -> PyErr {
    match e {
        BlobError::DigestMismatch { .. } => DigestMismatchError::new_err(e.to_string()),
        BlobError::Unavailable(m) => PeerUnavailableError::new_err(m),
        BlobError::Remote { status, message } => {
            forward_err(ForwardError::Remote { status, message })
        }
        BlobError::BadDigest(_) | BlobError::BadPath(_) => forward_err(ForwardError::Remote {
            status: 400,
            message: e.to_string(),
        }),
        BlobError::NoSpace(m) => StorageError::new_err(m),
        BlobError::Busy(d) => BlobBusyError::new_err(format!("{d} is already being fetched")),
        BlobError::Io(m) => StorageError::new_err(format!("cannot write to the data dir: {m}")),
        other => CoreError::new_err(other.to_string()),
    }
}

fn join_err(e: tokio::task::JoinError) -> PyErr {
    CoreError::new_err(format!("cluster task failed: {e}"))
}

type Slot = Arc<Mutex<Option<Arc<cluster::Cluster>>>>;

/// One node's membership in the cluster.
#[pyclass(module = "ollama_distributed._core")]
pub struct Cluster {
    cfg: ClusterConfig,
    slot: Slot,
}

impl Cluster {
    fn running(&self) -> PyResult<Arc<cluster::Cluster>> {
        self.slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| CoreError::new_err("the cluster is not started"))
    }
}

#[pymethods]
impl Cluster {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (node_id, data_dir, host, port, join, token=None, api_address=String::new(), failure_timeout_ms=2000, max_voters=crate::consensus::MAX_VOTERS))]
    fn new(
        node_id: String,
        data_dir: PathBuf,
        host: String,
        port: u16,
        join: Vec<String>,
        token: Option<String>,
        api_address: String,
        failure_timeout_ms: u64,
        max_voters: usize,
    ) -> Self {
        let cfg = ClusterConfig {
            node_id,
            data_dir,
            host,
            port,
            join,
            token,
            api_address,
            // below ~4 keep-alives a second a peer would flap on a busy machine
            failure_timeout: Duration::from_millis(failure_timeout_ms.max(400)),
            max_voters,
        };
        Self {
            cfg,
            slot: Arc::new(Mutex::new(None)),
        }
    }

    /// Bind the P2P port and create, join or rejoin the cluster.
    fn start<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let cfg = self.cfg.clone();
        let slot = self.slot.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let c = runtime()
                .spawn(cluster::Cluster::start(cfg))
                .await
                .map_err(join_err)?
                .map_err(cluster_err)?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
            Ok(())
        })
    }

    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let c = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            if let Some(c) = c {
                runtime()
                    .spawn(async move { c.stop().await })
                    .await
                    .map_err(join_err)?;
            }
            Ok(())
        })
    }

    /// The join token; read from the data dir when the node is not running.
    fn join_token(&self) -> Option<String> {
        if let Some(c) = self.slot.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Some(c.join_token());
        }
        TlsMaterial::load(&self.cfg.data_dir.join("tls"))
            .ok()
            .map(|m| m.token().render())
    }

    /// The UDP address the endpoint listens on.
    fn local_address(&self) -> Option<String> {
        self.running().ok()?.local_addr().map(|a| a.to_string())
    }

    /// Status as JSON (see `cluster::Status`).
    fn status_json(&self, py: Python<'_>) -> PyResult<String> {
        let core = self.running()?;
        // without the GIL: the asyncio thread and the core's threads go on meanwhile
        py.detach(|| serde_json::to_string(&core.status()))
            .map_err(|e| CoreError::new_err(e.to_string()))
    }

    /// Every known node as JSON (see `membership::NodeView`).
    fn nodes_json(&self, py: Python<'_>) -> PyResult<String> {
        let core = self.running()?;
        // without the GIL: the asyncio thread and the core's threads go on meanwhile
        py.detach(|| serde_json::to_string(&core.nodes()))
            .map_err(|e| CoreError::new_err(e.to_string()))
    }

    /// Keep and push this node's advert (JSON bytes).
    fn publish_advert(&self, advert: Vec<u8>) -> PyResult<()> {
        let c = self.running()?;
        let _rt = runtime().enter();
        c.publish_advert(advert.into());
        Ok(())
    }

    /// Send a request (JSON bytes) to `node_id`; resolves to a ForwardStream.
    fn forward<'py>(
        &self,
        py: Python<'py>,
        node_id: String,
        request: Vec<u8>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self.running()?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            // Polled right here: opening a stream needs no reactor, and a hop
            // to the core's runtime would add a thread wake-up to every request.
            let s = c.forward(&node_id, &request).await.map_err(forward_err)?;
            Ok(ForwardStream {
                inner: Arc::new(tokio::sync::Mutex::new(Some(s))),
            })
        })
    }

    /// The same as `forward` when it completes at once (the usual case: a
    /// stream opens and the request is buffered without waiting), saving a
    /// trip through the event loop; None when it would have to wait.
    fn forward_now(&self, node_id: &str, request: Vec<u8>) -> PyResult<Option<ForwardStream>> {
        let c = self.running()?;
        let _rt = runtime().enter();
        match poll_once(c.forward(node_id, &request)) {
            Some(Ok(s)) => Ok(Some(ForwardStream {
                inner: Arc::new(tokio::sync::Mutex::new(Some(s))),
            })),
            Some(Err(e)) => Err(forward_err(e)),
            None => Ok(None),
        }
    }

    /// Serve and store model blobs under `models_dir`, at most
    /// `bytes_per_sec` in and out (0: no cap).
    fn configure_blobs(&self, models_dir: PathBuf, bytes_per_sec: u64) -> PyResult<()> {
        self.running()?.configure_blobs(models_dir, bytes_per_sec);
        Ok(())
    }

    /// Fetch blob `digest` into the store from `node_ids` (in ranges from
    /// all at once when it is large, else one after another), verified,
    /// resuming a partial; resolves to the blob's path.
    fn fetch_blob<'py>(
        &self,
        py: Python<'py>,
        node_ids: Vec<String>,
        digest: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self.running()?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let p = runtime()
                .spawn(async move { c.fetch_blob_from(&node_ids, &digest).await })
                .await
                .map_err(join_err)?
                .map_err(blob_err)?;
            Ok(p.to_string_lossy().into_owned())
        })
    }

    /// The bytes of manifest `path` (registry/namespace/name/tag) on
    /// `node_id`, checked against `digest` when given.
    #[pyo3(signature = (node_id, path, digest=None))]
    fn fetch_manifest<'py>(
        &self,
        py: Python<'py>,
        node_id: String,
        path: String,
        digest: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self.running()?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let b = runtime()
                .spawn(async move { c.fetch_manifest(&node_id, &path, digest.as_deref()).await })
                .await
                .map_err(join_err)?
                .map_err(blob_err)?;
            Ok(b)
        })
    }

    /// Commit a tombstone for `model` (deleted at `deleted_at_ms`, unix ms) in
    /// the Raft state, through the leader.
    fn put_tombstone<'py>(
        &self,
        py: Python<'py>,
        model: String,
        deleted_at_ms: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self.running()?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            runtime()
                .spawn(async move { c.put_tombstone(&model, deleted_at_ms).await })
                .await
                .map_err(join_err)?
                .map_err(cluster_err)
        })
    }

    /// Compare-and-set on the model catalogue through the leader: when every
    /// `expect` key holds its value (None: absent), apply the puts (None:
    /// remove). Resolves to False when an expectation no longer held.
    fn propose_catalog<'py>(
        &self,
        py: Python<'py>,
        expect: Vec<(String, Option<String>)>,
        puts: Vec<(String, Option<String>)>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self.running()?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            runtime()
                .spawn(async move { c.propose(Command::Catalog { expect, puts }).await })
                .await
                .map_err(join_err)?
                .map_err(cluster_err)
        })
    }

    /// Voters that could lead after this leader (caught up and connected),
    /// by name; empty on a follower.
    fn successors(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let core = self.running()?;
        Ok(py.detach(|| core.successors()))
    }

    /// Hold (True) or release this node's candidacy in elections: a draining
    /// leader holds it so it does not take back the lead it hands over.
    fn hold_candidacy(&self, held: bool) -> PyResult<()> {
        self.running()?.hold_candidacy(held);
        Ok(())
    }

    /// Stand for election now (asked by a draining leader).
    fn campaign<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let c = self.running()?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            runtime()
                .spawn(async move { c.campaign().await })
                .await
                .map_err(join_err)?
                .map_err(cluster_err)
        })
    }

    /// Remove node `name`, which must be down, from the cluster (through the
    /// leader); RuntimeError naming why not.
    fn remove_member<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        let c = self.running()?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            runtime()
                .spawn(async move { c.remove_member(&name).await })
                .await
                .map_err(join_err)?
                .map_err(cluster_err)
        })
    }

    /// Rotate the join secret cluster-wide (through the leader); the new
    /// token. The old one stops working on every member.
    fn rotate_join_token<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let c = self.running()?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            runtime()
                .spawn(async move { c.rotate_join_secret().await })
                .await
                .map_err(join_err)?
                .map_err(cluster_err)
        })
    }

    /// The model catalogue as JSON: key -> JSON text of its value.
    fn catalog_json(&self, py: Python<'_>) -> PyResult<String> {
        let core = self.running()?;
        // without the GIL: the asyncio thread and the core's threads go on meanwhile
        py.detach(|| serde_json::to_string(&core.catalog()))
            .map_err(|e| CoreError::new_err(e.to_string()))
    }

    /// Deleted models in the Raft state as JSON: name -> unix ms.
    fn tombstones_json(&self, py: Python<'_>) -> PyResult<String> {
        let core = self.running()?;
        // without the GIL: the asyncio thread and the core's threads go on meanwhile
        py.detach(|| serde_json::to_string(&core.tombstones()))
            .map_err(|e| CoreError::new_err(e.to_string()))
    }

    /// Blob transfers in progress and totals, as JSON (see `blobs::TransferStatus`).
    fn transfer_status_json(&self, py: Python<'_>) -> PyResult<String> {
        let core = self.running()?;
        // without the GIL: the asyncio thread and the core's threads go on meanwhile
        py.detach(|| serde_json::to_string(&core.transfer_status()))
            .map_err(|e| CoreError::new_err(e.to_string()))
    }

    /// Bridge peers' RPC tunnels to this node's ggml RPC server on
    /// 127.0.0.1:`port`; None refuses them (the server is off or down).
    #[pyo3(signature = (port=None))]
    fn set_rpc_port(&self, port: Option<u16>) -> PyResult<()> {
        self.running()?.set_rpc_port(port);
        Ok(())
    }

    /// Listen on 127.0.0.1 (an ephemeral port, returned) and bridge each
    /// connection there to `node_id`'s RPC server through the pair's mTLS
    /// QUIC connection. PeerUnavailableError when not connected to it.
    fn open_rpc_tunnel(&self, node_id: &str) -> PyResult<u16> {
        let c = self.running()?;
        let _rt = runtime().enter();
        c.open_rpc_tunnel(node_id).map_err(|e| match e {
            TunnelError::NoPeer(_) => PeerUnavailableError::new_err(e.to_string()),
            other => CoreError::new_err(other.to_string()),
        })
    }

    /// Close the tunnel listening on `port` and end its connections; False
    /// when none listens there.
    fn close_rpc_tunnel(&self, port: u16) -> PyResult<bool> {
        let c = self.running()?;
        let _rt = runtime().enter();
        Ok(c.close_rpc_tunnel(port))
    }

    /// The RPC tunnels opened and served, with byte counts, as JSON (see
    /// `tunnel::Status`).
    fn rpc_tunnels_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.running()?.rpc_tunnels())
            .map_err(|e| CoreError::new_err(e.to_string()))
    }

    /// A forwarded request already waiting, or None: saves a trip through
    /// the event loop per request under load.
    fn next_inbound_now(&self) -> PyResult<Option<(Vec<u8>, String, InboundStream)>> {
        Ok(self
            .running()?
            .try_next_inbound()
            .map(|i| (i.request.to_vec(), i.from, InboundStream { reply: i.reply })))
    }

    /// The next forwarded request: (request bytes, caller id, InboundStream),
    /// or None once stopped.
    fn next_inbound<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let c = self.running()?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let i = c.next_inbound().await;
            Ok(i.map(|i| (i.request.to_vec(), i.from, InboundStream { reply: i.reply })))
        })
    }
}

/// Poll a future once, without a waker that matters: its result when it is
/// ready at once, None (and the future dropped) otherwise. Only for futures
/// that may be dropped at any await point without losing data.
fn poll_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    use std::task::{Context, Poll, Wake, Waker};
    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    let waker = Waker::from(Arc::new(Noop));
    match std::pin::pin!(fut).poll(&mut Context::from_waker(&waker)) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// The caller's side of a forwarded request. Dropping it, or `cancel()`,
/// stops the work at the serving node.
#[pyclass(module = "ollama_distributed._core")]
pub struct ForwardStream {
    inner: Arc<tokio::sync::Mutex<Option<forward::ForwardStream>>>,
}

#[pymethods]
impl ForwardStream {
    /// `(chunks, done)`: the chunks received so far (at least one unless
    /// done), and whether the stream has ended, so the end costs no extra call.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let mut g = inner.lock().await;
            let Some(s) = g.as_mut() else {
                return Ok((Vec::new(), true));
            };
            let mut out = Vec::new();
            match s.next_batch(&mut out).await {
                Ok(more) => {
                    if !more {
                        *g = None;
                    }
                    Ok((
                        out.into_iter().map(|b| b.to_vec()).collect::<Vec<_>>(),
                        !more,
                    ))
                }
                Err(e) => {
                    *g = None;
                    Err(forward_err(e))
                }
            }
        })
    }

    /// `recv()` without waiting: `(chunks, done)` when some chunks (or the
    /// end) have already arrived, else None. Reading from the stream is
    /// cancel-safe, so an unfinished poll loses nothing.
    fn recv_now(&self) -> PyResult<Option<(Vec<Vec<u8>>, bool)>> {
        let Ok(mut g) = self.inner.try_lock() else {
            return Ok(None);
        };
        let Some(s) = g.as_mut() else {
            return Ok(Some((Vec::new(), true)));
        };
        let mut out = Vec::new();
        let _rt = runtime().enter(); // next_batch arms a timer (the silent-peer watch)
        match poll_once(s.next_batch(&mut out)) {
            None => Ok(None),
            Some(Ok(more)) => {
                if !more {
                    *g = None;
                }
                Ok(Some((out.into_iter().map(|b| b.to_vec()).collect(), !more)))
            }
            Some(Err(e)) => {
                *g = None;
                Err(forward_err(e))
            }
        }
    }

    /// Stop the remote work now.
    fn cancel(&self) {
        match self.inner.try_lock() {
            Ok(mut g) => drop(g.take()),
            Err(_) => {
                let inner = self.inner.clone();
                runtime().spawn(async move { drop(inner.lock().await.take()) });
            }
        }
    }
}

/// The serving side of a forwarded request.
#[pyclass(module = "ollama_distributed._core")]
pub struct InboundStream {
    reply: forward::Reply,
}

#[pymethods]
impl InboundStream {
    /// Queue a chunk (JSON bytes); False once the caller is gone.
    fn send(&self, chunk: Vec<u8>) -> bool {
        self.reply.chunk(chunk.into())
    }

    /// Queue several chunks in order with one wake-up of the stream's
    /// writer (a wake-up per chunk cost a futex call per token); False once
    /// the caller is gone.
    fn send_many(&self, chunks: Vec<Vec<u8>>) -> bool {
        self.reply
            .chunks(chunks.into_iter().map(Bytes::from).collect())
    }

    fn end(&self) {
        self.reply.end()
    }

    fn error(&self, status: u16, message: String) {
        self.reply.error(status, message)
    }

    fn is_cancelled(&self) -> bool {
        self.reply.is_cancelled()
    }

    /// Resolves when the caller cancels or goes away.
    fn cancelled<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let reply = self.reply.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            reply.cancelled().await;
            Ok(true)
        })
    }
}

/// Python's logging is called only while this is set; `stop_logging()`
/// clears it at interpreter exit, so no core thread calls into a finalizing
/// interpreter (which aborts the process).
static PY_LOGGING: AtomicBool = AtomicBool::new(true);
/// Log calls into Python under way: `stop_logging()` lets them finish (with
/// the GIL released) before the interpreter goes on to finalize.
static PY_LOGGING_INFLIGHT: AtomicUsize = AtomicUsize::new(0);

struct GuardedLogger(pyo3_log::Logger);

impl GuardedLogger {
    /// `f` (which may take the GIL) while logging is on; counted in flight.
    fn guarded<T: Default>(&self, f: impl FnOnce(&pyo3_log::Logger) -> T) -> T {
        PY_LOGGING_INFLIGHT.fetch_add(1, Ordering::AcqRel);
        let out = if PY_LOGGING.load(Ordering::Acquire) {
            f(&self.0)
        } else {
            T::default()
        };
        PY_LOGGING_INFLIGHT.fetch_sub(1, Ordering::AcqRel);
        out
    }
}

impl log::Log for GuardedLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        self.guarded(|l| l.enabled(m))
    }
    fn log(&self, r: &log::Record<'_>) {
        self.guarded(|l| l.log(r))
    }
    fn flush(&self) {
        self.guarded(|l| l.flush())
    }
}

/// Stop handing core log records to Python (registered with atexit), and
/// wait (at most a second, without the GIL) for the calls already under way,
/// so none of them reaches the interpreter while it finalizes. The same pause
/// lets pyo3-async-runtimes finish handing results to Python: it sets each
/// future's result from a blocking-pool thread that may still be waiting for
/// the GIL after the awaiting code went on, and a thread that gets the GIL
/// from a finalizing interpreter aborts the process.
#[pyfunction]
fn stop_logging(py: Python<'_>) {
    PY_LOGGING.store(false, Ordering::Release);
    py.detach(|| {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while PY_LOGGING_INFLIGHT.load(Ordering::Acquire) > 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(25));
    });
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // One runtime for the core and for awaitables handed to Python, so a
    // packet's wake-up reaches the Python future without another thread hop.
    let _ = pyo3_async_runtimes::tokio::init_with_runtime(runtime());
    // Our own events from info up, other crates' from warn: joins, refusals
    // and peers going up or down reach journald through the node's logging.
    // openraft reports every unreachable peer as an error while a node joins
    // or is down; we report those transitions ourselves, so it stays quiet.
    let logger = pyo3_log::Logger::new(m.py(), pyo3_log::Caching::LoggersAndLevels)?
        .filter(log::LevelFilter::Warn)
        .filter_target("_core".to_owned(), log::LevelFilter::Info)
        .filter_target("openraft".to_owned(), log::LevelFilter::Off);
    if log::set_boxed_logger(Box::new(GuardedLogger(logger))).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    m.add_function(wrap_pyfunction!(stop_logging, m)?)?;
    m.add_class::<Cluster>()?;
    m.add_class::<ForwardStream>()?;
    m.add_class::<InboundStream>()?;
    Ok(())
}
