//! The direct sends of one fan-out, handed to the kernel in one `io_uring`
//! submission instead of one `send(2)` each (`limits.io_uring`).
//!
//! On loopback and with the kernel's speculative-execution mitigations a
//! system call's entry and exit is a fixed cost per delivery; one submission
//! per chunk of members pays it once (the floor probe measured −9 % of a
//! delivery's CPU, docs/performance.md, run 15; the node, run 20).
//!
//! Each send carries `MSG_DONTWAIT`, so the kernel tries it at once and a full
//! socket completes with `EAGAIN` instead of being parked on a poll: every
//! operation of a submission is finished when [`send_each`] returns, exactly
//! like the `send(2)` calls it replaces. That is what makes the borrowed
//! buffers and descriptors sound, and it is the only `unsafe` in the edge.
//!
//! The ring is per thread (only the thread that made it submits to it), made
//! the first time that thread fans out. Where `io_uring` is refused (seccomp
//! profiles such as Docker's default block it, or `kernel.io_uring_disabled`)
//! the first failure is logged and every send goes through `send(2)`.
#![allow(unsafe_code)] // pushing a submission entry is `unsafe`; the SAFETY note below says why it holds

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU8, Ordering};

/// Most sends in one submission. Until its chunk is submitted a member's
/// later frames wait in its queue (`outbox::DirectSend`), so this also
/// bounds how long that lasts (a chunk takes tens of microseconds).
pub(crate) const MAX_BATCH: usize = 64;

const UNKNOWN: u8 = 0;
const AVAILABLE: u8 = 1;
const REFUSED: u8 = 2;

/// Whether this process may use `io_uring`; learnt from the first ring.
static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

thread_local! {
    static RING: RefCell<Option<io_uring::IoUring>> = const { RefCell::new(None) };
}

/// `io_uring` cannot be used here: send with `send(2)`; nothing was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unavailable;

fn new_ring() -> io::Result<io_uring::IoUring> {
    let entries = MAX_BATCH as u32;
    // Flags from newer kernels first (one submitting thread; a bad entry does
    // not stop the ones behind it), then a plain ring for older ones.
    io_uring::IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_submit_all()
        .build(entries)
        .or_else(|_| io_uring::IoUring::new(entries))
}

/// Makes a ring to learn whether this process may use `io_uring` (for
/// `limits.io_uring = "required"`, which refuses to start without it).
pub(crate) fn probe() -> io::Result<()> {
    match new_ring() {
        Ok(_) => {
            STATE.store(AVAILABLE, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => {
            STATE.store(REFUSED, Ordering::Relaxed);
            Err(e)
        }
    }
}

/// Whether [`send_each`] may still use `io_uring` in this process.
pub(crate) fn usable() -> bool {
    STATE.load(Ordering::Relaxed) != REFUSED
}

/// Sends each `(socket, frame)` with `MSG_DONTWAIT | MSG_NOSIGNAL`, all in
/// one submission, and stores each send's result in `results` at the same
/// index: bytes sent, or a negated `errno` (`-EAGAIN` for a full socket).
/// Every send has finished when this returns. An iterator, so the caller
/// need not collect its sends into a buffer per submission.
pub(crate) fn send_each<'a>(
    sends: impl ExactSizeIterator<Item = (BorrowedFd<'a>, &'a [u8])>,
    results: &mut [i32],
) -> Result<(), Unavailable> {
    assert!(sends.len() <= MAX_BATCH && results.len() >= sends.len());
    if sends.len() == 0 {
        return Ok(());
    }
    if !usable() {
        return Err(Unavailable);
    }
    // Every entry is built before the ring is touched, so a caller's
    // iterator that panics leaves nothing queued. The entries point into
    // buffers and descriptors borrowed for `'a`, which outlives this call.
    let mut entries: [Option<io_uring::squeue::Entry>; MAX_BATCH] = [const { None }; MAX_BATCH];
    let mut count = 0;
    for (fd, frame) in sends {
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        entries[count] = Some(
            io_uring::opcode::Send::new(io_uring::types::Fd(fd.as_raw_fd()), frame.as_ptr(), len)
                .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                .build()
                .user_data(count as u64),
        );
        count += 1;
    }
    RING.with(|cell| {
        // A fan-out never starts another on the same thread; if one ever
        // did, it would use send(2) rather than share the queue.
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return Err(Unavailable);
        };
        if slot.is_none() {
            match new_ring() {
                Ok(ring) => {
                    STATE.store(AVAILABLE, Ordering::Relaxed);
                    *slot = Some(ring);
                }
                Err(e) => {
                    if STATE.swap(REFUSED, Ordering::Relaxed) != REFUSED {
                        tracing::info!(error = %e, "io_uring unavailable; sending with send(2)");
                    }
                    return Err(Unavailable);
                }
            }
        }
        let ring = slot.as_mut().expect("made above");
        submit_and_reap(ring, entries[..count].iter().flatten(), count, results);
        Ok(())
    })
}

/// A send's result from [`send_each`] as `send(2)` would give it.
pub(crate) fn result(raw: i32) -> io::Result<usize> {
    usize::try_from(raw).map_err(|_| io::Error::from_raw_os_error(-raw))
}

fn submit_and_reap<'e>(
    ring: &mut io_uring::IoUring,
    entries: impl Iterator<Item = &'e io_uring::squeue::Entry>,
    count: usize,
    results: &mut [i32],
) {
    {
        let mut sq = ring.submission();
        for entry in entries {
            // SAFETY: the kernel reads each entry's buffer and uses its
            // descriptor only until the operation completes, and this
            // function does not return before every operation it queued has
            // completed (the loop below reaps one completion per entry; a
            // failed enter is retried, anything else aborts rather than
            // return while the kernel may still hold a pointer). `send_each`
            // built the entries from buffers and descriptors borrowed for
            // its whole call, so they outlive the operations. The queue is
            // empty on entry (every earlier call reaped all its completions)
            // and holds MAX_BATCH entries, so the push cannot fail.
            unsafe { sq.push(entry) }.expect("the submission queue holds MAX_BATCH entries");
        }
    }
    let mut reaped = 0;
    let mut failures = 0u32;
    while reaped < count {
        if let Err(e) = ring.submit_and_wait(count - reaped) {
            // EINTR, and EAGAIN/EBUSY (the kernel short of memory or of
            // completion space for a moment) leave the entries to retry.
            let transient = matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
            );
            failures += 1;
            if !transient || failures > 1_000 {
                // Returning now would free buffers the kernel may still
                // read. The node stops; its clients reconnect elsewhere.
                tracing::error!(error = %e, "io_uring submission failed; aborting");
                std::process::abort();
            }
            std::thread::yield_now();
        }
        for cqe in ring.completion() {
            if let Some(slot) = results.get_mut(cqe.user_data() as usize) {
                *slot = cqe.result();
                reaped += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsFd;

    use super::*;

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (server, client)
    }

    fn available() -> bool {
        match probe() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("io_uring unavailable here ({e}); skipping");
                false
            }
        }
    }

    /// Every socket of a submission gets its own frame, and a socket whose
    /// buffer is full completes at once with EAGAIN instead of waiting for
    /// its peer: the call returns although that peer never reads.
    #[test]
    fn each_socket_gets_its_frame_and_a_full_one_reports_eagain() {
        if !available() {
            return;
        }
        let pairs: Vec<_> = (0..3).map(|_| pair()).collect();
        let (full, _never_read) = pair();
        full.set_nonblocking(true).unwrap();
        let filler = vec![0u8; 1 << 16];
        let mut filled = 0;
        loop {
            match io::Write::write(&mut &full, &filler) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(filled < 1 << 30, "the socket never filled");
        }
        let frames: Vec<Vec<u8>> = (0..3).map(|i| format!("frame {i}").into_bytes()).collect();
        let mut sends: Vec<(BorrowedFd<'_>, &[u8])> = pairs
            .iter()
            .zip(&frames)
            .map(|((server, _), f)| (server.as_fd(), &f[..]))
            .collect();
        sends.push((full.as_fd(), b"no room"));
        let mut results = [i32::MIN; MAX_BATCH];
        send_each(sends.iter().copied(), &mut results).unwrap();
        for (i, ((_, client), f)) in pairs.iter().zip(&frames).enumerate() {
            assert_eq!(results[i], f.len() as i32, "send {i}");
            let mut got = vec![0u8; f.len()];
            (&*client).read_exact(&mut got).unwrap();
            assert_eq!(&got, f);
        }
        assert_eq!(results[3], -libc::EAGAIN, "the full socket");
        // The ring is reused: a second submission on the same thread works.
        let mut again = [i32::MIN; MAX_BATCH];
        send_each(sends[..1].iter().copied(), &mut again).unwrap();
        assert_eq!(again[0], frames[0].len() as i32);
    }

    /// A send to a socket whose peer is gone reports the error, no signal.
    #[test]
    fn a_closed_peer_is_an_error_not_a_sigpipe() {
        if !available() {
            return;
        }
        let (server, client) = pair();
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(client);
        // On loopback the reset has reached `server` when `drop` returns.
        let mut results = [0i32; MAX_BATCH];
        send_each([(server.as_fd(), &b"x"[..])].into_iter(), &mut results).unwrap();
        assert!(
            [-libc::ECONNRESET, -libc::EPIPE].contains(&results[0]),
            "result {}",
            results[0]
        );
    }
}
