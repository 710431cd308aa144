//! Several quicpush nodes as one push tier, sharing one Redis server or one
//! Redis Cluster.
//!
//! ```text
//! one Redis server:
//! backend ─▶ node A: rpc::dispatch ─▶ local registry (as on one node)
//!                        │ keys / users / room not here
//!                        └─ one script: read the directory, PUBLISH quicpush:node:<B> ─▶ node B: bus
//!                                                          ─▶ its dispatcher (local only)
//! a Redis Cluster:
//!                        └─ SPUBLISH quicpush:{k:<key>}:to (or {u:<mid>}, {r:<room>}) ─▶ the shard
//!                                ─▶ every node subscribed to it (the holders) ─▶ bus ─▶ dispatcher
//! session register / unregister / room change ─▶ registry hook ─▶ bounded queue ─▶ directory writer
//!                                                  (entries, and on a cluster the subscriptions)
//! every `refresh`: node record + whole directory rewritten (EX ttl), live nodes and room counts read
//! ```
//!
//! - [`nodes`]: each node's record (`quicpush:{nodes}:node:<id>`, EX ttl) and the
//!   sorted set of live nodes (`quicpush:{nodes}`, score = expiry in unix ms).
//! - [`directory`]: key → node, user → nodes, room → nodes with counts, each
//!   entry owned by one node and living `ttl` unless refreshed, so a dead node's
//!   entries vanish by themselves. Written by one task from a bounded, coalescing
//!   queue fed by the registry's [`DirectoryHook`](crate::registry::DirectoryHook).
//! - [`bus`]: pub/sub between nodes; [`envelope`]: what travels on it;
//!   [`subs`]: on a Redis Cluster, the sharded channels of what a node holds.
//! - [`shared`]: key and user history in Redis (`history.store = "redis"`): one
//!   script appends a push and publishes it with its position to every node
//!   holding the key or user; a connecting client claims its key and user here
//!   and reads its streams before it registers. Nothing is lost when a node dies.
//!
//! Redis is optional at run time: a node whose Redis is down keeps serving its
//! own clients; the remote parts of a push answer
//! [`PushOutcome::Unavailable`](crate::rpc::proto::PushOutcome::Unavailable), and
//! once Redis answers again the next refresh writes the node's record and every
//! directory entry back. A node starts even if Redis is down at start (it logs and
//! retries): the tier is a best effort layer over nodes that work alone.
//!
//! [`Backend`] is one server or a Redis Cluster (`cluster.redis` a list). A key's,
//! a user's or a room's directory entries, history stream and sharded channel
//! share a hash tag (`{k:<key>}`, `{u:<mid>}`, `{r:<room>}`), so a script for one
//! of them is in one slot; on a cluster the scripts run per key or user, and
//! what spans slots (the directory writer's batches, the refresh) is sent as
//! single commands, all at once ([`Backend::each`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod bus;
pub mod directory;
pub mod envelope;
pub mod error;
pub mod nodes;
pub mod route;
pub mod shared;
pub mod subs;

pub use error::ClusterError;

use crate::config::{ClusterConfig, HistoryConfig, HistoryStoreKind, RedisTarget};
use crate::history::redis_store::RedisHistory;
use crate::registry::Registry;

/// Directory updates queued before new ones are dropped (the refresh rewrites
/// everything anyway).
pub const DIRTY_QUEUE: usize = 4096;

/// The Redis connection the tier talks through.
#[derive(Clone)]
pub enum Backend {
    /// One Redis server, through a reconnecting connection manager.
    Single(redis::aio::ConnectionManager),
    /// A Redis Cluster: commands are routed by slot, and the bus is sharded
    /// pub/sub ([`bus`]); connected on first use and re-connected by the client.
    Cluster(Arc<ClusterBackend>),
}

/// A Redis Cluster connection, made on first use (so a node starts while the
/// cluster is down), with the receiving end of its pushes (pub/sub messages).
pub struct ClusterBackend {
    client: redis::cluster::ClusterClient,
    con: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
    pushes: parking_lot::Mutex<Option<mpsc::Receiver<redis::PushInfo>>>,
    /// Pub/sub messages dropped because the bus was [`BUS_QUEUE`] behind.
    pub(crate) dropped: Arc<std::sync::atomic::AtomicU64>,
}

/// Pub/sub messages from a Redis Cluster waiting for the bus before new ones
/// are dropped (and counted): a gap in a positioned push makes its client
/// resume; an envelope is lost and logged.
pub const BUS_QUEUE: usize = 65_536;

impl ClusterBackend {
    async fn con(&self) -> redis::RedisResult<redis::cluster_async::ClusterConnection> {
        self.con
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }

    /// The bus's pub/sub messages; `None` once taken.
    pub(crate) fn take_pushes(&self) -> Option<mpsc::Receiver<redis::PushInfo>> {
        self.pushes.lock().take()
    }

    /// Subscribes to sharded channels (`SSUBSCRIBE`), or plain ones; the client
    /// subscribes again after a reconnection or a slot move.
    /// (One command per channel: sharded channels of one command must share a
    /// slot.)
    pub(crate) async fn subscribe(
        &self,
        channels: &[String],
        sharded: bool,
    ) -> Result<(), ClusterError> {
        let how = if sharded { Sub::Sharded } else { Sub::Plain };
        self.each_channel(channels, how).await
    }

    /// Leaves sharded channels (`SUNSUBSCRIBE`), one command per channel.
    pub(crate) async fn unsubscribe(&self, channels: &[String]) -> Result<(), ClusterError> {
        self.each_channel(channels, Sub::LeaveSharded).await
    }

    async fn each_channel(&self, channels: &[String], how: Sub) -> Result<(), ClusterError> {
        if channels.is_empty() {
            return Ok(());
        }
        let con = self.con().await?;
        let calls = channels.iter().map(|ch| {
            let mut con = con.clone();
            async move {
                match how {
                    Sub::Plain => con.subscribe(ch).await,
                    Sub::Sharded => con.ssubscribe(ch).await,
                    Sub::LeaveSharded => con.sunsubscribe(ch).await,
                }
            }
        });
        futures_util::future::try_join_all(calls).await?;
        Ok(())
    }
}

/// A subscription command, sent per channel.
#[derive(Clone, Copy)]
enum Sub {
    Plain,
    Sharded,
    LeaveSharded,
}

/// One command connection of a [`Backend`].
#[derive(Clone)]
pub enum Con {
    Single(redis::aio::ConnectionManager),
    Cluster(Arc<ClusterBackend>),
}

impl redis::aio::ConnectionLike for Con {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Con::Single(c) => c.req_packed_command(cmd),
            Con::Cluster(b) => {
                Box::pin(async move { b.con().await?.req_packed_command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Con::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Con::Cluster(b) => Box::pin(async move {
                b.con()
                    .await?
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Con::Single(c) => c.get_db(),
            Con::Cluster(_) => 0,
        }
    }
}

impl Backend {
    /// A connection to send commands on.
    pub fn con(&self) -> Con {
        match self {
            Backend::Single(c) => Con::Single(c.clone()),
            Backend::Cluster(b) => Con::Cluster(b.clone()),
        }
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Backend::Cluster(_))
    }

    /// Runs `cmds`, whose keys may lie in different slots, and answers their
    /// replies in order: one pipeline on a single server; on a Redis Cluster each
    /// command goes to its slot's master, all sent at once.
    pub async fn each(&self, cmds: Vec<redis::Cmd>) -> Result<Vec<redis::Value>, ClusterError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Backend::Single(c) => {
                let mut p = redis::pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                Ok(p.query_async(&mut c.clone()).await?)
            }
            Backend::Cluster(b) => {
                let con = b.con().await?;
                let calls = cmds.into_iter().map(|cmd| {
                    let mut con = con.clone();
                    async move { cmd.query_async::<redis::Value>(&mut con).await }
                });
                Ok(futures_util::future::try_join_all(calls).await?)
            }
        }
    }
}

/// Loads every script the tier runs by hash (`SCRIPT LOAD`; on a Redis Cluster
/// into every master). The refresh does it first and after Redis comes back,
/// so the first calls after a start or a restart find their script: calls
/// started together would otherwise each fail with `NOSCRIPT`, load the script
/// and run again.
pub async fn load_scripts(c: &Cluster) -> Result<(), ClusterError> {
    let mut con = c.backend.con();
    let scripts = route::scripts()
        .into_iter()
        .chain(shared::scripts())
        .chain(directory::scripts());
    for s in scripts {
        s.load_async(&mut con).await?;
    }
    Ok(())
}

/// Redis key and channel names.
pub mod names {
    /// The sorted set of node ids, scored by their record's expiry (unix ms).
    /// Node-level keys share the `{nodes}` hash tag, so on a Redis Cluster one
    /// refresh's commands go to one slot.
    pub const NODES: &str = "quicpush:{nodes}";
    /// The channel every node subscribes to.
    pub const ALL: &str = "quicpush:all";

    /// A node's record (hash).
    pub fn node(id: &str) -> String {
        format!("quicpush:{{nodes}}:node:{id}")
    }
    /// The channel a node listens on (one Redis server).
    pub fn node_channel(id: &str) -> String {
        format!("quicpush:node:{id}")
    }
    /// A node's rooms with their local counts (hash).
    pub fn node_rooms(id: &str) -> String {
        format!("quicpush:{{nodes}}:node:{id}:rooms")
    }
    /// Which node (and connection) holds a key: `<node>/<conn>`. In the key's
    /// slot, beside its history stream (`quicpush:{k:<key>}:meta` / `:log`).
    pub fn key(key: &str) -> String {
        format!("quicpush:{{k:{key}}}:owner")
    }
    /// A user's connection count on one node (in the user's slot, beside its
    /// history stream).
    pub fn user(mid: i64, node: &str) -> String {
        format!("quicpush:{{u:{mid}}}:on:{node}")
    }
    /// A room's member count on one node (in the room's slot).
    pub fn room(room: &str, node: &str) -> String {
        format!("quicpush:{{r:{room}}}:on:{node}")
    }
    /// On a Redis Cluster, the sharded channel the node holding `key`
    /// subscribes to (in the key's slot, so the append script can publish to it).
    pub fn key_channel(key: &str) -> String {
        format!("quicpush:{{k:{key}}}:to")
    }
    /// On a Redis Cluster, the sharded channel every node holding one of the
    /// user's connections subscribes to.
    pub fn user_channel(mid: i64) -> String {
        format!("quicpush:{{u:{mid}}}:to")
    }
    /// On a Redis Cluster, the sharded channel every node with members of the
    /// room subscribes to.
    pub fn room_channel(room: &str) -> String {
        format!("quicpush:{{r:{room}}}:to")
    }
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a registry change asks the directory writer to rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dirty {
    Key(Arc<str>),
    User(i64),
    Room(Arc<str>),
}

/// This node's part in the tier.
pub struct Cluster {
    /// This node's id.
    pub id: String,
    pub(crate) ttl: Duration,
    pub(crate) refresh: Duration,
    pub(crate) client: redis::Client,
    pub(crate) backend: Backend,
    pub(crate) registry: Arc<Registry>,
    /// Live node ids (this one included), as the last refresh read them.
    pub(crate) live: RwLock<Arc<Vec<String>>>,
    /// Members on the other nodes of each room with members here.
    pub(crate) remote_rooms: RwLock<HashMap<String, u64>>,
    pub(crate) dirty: mpsc::Sender<Dirty>,
    dirty_rx: parking_lot::Mutex<Option<mpsc::Receiver<Dirty>>>,
    pub(crate) advertise_client: String,
    pub(crate) advertise_rpc: String,
    pub(crate) started_ms: u64,
    /// The tier's key (and user) history, when `history.store = "redis"`
    /// ([`shared`]).
    pub(crate) keys: Option<crate::history::redis_store::RedisHistory>,
    /// User streams are shared too (`history.user`).
    shared_users: bool,
    /// Room streams are shared too (`history.room`).
    shared_rooms: bool,
    /// Broadcast streams live in Redis too (`history.all`).
    shared_all: bool,
    /// On a Redis Cluster, the sharded channels this node is subscribed to
    /// ([`subs`]).
    pub(crate) subs: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// Stops this node's cluster tasks (shutdown, or a test halting a node).
    halt: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("id", &self.id).finish()
    }
}

/// A random node id: 16 hex digits.
pub fn random_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The Redis client for `target`, with short timeouts so an unreachable Redis
/// fails a push part quickly: a connection manager that reconnects (one
/// server), or a cluster client speaking RESP3 so its pub/sub messages reach
/// the bus (a Redis Cluster). The `redis::Client` is the first URL's, for the
/// single server's pub/sub connection.
pub fn connect(target: &RedisTarget) -> Result<(redis::Client, Backend), ClusterError> {
    let urls = target.urls();
    let first = urls
        .first()
        .ok_or_else(|| ClusterError::BadReply("no Redis URL".into()))?;
    let bad_url = |url: &str| {
        let url = url.to_owned();
        move |source| ClusterError::Url { url, source }
    };
    // Small commands go out at once: with Nagle's algorithm a command written
    // while an earlier one is unanswered waits for that answer.
    let tcp = || redis::io::tcp::TcpSettings::default().set_nodelay(true);
    let info = redis::IntoConnectionInfo::into_connection_info(first.as_str())
        .map_err(bad_url(first))?
        .set_tcp_settings(tcp());
    let client = redis::Client::open(info).map_err(bad_url(first))?;
    if !target.is_cluster() {
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let con = redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), cfg)?;
        return Ok((client, Backend::Single(con)));
    }
    let (tx, rx) = mpsc::channel(BUS_QUEUE);
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = dropped.clone();
    let sender = move |info: redis::PushInfo| {
        let r = tx.try_send(info);
        if r.is_err() {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    };
    let cluster_client = redis::cluster::ClusterClientBuilder::new(urls.to_vec())
        .use_protocol(redis::ProtocolVersion::RESP3)
        .tcp_settings(tcp())
        .push_sender(sender)
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(1))
        .retries(2)
        .build()
        .map_err(bad_url(first))?;
    let backend = Arc::new(ClusterBackend {
        client: cluster_client,
        con: tokio::sync::OnceCell::new(),
        pushes: parking_lot::Mutex::new(Some(rx)),
        dropped,
    });
    Ok((client, Backend::Cluster(backend)))
}

impl Cluster {
    /// This node's part in the tier `config` names, for `registry`; connects
    /// lazily (a Redis that is down at start is retried). `client_addr` and
    /// `rpc_addr` are shown in `quicpush nodes` unless the config advertises others.
    pub fn new(
        config: &ClusterConfig,
        history: &HistoryConfig,
        target: &RedisTarget,
        registry: Arc<Registry>,
        client_addr: String,
        rpc_addr: String,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let (client, backend) = connect(target)?;
        let id = config.node_id.clone().unwrap_or_else(random_id);
        let (tx, rx) = mpsc::channel(DIRTY_QUEUE);
        let c = Arc::new(Cluster {
            live: RwLock::new(Arc::new(vec![id.clone()])),
            id,
            ttl: config.ttl,
            refresh: config.refresh_every(),
            client,
            backend,
            registry: registry.clone(),
            remote_rooms: RwLock::default(),
            dirty: tx,
            dirty_rx: parking_lot::Mutex::new(Some(rx)),
            advertise_client: config.advertise_client.clone().unwrap_or(client_addr),
            advertise_rpc: config.advertise_rpc.clone().unwrap_or(rpc_addr),
            started_ms: now_ms(),
            keys: (history.enabled && history.store == HistoryStoreKind::Redis)
                .then(|| RedisHistory::new(history.size, history.ttl)),
            shared_users: history.enabled
                && history.store == HistoryStoreKind::Redis
                && history.user,
            shared_rooms: history.enabled
                && history.store == HistoryStoreKind::Redis
                && history.room,
            shared_all: history.enabled && history.store == HistoryStoreKind::Redis && history.all,
            subs: parking_lot::Mutex::default(),
            halt: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        registry.set_hook(Arc::new(directory::Hook(Arc::downgrade(&c))));
        Ok(c)
    }

    /// Starts the refresh, directory writer and bus tasks; `local` carries out
    /// what other nodes ask of this one.
    pub fn spawn(self: &Arc<Self>, local: crate::rpc::dispatch::Dispatcher) {
        if let Some(rx) = self.dirty_rx.lock().take() {
            self.tasks.spawn(directory::writer(self.clone(), rx));
        }
        self.tasks.spawn(nodes::refresher(self.clone()));
        self.tasks.spawn(bus::subscriber(self.clone(), local));
    }

    /// Stops this node's cluster tasks without cleaning up: its records then
    /// expire within the TTL, as a crashed node's would.
    pub async fn halt(&self) {
        self.halt.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Stops the tasks and deletes this node's record and directory entries (best
    /// effort: what cannot be deleted expires within the TTL).
    pub async fn leave(&self) {
        self.halt().await;
        let r = tokio::time::timeout(Duration::from_secs(2), directory::remove_all(self)).await;
        match r {
            Ok(Ok(())) => tracing::info!(node = %self.id, "left the tier"),
            Ok(Err(e)) => {
                tracing::warn!(node = %self.id, error = %e, "cannot remove this node's records: they expire within the TTL")
            }
            Err(_) => {
                tracing::warn!(node = %self.id, "timed out removing this node's records: they expire within the TTL")
            }
        }
    }

    pub(crate) fn halted(&self) -> &CancellationToken {
        &self.halt
    }

    /// Whether key streams live in the tier's Redis (`history.store = "redis"`).
    pub fn shares_key_history(&self) -> bool {
        self.keys.is_some()
    }

    /// Whether user streams live in the tier's Redis (`history.store = "redis"`
    /// with `history.user`).
    pub fn shares_user_history(&self) -> bool {
        self.shared_users
    }

    /// Whether room streams live in the tier's Redis (`history.store = "redis"`
    /// with `history.room`).
    pub fn shares_room_history(&self) -> bool {
        self.shared_rooms
    }

    /// Whether the broadcast stream lives in the tier's Redis
    /// (`history.store = "redis"` with `history.all`).
    pub fn shares_all_history(&self) -> bool {
        self.shared_all
    }

    /// The live nodes other than this one.
    pub fn others(&self) -> Vec<String> {
        self.live
            .read()
            .iter()
            .filter(|n| **n != self.id)
            .cloned()
            .collect()
    }

    /// Whether `node` is live (as of the last refresh).
    pub fn is_live(&self, node: &str) -> bool {
        self.live.read().iter().any(|n| n == node)
    }
}
