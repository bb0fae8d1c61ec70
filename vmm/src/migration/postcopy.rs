//! Post-copy: the guest runs on the destination before all of its memory
//! has arrived; a page it touches that is still on the source is fetched
//! on demand through userfaultfd while the source pushes the rest.

use thiserror::Error;

/// Errors of post-copy.
#[derive(Debug, Error)]
pub enum PostcopyError {
    /// userfaultfd could not be set up.
    #[error("{what}")]
    Uffd {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}
