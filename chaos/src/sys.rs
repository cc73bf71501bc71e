//! The one system call the harness needs without a safe wrapper: moving a
//! thread into a network namespace.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the calling thread (only it, and threads it starts later) into
/// the network namespace `/run/netns/<name>`.
pub fn enter_netns(name: &str) -> std::io::Result<()> {
    let ns = File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns with a namespace descriptor we hold open.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
