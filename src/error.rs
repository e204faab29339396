//! Error types. A store error never becomes the service's error: the cache layer logs it,
//! counts it and passes the request through (see the crate docs, "Fail-open").

use std::fmt;

/// An error from a [`Store`](crate::store::Store) operation.
///
/// The cache layer never returns this to the client: it counts the error, feeds the circuit
/// breaker and serves the request from the inner service instead.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The operation did not finish within the store's operation timeout.
    ///
    /// Raise the timeout (`ValkeyStoreBuilder::operation_timeout`) if the server is remote and
    /// this happens under normal load.
    Timeout,
    /// The store could not be reached or the connection broke. The connection is dropped and a
    /// fresh one is used for the next operation.
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
    /// The server answered with an error (wrong type, a script error, out of memory...).
    Server(Box<dyn std::error::Error + Send + Sync>),
}

/// Why a cluster node was not asked: it failed several times in a row, and is passed over
/// for a moment (see `ValkeyStore::run_on`). It says nothing new about the store's health,
/// so the layer's own breaker does not count it.
#[derive(Debug)]
pub(crate) struct PassedOver;

impl fmt::Display for PassedOver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a cluster node that failed several times in a row is passed over for now")
    }
}

impl std::error::Error for PassedOver {}

impl StoreError {
    /// A cluster node passed over after failures (not a new failure of the store).
    pub(crate) fn is_passed_over(&self) -> bool {
        matches!(self, StoreError::Unavailable(e) if e.is::<PassedOver>())
    }

    /// The same error for another waiter on the failed operation (the cause as text).
    #[cfg(feature = "valkey")]
    pub(crate) fn replicate(&self) -> StoreError {
        type Cause = Box<dyn std::error::Error + Send + Sync>;
        let text = |e: &(dyn std::error::Error + Send + Sync)| -> Cause { e.to_string().into() };
        match self {
            StoreError::Timeout => StoreError::Timeout,
            StoreError::Unavailable(e) if e.is::<PassedOver>() => {
                StoreError::Unavailable(Box::new(PassedOver))
            }
            StoreError::Unavailable(e) => StoreError::Unavailable(text(&**e)),
            StoreError::Server(e) => StoreError::Server(text(&**e)),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Timeout => f.write_str("cache store operation timed out"),
            StoreError::Unavailable(e) => write!(f, "cache store unavailable: {e}"),
            StoreError::Server(e) => write!(f, "cache store answered with an error: {e}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Timeout => None,
            StoreError::Unavailable(e) | StoreError::Server(e) => Some(&**e),
        }
    }
}

/// A configuration mistake, reported when the layer or a store is built.
///
/// The message says what was wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        ConfigError {
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}
