//! The system calls the wide-area link needs that have no safe wrapper
//! here: entering a network namespace and attaching a TUN device. The one
//! place in the bench that uses `unsafe`; each block is a plain system call
//! on a descriptor the caller owns.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the calling thread (only it) into the network namespace `ns`
/// refers to.
pub fn enter_netns(ns: &File) -> std::io::Result<()> {
    // SAFETY: setns with a namespace descriptor we hold open.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `tun` (an open `/dev/net/tun`) the TUN device `name` (IP packets,
/// no packet-information header) in the calling thread's namespace.
pub fn attach_tun(tun: &File, name: &str) -> std::io::Result<()> {
    // struct ifreq: the name, then the flags (a short) in the union.
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.len() >= 16 {
        return Err(std::io::Error::other("interface names are under 16 bytes"));
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req` is
    // laid out as, and it outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises this process's open-file limit (soft and hard) to `want`, as far
/// as the system allows; children inherit it. The limit it ends up at.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        return 0;
    }
    if cur.rlim_cur >= want {
        return cur.rlim_cur;
    }
    // Root may raise the hard limit (up to fs.nr_open); others only the
    // soft one, up to the hard.
    let mut next = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(cur.rlim_max),
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &next) } != 0 {
        next.rlim_cur = cur.rlim_max;
        next.rlim_max = cur.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &next) } != 0 {
            return cur.rlim_cur;
        }
    }
    next.rlim_cur
}
