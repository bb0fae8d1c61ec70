//! Support for memvisor's integration tests (the files in `tests/tests/`).
//!
//! The tests drive the real `vmm` binary the way a user does and assert on
//! its exit status, its stderr and its `--json` report:
//! - [`vmm`]: finds (or builds) the binary, runs it with a timeout and parses
//!   the report.
//! - [`hugetlb`]: reserves hugetlb pages for a test and gives them back,
//!   serialised across threads and processes by a file lock.
//! - [`report`]: reading the JSON report and the assertions boot tests share.
//! - [`netns`]: two test hosts, network namespaces joined by a veth pair.
//!
//! Nothing here skips a test: when the host refuses something a test needs,
//! the helper returns an error that says why and the test fails with it.

pub mod hugetlb;
pub mod netns;
pub mod report;
pub mod vmm;

pub use vmm::{RunResult, Vmm};
