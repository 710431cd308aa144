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
}
