//! What can go wrong talking to the tier's Redis.

/// A cluster operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `cluster.redis` is not a URL the Redis client accepts.
    #[error("bad Redis URL {url}: {source}")]
    Url {
        url: String,
        source: redis::RedisError,
    },
    /// A command to Redis failed (unreachable, timed out, or refused).
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A bus message could not be encoded or decoded.
    #[error("bus envelope: {0}")]
    Envelope(#[from] crate::codec::CodecError),
    /// A bus message of a version this node does not speak.
    #[error("bus envelope of version {got}, this node speaks {want}")]
    Version { got: u8, want: u8 },
    /// Reading or appending the shared key history failed.
    #[error("{0}")]
    History(#[from] crate::history::redis_store::RedisHistoryError),
    /// A key-history operation on a node whose `history.store` is not `redis`.
    #[error("history.store is not \"redis\" on this node")]
    NoSharedHistory,
    /// Redis answered a script with something it never returns.
    #[error("unexpected Redis reply: {0}")]
    BadReply(String),
}
