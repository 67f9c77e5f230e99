//! The one error type of this crate: which step failed, and the errno it failed with.
//!
//! Every fallible function returns `io::Result`, so callers that only care about the
//! `ErrorKind` (e.g. `PermissionDenied` when not root) can match on it directly. The
//! payload is an [`XskError`] naming the step (`"bind AF_XDP socket to ifindex 3 queue
//! 0"`) and, for `BPF_PROG_LOAD`, the verifier log; [`errno`] digs the errno back out.

use std::fmt;
use std::io;

/// A failed step (a system call, mostly) and the OS error it returned.
#[derive(Debug)]
pub struct XskError {
    step: String,
    source: io::Error,
    detail: Option<String>,
}

impl XskError {
    /// What was being done, e.g. `"XDP_UMEM_REG"` or `"bind AF_XDP socket to ..."`.
    pub fn step(&self) -> &str {
        &self.step
    }

    /// The errno the kernel returned, if the failure came from a system call.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// Extra text from the kernel, e.g. the verifier log of a rejected program.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }
}

impl fmt::Display for XskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.source)?;
        if let Some(detail) = &self.detail {
            write!(f, "\n{detail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for XskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The errno behind an error returned by this crate (or any raw OS `io::Error`).
pub fn errno(error: &io::Error) -> Option<i32> {
    error.raw_os_error().or_else(|| {
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<XskError>())
            .and_then(XskError::errno)
    })
}

/// Wraps `source` with the step that produced it, keeping its `ErrorKind`.
pub(crate) fn step_error(step: impl Into<String>, source: io::Error) -> io::Error {
    with_detail(step, source, None)
}

pub(crate) fn with_detail(
    step: impl Into<String>,
    source: io::Error,
    detail: Option<String>,
) -> io::Error {
    io::Error::new(
        source.kind(),
        XskError {
            step: step.into(),
            source,
            detail,
        },
    )
}

/// `errno` of the last failed system call, wrapped with the step's name.
pub(crate) fn last_os_error(step: impl Into<String>) -> io::Error {
    step_error(step, io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_step_and_errno_survives_wrapping() {
        let e = step_error("XDP_UMEM_REG", io::Error::from_raw_os_error(libc::ENOMEM));
        assert_eq!(e.kind(), io::ErrorKind::OutOfMemory);
        assert_eq!(errno(&e), Some(libc::ENOMEM));
        assert!(e.to_string().starts_with("XDP_UMEM_REG: "), "{e}");
    }

    #[test]
    fn detail_follows_the_step_line() {
        let e = with_detail(
            "BPF_PROG_LOAD x",
            io::Error::from_raw_os_error(libc::EACCES),
            Some("verifier log:\nR0 !read_ok".into()),
        );
        assert!(e.to_string().ends_with("verifier log:\nR0 !read_ok"), "{e}");
    }
}
