//! Zero-copy forwarding for TCP listeners: bytes move socket -> pipe -> socket
//! with splice(2) and never enter user space, as HAProxy (`tune.pipesize`,
//! splice) and ztunnel do; ztunnel measured loopback throughput roughly
//! tripled over a userspace copy. One pipe per direction; half-close is kept
//! (a FIN from one side is passed on, the other direction goes on).
//!
//! Linux only; elsewhere, or when no pipe can be had (out of descriptors), the
//! buffered copy is used.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::activity::{Activity, Touching};

/// Bytes moved per splice call, and the pipe capacity asked for (Linux's
/// default pipe is 64 KiB; a larger one means fewer calls per megabyte).
const CHUNK: usize = 256 * 1024;

/// Copies both ways until both directions ended; returns bytes a->b and b->a.
pub async fn copy_bidirectional(a: &mut TcpStream, b: &mut TcpStream, activity: &Activity) -> io::Result<(u64, u64)> {
    let pipes = (pipe(), pipe());
    let (Ok(ab), Ok(ba)) = pipes else {
        let mut a = Touching::new(a, activity);
        return tokio::io::copy_bidirectional_with_sizes(&mut a, b, 64 * 1024, 64 * 1024).await;
    };
    let (a, b) = (&*a, &*b);
    tokio::try_join!(pump(a, b, ab, activity, false), pump(b, a, ba, activity, true))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    // Best effort: an unprivileged process may be capped (pipe-max-size);
    // splice works with whatever size the pipe has.
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
    Ok((r, w))
}

/// One direction: socket `from` into the pipe and the pipe into socket `to`,
/// both as far as they will go on each wake-up (the pipe fills while it
/// drains), until `from` says end of stream; then `to` gets a FIN.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    (read_end, write_end): (OwnedFd, OwnedFd),
    activity: &Activity,
    to_client: bool,
) -> io::Result<u64> {
    use nix::fcntl::{SpliceFFlags, splice};
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let (mut in_pipe, mut total, mut eof) = (0usize, 0u64, false);
    loop {
        let mut progressed = false;
        if !eof && in_pipe < CHUNK {
            match from.try_io(Interest::READABLE, || {
                splice(from.as_fd(), None, write_end.as_fd(), None, CHUNK - in_pipe, flags).map_err(io::Error::from)
            }) {
                Ok(0) => eof = true,
                Ok(n) => {
                    in_pipe += n;
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if in_pipe > 0 {
            match to.try_io(Interest::WRITABLE, || {
                splice(read_end.as_fd(), None, to.as_fd(), None, in_pipe, flags).map_err(io::Error::from)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    total += n as u64;
                    activity.moved(to_client, n);
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if eof && in_pipe == 0 {
            // The peer sent FIN: pass it on, keep the other direction going.
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(total);
        }
        if progressed {
            activity.touch();
        } else {
            tokio::select! {
                r = from.readable(), if !eof && in_pipe < CHUNK => r?,
                r = to.writable(), if in_pipe > 0 => r?,
            }
        }
    }
}
