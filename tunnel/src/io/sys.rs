//! Small shared helpers around raw syscalls and error context.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// An error with a human-readable description of the operation that failed, keeping
/// the original error (and its `raw_os_error`) reachable through
/// [`std::error::Error::source`] and [`os_error_of`].
#[derive(Debug)]
pub(crate) struct Context {
    what: String,
    source: io::Error,
    detail: Option<String>,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.source)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Wraps `err` so that its message says what was being done.
pub(crate) fn context(err: io::Error, what: impl Into<String>) -> io::Error {
    io::Error::new(
        err.kind(),
        Context {
            what: what.into(),
            source: err,
            detail: None,
        },
    )
}

/// Like [`context`], with a detail (e.g. the kernel's extended-ack message) appended.
pub(crate) fn context_detail(err: io::Error, what: impl Into<String>, detail: String) -> io::Error {
    io::Error::new(
        err.kind(),
        Context {
            what: what.into(),
            source: err,
            detail: Some(detail),
        },
    )
}

/// The errno of `err`, looking through [`Context`] wrappers.
pub(crate) fn os_error_of(err: &io::Error) -> Option<i32> {
    if let Some(code) = err.raw_os_error() {
        return Some(code);
    }
    let inner = err.get_ref()?.downcast_ref::<Context>()?;
    os_error_of(&inner.source)
}

/// Extension to attach context to `io::Result`s.
pub(crate) trait ResultExt<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> io::Result<T>;
}

impl<T> ResultExt<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> io::Result<T> {
        self.map_err(|e| context(e, what()))
    }
}

/// The calling thread's `errno` as an `io::Error`.
pub(crate) fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// The calling thread's `errno`.
pub(crate) fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `setsockopt` with an `int` value.
pub(crate) fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a live, properly aligned c_int and we pass its exact size; the
    // kernel only reads `optlen` bytes from it. An invalid fd yields EBADF, not UB.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(last_error()) }
}

/// `getsockopt` returning an `int` value.
pub(crate) fn getsockopt_int(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals; `len` tells the kernel how many bytes it
    // may write into `value`, and it writes back the length it used.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
    if rc == 0 {
        Ok(value)
    } else {
        Err(last_error())
    }
}

/// Waits until `fd` has one of `events` (POLLIN/POLLOUT) or `timeout` passes.
/// Returns `Ok(false)` on timeout or EINTR (callers re-check their stop flag and retry).
pub(crate) fn poll_one(fd: RawFd, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is one live, initialized pollfd and we pass nfds = 1.
    let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    if rc < 0 {
        let err = last_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(rc > 0)
}

/// The name of interface `ifindex`, or `#ifindex` if it has none (any more).
pub(crate) fn ifname_or_index(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname requires; on success it
    // holds a NUL-terminated name, on failure the call returns NULL and we don't read it.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("#{ifindex}");
    }
    // SAFETY: if_indextoname succeeded, so `buf` holds a NUL-terminated C string.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    format!("{} (#{ifindex})", name.to_string_lossy())
}

/// Whether the process runs with effective uid 0.
#[cfg(test)]
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_errno_and_says_what_failed() {
        let e = context(io::Error::from_raw_os_error(libc::ENOENT), "open thing");
        assert_eq!(os_error_of(&e), Some(libc::ENOENT));
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let msg = e.to_string();
        assert!(msg.starts_with("open thing: "), "{msg}");
        let e2 = context(e, "outer");
        assert_eq!(os_error_of(&e2), Some(libc::ENOENT));
        assert!(e2.to_string().starts_with("outer: open thing: "));
    }
}
