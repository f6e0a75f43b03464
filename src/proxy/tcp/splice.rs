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
    let (mut in_pipe, mut total, mut eof) = (0usize, 0u64, false);
    loop {
        let mut progressed = false;
        if !eof && in_pipe < CHUNK {
            match fill(from, &write_end, CHUNK - in_pipe, in_pipe) {
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
            match drain(&read_end, to, in_pipe) {
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
            // Bytes in the pipe: only `to` can make room (see `fill`); an
            // empty pipe: only `from` can fill it.
            tokio::select! {
                r = from.readable(), if !eof && in_pipe == 0 => r?,
                r = to.writable(), if in_pipe > 0 => r?,
            }
        }
    }
}

const FLAGS: nix::fcntl::SpliceFFlags =
    nix::fcntl::SpliceFFlags::SPLICE_F_MOVE.union(nix::fcntl::SpliceFFlags::SPLICE_F_NONBLOCK);

/// Splices up to `want` bytes from `from` into the pipe holding `in_pipe`.
/// With the pipe empty, EAGAIN can only mean `from` is empty, so its
/// readiness is cleared and `from.readable()` waits for new bytes; with
/// bytes in the pipe, EAGAIN may mean the pipe's slots are full (small
/// segments fill them long before its byte size), and clearing `from`'s
/// readiness then would wait for bytes that already came: the caller waits
/// on `to` instead and calls again once the pipe drained.
fn fill(from: &TcpStream, write_end: &OwnedFd, want: usize, in_pipe: usize) -> io::Result<usize> {
    let splice_in = || nix::fcntl::splice(from.as_fd(), None, write_end.as_fd(), None, want, FLAGS);
    if in_pipe == 0 {
        from.try_io(Interest::READABLE, || splice_in().map_err(io::Error::from))
    } else {
        splice_in().map_err(io::Error::from)
    }
}

/// Splices up to `n` bytes from the pipe (which holds at least that many)
/// into `to`: EAGAIN can only mean `to` is full.
fn drain(read_end: &OwnedFd, to: &TcpStream, n: usize) -> io::Result<usize> {
    to.try_io(Interest::WRITABLE, || {
        nix::fcntl::splice(read_end.as_fd(), None, to.as_fd(), None, n, FLAGS).map_err(io::Error::from)
    })
}

/// How moving an exact length ended short.
#[derive(Debug)]
pub enum Cut {
    /// The source ended or failed before the length was read.
    From(io::Error),
    /// The destination failed.
    To(io::Error),
    /// The destination took nothing for the stall limit.
    Stalled,
}

/// Moves exactly `len` bytes from `from` to `to` through a pipe and leaves
/// what follows on `from` (the next response of a keep-alive connection):
/// a large HTTP/1.1 body whose length is known, as HAProxy splices one. The
/// bytes wait in kernel pipe pages, not in a buffer of ours, while `to` is
/// slow, and no more is read from `from` than the pipe holds; `to` may take
/// nothing for at most `stall` (`timeouts.responseWrite`). Returns the bytes
/// written to `to`, and why it stopped short. `Err` only when no pipe could
/// be had: nothing was moved, the caller copies instead.
pub async fn forward_exact(
    from: &TcpStream,
    to: &TcpStream,
    len: u64,
    stall: std::time::Duration,
) -> io::Result<(u64, Result<(), Cut>)> {
    let (read_end, write_end) = pipe_of_default_size()?;
    let (mut unread, mut in_pipe, mut written) = (len, 0usize, 0u64);
    let mut stalled_since: Option<tokio::time::Instant> = None;
    while written < len {
        let mut progressed = false;
        if unread > 0 {
            let want = unread.min(CHUNK as u64) as usize;
            match fill(from, &write_end, want, in_pipe) {
                Ok(0) => return Ok((written, Err(Cut::From(io::ErrorKind::UnexpectedEof.into())))),
                Ok(n) => {
                    unread -= n as u64;
                    in_pipe += n;
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Ok((written, Err(Cut::From(e)))),
            }
        }
        if in_pipe > 0 {
            match drain(&read_end, to, in_pipe) {
                Ok(n) => {
                    in_pipe -= n;
                    written += n as u64;
                    stalled_since = None;
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    stalled_since.get_or_insert_with(tokio::time::Instant::now);
                }
                Err(e) => return Ok((written, Err(Cut::To(e)))),
            }
        }
        if progressed || written == len {
            continue;
        }
        // Bytes in the pipe: only `to` can make room (see `fill`); an empty
        // pipe: only `from` can fill it.
        let deadline = stalled_since.map(|since| since + stall);
        tokio::select! {
            r = from.readable(), if in_pipe == 0 => {
                if let Err(e) = r {
                    return Ok((written, Err(Cut::From(e))));
                }
            }
            r = to.writable(), if in_pipe > 0 => {
                if let Err(e) = r {
                    return Ok((written, Err(Cut::To(e))));
                }
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                return Ok((written, Err(Cut::Stalled)));
            }
        }
    }
    Ok((written, Ok(())))
}

/// A pipe left at the kernel's default size (64 KiB): what a stalled reader
/// can hold in kernel pages is that, not the larger pipe TCP listeners ask for.
fn pipe_of_default_size() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: (ours, the peer's).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        (ours, peer)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn moves_exactly_the_length_and_leaves_what_follows() {
        const LEN: usize = 3 * 1024 * 1024 + 17;
        let (from, mut source) = pair().await;
        let (to, mut sink) = pair().await;
        let sent = pattern(LEN);
        let writer = tokio::spawn(async move {
            source.write_all(&pattern(LEN)).await.unwrap();
            source.write_all(b"next!").await.unwrap();
            source
        });
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; LEN];
            sink.read_exact(&mut got).await.unwrap();
            got
        });
        let (written, cut) = forward_exact(&from, &to, LEN as u64, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(cut.is_ok(), "{cut:?}");
        assert_eq!(written, LEN as u64);
        assert!(reader.await.unwrap() == sent, "the bytes arrived changed");
        let _source = writer.await.unwrap();
        let mut next = [0u8; 5];
        let mut from = from;
        from.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"next!");
    }

    /// Many small segments fill the pipe's slots long before its bytes while
    /// the destination is full: the bytes left on the socket are still read
    /// once the pipe drained, though no more come (the sender waits for an
    /// answer).
    #[tokio::test]
    async fn small_segments_that_fill_the_pipe_are_all_moved() {
        const WRITES: usize = 400;
        let (from, mut source) = pair().await;
        let (to, mut sink) = pair().await;
        source.set_nodelay(true).unwrap();
        for i in 0..WRITES {
            source.write_all(&[(i % 251) as u8; 100]).await.unwrap();
        }
        // The destination full before the first splice, so the pipe fills.
        let mut filler = 0;
        while let Ok(n) = to.try_write(&[0u8; 64 * 1024]) {
            filler += n;
        }
        let reader = tokio::spawn(async move {
            // The window the sink does not read in: the scenario, not a wait.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut got = vec![0u8; filler + WRITES * 100];
            sink.read_exact(&mut got).await.unwrap();
            got.split_off(filler)
        });
        let moved = forward_exact(&from, &to, WRITES as u64 * 100, Duration::from_secs(5));
        let (written, cut) = tokio::time::timeout(Duration::from_secs(20), moved)
            .await
            .expect("bytes already on the socket were left there")
            .unwrap();
        assert!(cut.is_ok(), "{cut:?}");
        assert_eq!(written, WRITES as u64 * 100);
        let got = reader.await.unwrap();
        assert!(got.chunks(100).enumerate().all(|(i, c)| c == [(i % 251) as u8; 100]));
        drop(source);
    }

    #[tokio::test]
    async fn a_source_that_ends_early_is_its_cut() {
        let (from, mut source) = pair().await;
        let (to, _sink) = pair().await;
        source.write_all(&pattern(1000)).await.unwrap();
        drop(source);
        let (written, cut) = forward_exact(&from, &to, 5000, Duration::from_secs(5)).await.unwrap();
        assert_eq!(written, 1000);
        assert!(matches!(cut, Err(Cut::From(_))), "{cut:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_that_takes_nothing_is_cut_at_the_stall_limit() {
        let (from, mut source) = pair().await;
        let (to, sink) = pair().await;
        socket2::SockRef::from(&sink).set_recv_buffer_size(4096).unwrap();
        tokio::spawn(async move {
            let block = vec![7u8; 64 * 1024];
            while source.write_all(&block).await.is_ok() {}
        });
        let started = tokio::time::Instant::now();
        let (written, cut) = forward_exact(&from, &to, 1 << 30, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(matches!(cut, Err(Cut::Stalled)), "{cut:?}");
        assert!(written < 1 << 30);
        assert!(started.elapsed() >= Duration::from_secs(60));
        drop(sink);
    }
}
