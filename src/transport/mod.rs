//! Transports only adapt sockets: each accept loop turns a connection into a reader
//! and a writer and hands them to [`crate::session::run`].
//!
//! Every connection gets one tracing span (`conn`, with transport, remote address
//! and, after Auth, the key) and a permit from the shared connection limit, taken
//! before the connection is accepted.

pub mod quic;
pub mod tcp;

use crate::session::{SessionEnd, SessionError};
use tracing::{debug, info, warn};

/// Logs how a session ended, in the connection's span.
pub(crate) fn log_end(result: &Result<SessionEnd, SessionError>) {
    match result {
        Ok(SessionEnd::ClientClosed) => debug!("connection closed by client"),
        Ok(SessionEnd::ServerClosed(reason)) => info!(%reason, "connection closed by server"),
        // The client hanging up or its network failing is no server problem.
        Err(e @ SessionError::Read(_)) => info!(error = %e, "connection lost"),
        Err(e) => warn!(error = %e, "connection closed"),
    }
}
