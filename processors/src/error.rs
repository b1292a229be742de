//! The processors' one error type (start-up failures; runtime failures of
//! Kafka or ClickHouse are retried in place, never fatal).

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start: {0}")]
    Startup(String),
}
