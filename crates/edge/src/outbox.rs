//! A session's bounded outbound queue. The hub pushes shared frames without
//! ever awaiting; the session's writer drains everything queued in one
//! vectored write. Overflow is a policy: the session is cut off as a slow
//! consumer, so one slow reader never grows node memory without bound.
//!
//! A WebSocket session also gives the outbox its socket: while nothing is
//! queued and the writer is idle, a push writes the frame straight to the
//! socket (a non-blocking `send(2)`), saving the wake-up of the session's
//! task for the common case of a socket with room. Writes stay ordered
//! because they only happen under the outbox's lock and only while no frame
//! waits.
//!
//! The direct write goes to the file descriptor, not through tokio's
//! `try_write`: that first reads the socket's readiness word, a cache line of
//! its own per connection that the reactor's thread also writes, and the hub
//! touches one per member per event (docs/performance.md, run 13). Bypassing
//! it is safe: a send that finds the socket full only queues the frame, and
//! the writer's own `try_write` then learns the socket is full and waits for
//! the kernel's next writable edge, which comes whoever filled the buffer.
//!
//! When the hub fans out several events read together and a later one goes
//! to the same room, it defers the earlier frames ([`Outbox::push_deferred`]):
//! they wait in the queue without waking the writer, and the next push or
//! [`Outbox::flush_deferred`] sends them all in one vectored `send(2)`. On
//! loopback and on a NIC alike a send's cost is mostly per call, not per byte,
//! so a burst into one room costs one send per member instead of one per
//! frame (docs/performance.md, run 17). Order holds because every frame still
//! passes through the one queue.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::disconnect::Disconnect;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The queue was full: the session is now closing as a slow consumer.
    Overflow,
    /// The session is already closing.
    Closed,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Bytes>,
    bytes: usize,
    close: Option<Disconnect>,
    /// Frames held back to coalesce: a newer frame with the same key
    /// replaces the held one, which goes out when its window ends.
    held: Vec<Held>,
    /// The writer took frames and has not finished writing them.
    writer_busy: bool,
    /// A [`DirectSend`] is under way: pushes queue and the writer waits.
    sending: bool,
    /// `frames` were deferred by the hub for one direct write with a later
    /// frame: the writer was not woken for them.
    deferred: bool,
    /// The session's socket, for direct writes (WebSocket sessions only).
    socket: Option<std::sync::Arc<tokio::net::TcpStream>>,
}

impl State {
    /// The writer or a [`DirectSend`] owns the socket: nobody else writes.
    fn writing(&self) -> bool {
        self.writer_busy || self.sending
    }
}

struct Held {
    key: Box<str>,
    due: Instant,
    frame: Bytes,
}

/// One non-blocking `send(2)` on the session's socket. `MSG_NOSIGNAL`: a
/// peer gone away is an error to act on, never a SIGPIPE.
fn send_now(socket: std::os::fd::BorrowedFd<'_>, frame: &[u8]) -> std::io::Result<usize> {
    socket2::SockRef::from(&socket).send_with_flags(frame, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
}

/// Most frames one vectored send carries (far below any `IOV_MAX`).
const MAX_IOV: usize = 64;

/// Sends as much of `frames` as the socket takes now, in one vectored
/// `send(2)`, and drops what went out from the queue.
fn send_queued(socket: &tokio::net::TcpStream, frames: &mut VecDeque<Bytes>, bytes: &mut usize) {
    let mut iov = [std::io::IoSlice::new(&[]); MAX_IOV];
    let mut count = 0;
    for (slot, frame) in iov.iter_mut().zip(frames.iter()) {
        *slot = std::io::IoSlice::new(frame);
        count += 1;
    }
    let Ok(mut sent) = socket2::SockRef::from(socket)
        .send_vectored_with_flags(&iov[..count], libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
    else {
        // Full, or failing: the writer finds out and acts.
        return;
    };
    *bytes -= sent;
    while sent > 0 {
        let Some(front) = frames.front_mut() else {
            break;
        };
        if front.len() <= sent {
            sent -= front.len();
            frames.pop_front();
        } else {
            bytes::Buf::advance(front, sent);
            sent = 0;
        }
    }
}

/// What [`Outbox::begin_shared`] did with a frame.
pub(crate) enum Shared<'a> {
    /// Queued, sent with deferred frames, or refused, as `push_shared` would.
    Done(Result<(), PushError>),
    /// Nothing is queued and the writer is idle: the caller sends the frame
    /// to [`DirectSend::socket`] and reports with [`DirectSend::finish`].
    Direct(DirectSend<'a>),
}

/// A frame that may go straight to the socket, sent without the outbox's
/// lock so that the caller can hold many of them at once without ever
/// blocking on a lock while holding another. While it lives the outbox is
/// `sending`: pushes queue behind it and the writer waits, so no other write
/// can come between the send and what follows it and a session's bytes stay
/// in order. The socket is held too, so its descriptor cannot be closed and
/// reused before the send.
///
/// One dropped without [`DirectSend::finish`] (a panic during a fan-out)
/// closes its session with 1011 and a reconnect hint: whether the frame went
/// out is unknown, so the client resumes from the last event it saw instead
/// of reading on past a gap, and the session does not stall forever behind a
/// send that never ends.
pub(crate) struct DirectSend<'a> {
    outbox: &'a Outbox,
    socket: std::sync::Arc<tokio::net::TcpStream>,
    finished: bool,
}

impl DirectSend<'_> {
    /// The session's socket, valid while `self` lives.
    pub(crate) fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.socket.as_fd()
    }

    /// Sends with one `send(2)`.
    pub(crate) fn send_now(&self, frame: &[u8]) -> std::io::Result<usize> {
        send_now(self.socket(), frame)
    }

    /// Ends the send (`sent` is its result): what the socket did not take
    /// goes to the writer, ahead of what was pushed meanwhile.
    pub(crate) fn finish(mut self, frame: &Bytes, sent: std::io::Result<usize>) {
        let mut st = self.outbox.lock();
        st.sending = false;
        self.outbox.after_send(st, frame, sent);
        self.finished = true;
    }
}

impl Drop for DirectSend<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        tracing::error!("a direct send was abandoned unfinished: closing its session");
        self.outbox.lock().sending = false;
        self.outbox.close(Disconnect::INTERNAL, false);
    }
}

/// Where [`Outbox::route_shared`] sent a frame.
enum Route<'a> {
    Done(Result<(), PushError>),
    Direct(std::sync::MutexGuard<'a, State>),
}

/// What the writer should do next.
pub(crate) enum Next {
    Write(VecDeque<Bytes>),
    /// Write these, then the close frame, then stop.
    Close(VecDeque<Bytes>, Disconnect),
}

pub(crate) struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    max_frames: usize,
    max_bytes: usize,
}

impl Outbox {
    pub(crate) fn new(max_frames: usize, max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            max_frames,
            max_bytes,
        }
    }

    /// Lets pushes write straight to `socket` while nothing is queued.
    pub(crate) fn attach_socket(&self, socket: std::sync::Arc<tokio::net::TcpStream>) {
        self.lock().socket = Some(socket);
    }

    /// Stops direct writes and releases the socket (the session is ending).
    pub(crate) fn detach_socket(&self) {
        let mut st = self.lock();
        st.socket = None;
        if std::mem::take(&mut st.deferred) {
            drop(st);
            self.ready.notify_one();
        }
    }

    /// The writer wrote everything it took: direct writes may resume.
    pub(crate) fn writer_done(&self) {
        self.lock().writer_busy = false;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame. Never blocks beyond a short uncontended lock.
    pub(crate) fn push(&self, frame: Bytes) -> Result<(), PushError> {
        self.push_shared(&frame)
    }

    /// Like [`Outbox::push`] for a frame shared by many sessions: it is
    /// cloned (a reference count on a cache line every member's push would
    /// touch) only when it has to wait in the queue.
    pub(crate) fn push_shared(&self, frame: &Bytes) -> Result<(), PushError> {
        match self.route_shared(frame) {
            Route::Done(pushed) => pushed,
            Route::Direct(st) => {
                use std::os::fd::AsFd;
                let socket = st.socket.as_deref().expect("routed to its socket");
                let sent = send_now(socket.as_fd(), frame);
                self.after_send(st, frame, sent);
                Ok(())
            }
        }
    }

    /// [`Outbox::push_shared`] for a caller that sends the frame itself when
    /// it may go straight to the socket ([`Shared::Direct`]), so that it can
    /// hand several sessions' sends to the kernel at once (`uring.rs`).
    pub(crate) fn begin_shared(&self, frame: &Bytes) -> Shared<'_> {
        match self.route_shared(frame) {
            Route::Done(pushed) => Shared::Done(pushed),
            Route::Direct(mut st) => {
                let socket = st.socket.clone().expect("routed to its socket");
                st.sending = true;
                Shared::Direct(DirectSend {
                    outbox: self,
                    socket,
                    finished: false,
                })
            }
        }
    }

    /// Admits a shared frame and queues it, unless it may go straight to the
    /// socket: then the caller sends it under the returned lock.
    fn route_shared(&self, frame: &Bytes) -> Route<'_> {
        let mut st = self.lock();
        if let Err(refused) = self.admit(&mut st, frame) {
            return Route::Done(Err(refused));
        }
        if !st.writing() {
            if st.deferred {
                // The frames deferred for this one go out with it.
                st.deferred = false;
                st.bytes += frame.len();
                st.frames.push_back(frame.clone());
                return Route::Done(self.send_deferred(st));
            }
            if st.frames.is_empty() && st.socket.is_some() {
                return Route::Direct(st);
            }
        }
        self.enqueue(st, frame.clone());
        Route::Done(Ok(()))
    }

    /// Puts what a direct send did not take at the front of the queue (the
    /// frames pushed meanwhile follow it) and wakes the writer for whatever
    /// waits. A full socket or an error leaves the whole frame to the
    /// writer, which finds out and acts.
    fn after_send(
        &self,
        mut st: std::sync::MutexGuard<'_, State>,
        frame: &Bytes,
        sent: std::io::Result<usize>,
    ) {
        let rest = match sent {
            Ok(n) if n >= frame.len() => None,
            Ok(n) => Some(frame.slice(n..)),
            Err(_) => Some(frame.clone()),
        };
        if let Some(rest) = rest {
            st.bytes += rest.len();
            st.frames.push_front(rest);
        }
        let wake = !st.frames.is_empty() || st.close.is_some();
        drop(st);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Queues `frame` behind the others; the writer is woken for the first.
    fn enqueue(&self, mut st: std::sync::MutexGuard<'_, State>, frame: Bytes) {
        st.bytes += frame.len();
        st.frames.push_back(frame);
        let first = st.frames.len() == 1;
        drop(st);
        if first {
            self.ready.notify_one();
        }
    }

    /// Queues a frame the hub will send together with a later one: while the
    /// session could take a direct write, the writer is not woken for it,
    /// and the next [`Outbox::push_shared`] or [`Outbox::flush_deferred`]
    /// sends everything queued in one vectored write. Returns whether the
    /// caller must call `flush_deferred` (the first frame deferred here).
    pub(crate) fn push_deferred(&self, frame: &Bytes) -> Result<bool, PushError> {
        let mut st = self.lock();
        self.admit(&mut st, frame)?;
        let direct = st.socket.is_some() && !st.writing() && (st.frames.is_empty() || st.deferred);
        st.bytes += frame.len();
        st.frames.push_back(frame.clone());
        if direct {
            let first = !st.deferred;
            st.deferred = true;
            return Ok(first);
        }
        let first = st.frames.len() == 1;
        drop(st);
        if first {
            self.ready.notify_one();
        }
        Ok(false)
    }

    /// Sends the frames [`Outbox::push_deferred`] held, if a later push has
    /// not already; what the socket does not take goes to the writer.
    pub(crate) fn flush_deferred(&self) {
        let mut st = self.lock();
        if !st.deferred {
            return;
        }
        st.deferred = false;
        let _ = self.send_deferred(st);
    }

    /// Writes the queue straight to the socket (the caller cleared
    /// `deferred` under the same lock), then wakes the writer for the rest.
    fn send_deferred(&self, mut st: std::sync::MutexGuard<'_, State>) -> Result<(), PushError> {
        if !st.writing() {
            let State {
                frames,
                bytes,
                socket,
                ..
            } = &mut *st;
            if let Some(socket) = socket.as_deref() {
                send_queued(socket, frames, bytes);
            }
        }
        let waiting = !st.frames.is_empty();
        drop(st);
        if waiting {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Refuses a frame for a closing session, and cuts the session off when
    /// the frame would overflow its queue.
    fn admit(&self, st: &mut State, frame: &Bytes) -> Result<(), PushError> {
        if st.close.is_some() {
            return Err(PushError::Closed);
        }
        if st.frames.len() >= self.max_frames || st.bytes + frame.len() > self.max_bytes {
            st.frames = VecDeque::new();
            st.bytes = 0;
            st.deferred = false;
            st.close = Some(Disconnect::SLOW_CONSUMER);
            self.ready.notify_one();
            return Err(PushError::Overflow);
        }
        Ok(())
    }

    /// Holds `frame` until `window` after the first frame of its `key` was
    /// held; a newer frame with the same key replaces it (the last wins).
    /// A zero window replaces a held frame of the key, if any, and otherwise
    /// sends at once: a newer frame never overtakes an older one of its key.
    pub(crate) fn push_coalesced(
        &self,
        key: &str,
        frame: Bytes,
        window: Duration,
    ) -> Result<(), PushError> {
        let mut st = self.lock();
        if st.close.is_some() {
            return Err(PushError::Closed);
        }
        if let Some(held) = st.held.iter_mut().find(|h| &*h.key == key) {
            held.frame = frame;
            return Ok(());
        }
        if window.is_zero() {
            drop(st);
            return self.push(frame);
        }
        if st.frames.len() + st.held.len() >= self.max_frames {
            st.frames = VecDeque::new();
            st.held = Vec::new();
            st.bytes = 0;
            st.deferred = false;
            st.close = Some(Disconnect::SLOW_CONSUMER);
            drop(st);
            self.ready.notify_one();
            return Err(PushError::Overflow);
        }
        st.held.push(Held {
            key: key.into(),
            due: Instant::now() + window,
            frame,
        });
        drop(st);
        // The writer may be asleep without a deadline: wake it to arm one.
        self.ready.notify_one();
        Ok(())
    }

    /// Asks the writer to close the socket. The first close wins;
    /// `flush_first` sends what is queued before the close frame (a drain)
    /// instead of dropping it.
    pub(crate) fn close(&self, disconnect: Disconnect, flush_first: bool) {
        let mut st = self.lock();
        if st.close.is_none() {
            if !flush_first {
                st.frames = VecDeque::new();
                st.bytes = 0;
            }
            // The writer takes over whatever is queued.
            st.deferred = false;
            st.close = Some(disconnect);
        }
        drop(st);
        self.ready.notify_one();
    }

    /// What is ready now, without waiting; otherwise when the earliest held
    /// frame comes due, if any.
    pub(crate) fn take_ready(&self) -> Result<Next, Option<Instant>> {
        let mut st = self.lock();
        if st.sending {
            // The send's end wakes the writer again.
            return Err(None);
        }
        if let Some(disconnect) = st.close {
            let frames = std::mem::take(&mut st.frames);
            st.bytes = 0;
            st.writer_busy = true;
            st.deferred = false;
            return Ok(Next::Close(frames, disconnect));
        }
        let now = Instant::now();
        if st.held.iter().any(|h| h.due <= now) {
            let (due, later): (Vec<Held>, Vec<Held>) = std::mem::take(&mut st.held)
                .into_iter()
                .partition(|h| h.due <= now);
            st.held = later;
            for h in due {
                st.frames.push_back(h.frame);
            }
        }
        if !st.frames.is_empty() {
            st.bytes = 0;
            st.writer_busy = true;
            st.deferred = false;
            // take() leaves an empty deque that has not allocated, so an
            // idle session holds no queue buffer.
            let frames = std::mem::take(&mut st.frames);
            let still_held = !st.held.is_empty();
            drop(st);
            if still_held {
                // The caller learns when the held frames come due only from
                // an `Err`: wake it once more to ask, or it sleeps past them.
                self.ready.notify_one();
            }
            return Ok(Next::Write(frames));
        }
        Err(st.held.iter().map(|h| h.due).min())
    }

    /// Resolves after a push or a close request (possibly spuriously): call
    /// [`Outbox::take_ready`] then. A wake-up given while nobody waited is
    /// kept for the next waiter, so none is lost between the two calls.
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.ready.notified()
    }

    /// Waits until there is something to write or a close to perform.
    pub(crate) async fn next(&self) -> Next {
        loop {
            let next_due = match self.take_ready() {
                Ok(next) => return next,
                Err(due) => due,
            };
            match next_due {
                Some(due) => {
                    tokio::select! {
                        _ = self.changed() => {}
                        _ = tokio::time::sleep_until(due) => {}
                    }
                }
                None => self.changed().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future as _;

    use super::*;

    #[tokio::test]
    async fn overflow_closes_as_slow_consumer() {
        let o = Outbox::new(2, 1000);
        o.push(Bytes::from_static(b"a")).unwrap();
        o.push(Bytes::from_static(b"b")).unwrap();
        assert_eq!(o.push(Bytes::from_static(b"c")), Err(PushError::Overflow));
        assert_eq!(o.push(Bytes::from_static(b"d")), Err(PushError::Closed));
        match o.next().await {
            Next::Close(frames, d) => {
                assert!(frames.is_empty(), "a slow consumer's backlog is dropped");
                assert_eq!(d, Disconnect::SLOW_CONSUMER);
            }
            Next::Write(_) => panic!("expected close"),
        }
    }

    #[tokio::test]
    async fn batches_everything_queued_and_flushes_before_a_drain_close() {
        let o = Outbox::new(10, 1000);
        for f in [&b"1"[..], b"2", b"3"] {
            o.push(Bytes::copy_from_slice(f)).unwrap();
        }
        assert!(matches!(o.next().await, Next::Write(f) if f.len() == 3));
        o.push(Bytes::from_static(b"4")).unwrap();
        o.close(Disconnect::SHUTDOWN, true);
        assert!(
            matches!(o.next().await, Next::Close(f, d) if f.len() == 1 && d == Disconnect::SHUTDOWN)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn coalesced_frames_keep_the_last_per_key_until_the_window_ends() {
        let o = Outbox::new(10, 1000);
        let w = Duration::from_millis(100);
        o.push_coalesced("f1", Bytes::from_static(b"1"), w).unwrap();
        o.push_coalesced("f2", Bytes::from_static(b"a"), w).unwrap();
        o.push_coalesced("f1", Bytes::from_static(b"2"), w).unwrap();
        let start = Instant::now();
        match o.next().await {
            Next::Write(f) => assert_eq!(f, [Bytes::from_static(b"2"), Bytes::from_static(b"a")]),
            Next::Close(..) => panic!("expected frames"),
        }
        assert_eq!(start.elapsed(), w, "held for exactly the window");
        // A zero window replaces a held frame of its key, else sends now.
        o.push_coalesced("f1", Bytes::from_static(b"3"), w).unwrap();
        o.push_coalesced("f1", Bytes::from_static(b"4"), Duration::ZERO)
            .unwrap();
        o.push_coalesced("f2", Bytes::from_static(b"b"), Duration::ZERO)
            .unwrap();
        match o.next().await {
            Next::Write(f) => assert_eq!(f, [Bytes::from_static(b"b")]),
            Next::Close(..) => panic!("expected frames"),
        }
        match o.next().await {
            Next::Write(f) => assert_eq!(f, [Bytes::from_static(b"4")]),
            Next::Close(..) => panic!("expected frames"),
        }
        o.push(Bytes::from_static(b"now")).unwrap();
        assert!(
            matches!(o.next().await, Next::Write(f) if f.len() == 1),
            "plain frames are not held"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_while_frames_are_held_wakes_the_writer_to_ask_when_they_are_due() {
        let o = Outbox::new(10, 1000);
        o.push_coalesced("k", Bytes::from_static(b"held"), Duration::from_secs(1))
            .unwrap();
        o.push(Bytes::from_static(b"now")).unwrap();
        o.changed().await;
        assert!(matches!(o.take_ready(), Ok(Next::Write(f)) if f.len() == 1));
        tokio::time::timeout(Duration::from_millis(1), o.changed())
            .await
            .expect("woken again");
        assert!(matches!(o.take_ready(), Err(Some(_))));
    }

    /// Direct sends fill a real socket until one comes back short or full;
    /// the rest queues, the writer (as a session's would: `try_write`, then
    /// `writable()`) finishes it, and the peer reads every byte in order.
    /// This also holds the claim of the module doc: a direct send that met a
    /// full socket does not leave the writer waiting on stale readiness.
    #[tokio::test]
    async fn direct_sends_stay_in_order_across_a_full_socket() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (server, client) =
            tokio::join!(listener.accept(), tokio::net::TcpStream::connect(addr));
        let socket = std::sync::Arc::new(server.unwrap().0);
        let mut client = client.unwrap();
        let o = Outbox::new(100_000, 1 << 30);
        o.attach_socket(socket.clone());

        // Distinct frames, so a reordering or a lost slice shows in the bytes.
        let frame = |i: u32| Bytes::from(format!("{i:08}").repeat(512));
        let mut expected = Vec::new();
        let mut i = 0;
        let queued = loop {
            assert!(i < 20_000, "the socket never filled ({i} frames)");
            let f = frame(i);
            expected.extend_from_slice(&f);
            o.push_shared(&f).unwrap();
            i += 1;
            if let Ok(Next::Write(frames)) = o.take_ready() {
                break frames;
            }
        };
        // More frames behind the queued ones take the queue, not the socket.
        for _ in 0..3 {
            let f = frame(i);
            expected.extend_from_slice(&f);
            o.push(f).unwrap();
            i += 1;
        }

        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = client.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&buf[..n]);
            }
        });
        let write_all = |frames: VecDeque<Bytes>| {
            let socket = socket.clone();
            async move {
                for f in frames {
                    let mut f = &f[..];
                    while !f.is_empty() {
                        match socket.try_write(f) {
                            Ok(n) => f = &f[n..],
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                socket.writable().await.unwrap()
                            }
                            Err(e) => panic!("write failed: {e}"),
                        }
                    }
                }
            }
        };
        let deadline = Duration::from_secs(10);
        tokio::time::timeout(deadline, write_all(queued))
            .await
            .expect("the writer was left waiting on a full socket");
        match o.take_ready() {
            Ok(Next::Write(frames)) => tokio::time::timeout(deadline, write_all(frames))
                .await
                .expect("second batch written"),
            _ => panic!("the frames pushed behind the queue were not queued"),
        }
        o.writer_done();
        // Idle again: this one goes straight to the socket.
        let f = frame(i);
        expected.extend_from_slice(&f);
        o.push_shared(&f).unwrap();
        assert!(o.take_ready().is_err(), "sent directly, nothing queued");

        o.detach_socket();
        std::sync::Arc::try_unwrap(socket)
            .expect("no other handle to the socket")
            .into_std()
            .unwrap()
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        let got = tokio::time::timeout(deadline, reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrived out of order");
    }

    /// A connected loopback pair: the outbox writes to `.0`, the test reads
    /// `.1`, a non-blocking std socket (tokio's `try_read` would answer from
    /// its cached readiness, not from the kernel).
    async fn socket_pair() -> (std::sync::Arc<tokio::net::TcpStream>, std::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (server, client) =
            tokio::join!(listener.accept(), tokio::net::TcpStream::connect(addr));
        let peer = client.unwrap().into_std().unwrap();
        peer.set_nonblocking(true).unwrap();
        (std::sync::Arc::new(server.unwrap().0), peer)
    }

    /// What the peer can read now without waiting. On loopback a `send(2)`
    /// has put its bytes in the peer's receive queue by the time it returns.
    fn readable_now(mut peer: &std::net::TcpStream) -> Vec<u8> {
        use std::io::Read as _;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match peer.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return got,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Whether the writer has been woken (a stored wake-up resolves at once).
    fn writer_woken(o: &Outbox) -> bool {
        let mut changed = std::pin::pin!(o.changed());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        changed.as_mut().poll(&mut cx).is_ready()
    }

    #[tokio::test]
    async fn deferred_frames_leave_with_the_next_push_in_one_write() {
        let (socket, peer) = socket_pair().await;
        let o = Outbox::new(100, 1 << 20);
        o.attach_socket(socket);

        assert_eq!(o.push_deferred(&Bytes::from_static(b"a")), Ok(true));
        assert_eq!(
            o.push_deferred(&Bytes::from_static(b"b")),
            Ok(false),
            "one flush covers every deferred frame"
        );
        assert!(readable_now(&peer).is_empty(), "deferred frames wait");
        assert!(!writer_woken(&o), "the writer is not woken for them");

        o.push_shared(&Bytes::from_static(b"c")).unwrap();
        assert_eq!(
            readable_now(&peer),
            b"abc",
            "sent with the next push, in order"
        );
        assert!(o.take_ready().is_err(), "nothing left queued");
        o.flush_deferred();
        assert!(
            readable_now(&peer).is_empty(),
            "a flush after that sends nothing"
        );

        // Deferred frames whose room sent nothing more go out on the flush.
        o.push_deferred(&Bytes::from_static(b"d")).unwrap();
        o.push_deferred(&Bytes::from_static(b"e")).unwrap();
        o.flush_deferred();
        assert_eq!(readable_now(&peer), b"de");
        assert!(o.take_ready().is_err());
        assert!(!writer_woken(&o));
    }

    #[tokio::test]
    async fn deferring_while_the_writer_is_busy_queues_for_the_writer() {
        let (socket, peer) = socket_pair().await;
        let o = Outbox::new(100, 1 << 20);
        o.attach_socket(socket);
        o.push_deferred(&Bytes::from_static(b"1")).unwrap();
        // The writer takes the deferred frame (woken by something else)...
        assert!(matches!(o.take_ready(), Ok(Next::Write(f)) if f.len() == 1));
        // ...so later frames are its to write, not a flush's.
        assert_eq!(o.push_deferred(&Bytes::from_static(b"2")), Ok(false));
        assert!(writer_woken(&o), "the busy writer is told there is more");
        o.flush_deferred();
        assert!(
            readable_now(&peer).is_empty(),
            "no write behind the writer's back"
        );
        o.writer_done();
        assert!(matches!(o.take_ready(), Ok(Next::Write(f)) if f == [Bytes::from_static(b"2")]));
    }

    #[tokio::test]
    async fn deferred_frames_without_a_socket_go_to_the_writer() {
        let o = Outbox::new(100, 1 << 20);
        assert_eq!(o.push_deferred(&Bytes::from_static(b"x")), Ok(false));
        assert!(writer_woken(&o));
        assert!(matches!(o.take_ready(), Ok(Next::Write(f)) if f.len() == 1));
    }

    #[tokio::test]
    async fn a_session_detached_with_deferred_frames_wakes_its_writer() {
        let (socket, _peer) = socket_pair().await;
        let o = Outbox::new(100, 1 << 20);
        o.attach_socket(socket);
        o.push_deferred(&Bytes::from_static(b"x")).unwrap();
        o.detach_socket();
        assert!(writer_woken(&o));
        assert!(matches!(o.take_ready(), Ok(Next::Write(f)) if f.len() == 1));
    }

    /// While a [`DirectSend`] is out (no lock held), later frames queue
    /// behind it, nothing else writes (neither another push nor the writer,
    /// not even for a close), and what it did not send goes out first.
    #[tokio::test]
    async fn frames_pushed_during_a_direct_send_follow_its_unsent_rest() {
        let (socket, peer) = socket_pair().await;
        let o = Outbox::new(100, 1 << 20);
        o.attach_socket(socket);
        let first = Bytes::from_static(b"first");
        let Shared::Direct(send) = o.begin_shared(&first) else {
            panic!("an idle outbox with a socket sends directly");
        };
        let Shared::Done(queued) = o.begin_shared(&Bytes::from_static(b"+second")) else {
            panic!("a second direct send while one is out");
        };
        queued.unwrap();
        o.push_deferred(&Bytes::from_static(b"+third")).unwrap();
        o.push_shared(&Bytes::from_static(b"+fourth")).unwrap();
        assert!(readable_now(&peer).is_empty(), "nothing overtakes the send");
        assert!(writer_woken(&o), "the writer is told frames wait");
        o.close(Disconnect::SHUTDOWN, true);
        assert!(o.take_ready().is_err(), "the writer waits for the send");

        // The socket took two bytes of the frame.
        assert_eq!(send.send_now(&first[..2]).unwrap(), 2);
        send.finish(&first, Ok(2));
        assert_eq!(readable_now(&peer), b"fi");
        assert!(writer_woken(&o), "the send's end wakes the writer");
        match o.take_ready() {
            Ok(Next::Close(frames, Disconnect::SHUTDOWN)) => assert_eq!(
                frames
                    .iter()
                    .flat_map(|f| f.iter().copied())
                    .collect::<Vec<u8>>(),
                b"rst+second+third+fourth"
            ),
            _ => panic!("expected the drain close with every frame"),
        }
    }

    /// A send dropped before its end (a panicking fan-out) must neither leave
    /// the writer waiting for it forever nor let later frames follow a frame
    /// that may not have gone out.
    #[tokio::test]
    async fn a_direct_send_dropped_unfinished_closes_its_session_for_a_resume() {
        let (socket, peer) = socket_pair().await;
        let o = Outbox::new(100, 1 << 20);
        o.attach_socket(socket);
        let Shared::Direct(send) = o.begin_shared(&Bytes::from_static(b"lost?")) else {
            panic!("an idle outbox with a socket sends directly");
        };
        o.push_shared(&Bytes::from_static(b"later")).unwrap();
        drop(send);
        assert!(writer_woken(&o));
        match o.take_ready() {
            Ok(Next::Close(frames, Disconnect::INTERNAL)) => {
                assert!(frames.is_empty(), "nothing follows the unknown frame")
            }
            _ => panic!("expected an internal-error close"),
        }
        assert!(readable_now(&peer).is_empty());
    }

    #[tokio::test]
    async fn byte_budget_counts_too() {
        let o = Outbox::new(100, 10);
        o.push(Bytes::from_static(b"123456")).unwrap();
        assert_eq!(
            o.push(Bytes::from_static(b"123456")),
            Err(PushError::Overflow)
        );
    }
}
