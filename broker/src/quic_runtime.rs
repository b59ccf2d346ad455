//! QUIC on every shard, part 2: quinn driven by a shard's own glommio executor
//! (DESIGN-CLUSTER.md §8, "Driver").
//!
//! [`ShardRuntime`] is a `quinn::Runtime` whose tasks, timers and UDP socket live on the shard
//! (thread) that created the endpoint:
//! * **tasks**: `spawn` puts quinn's endpoint and connection drivers on the current glommio
//!   executor, in a task queue of their own (`quic-drivers`, made on first use), so a driver
//!   woken by a datagram runs at the next task boundary rather than behind every request
//!   task queued on the shard's queue;
//! * **timers**: glommio timers;
//! * **datagrams**: quinn-udp's `UdpSocketState` on the nonblocking socket (`sendmsg` with GSO
//!   segments, `recvmsg` with GRO where the kernel offers them), so a call moves a batch of
//!   datagrams. When the socket has nothing to read, the shard waits for the next datagram
//!   with one io_uring `recvmsg(MSG_PEEK)` of one byte on a duplicate of the descriptor (the
//!   datagram stays queued; the next `recv` takes it with the rest of the batch). When the
//!   send buffer is full, the shard retries after a short timer.
//!
//! # Why the `unsafe impl Send`
//! quinn asks for `Send + Sync` runtimes, timers and sockets because its other runtimes are
//! multi-threaded; glommio's timers and sockets are bound to their executor's thread. Every
//! value here that holds one is wrapped in [`ShardLocal`], which records the thread that made
//! it and asserts, on every use, that it is used on that thread (a use from another thread
//! is a panic, never a data race), and that leaks, rather than drops, a value dropped
//! elsewhere. The broker never moves a shard's quinn objects to another thread.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::mem::ManuallyDrop;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, UdpPoller};

/// How long a shard waits before it retries a send that found the socket's buffer full.
const SEND_RETRY: Duration = Duration::from_micros(200);

/// A value that may only be used on the thread that made it (see the module docs).
pub struct ShardLocal<T> {
    owner: ThreadId,
    value: ManuallyDrop<T>,
}

// SAFETY: the value is only reached through `get`, which panics on any thread but the owner's,
// and is only dropped on the owner's thread (elsewhere it is leaked), so it is never touched by
// two threads.
unsafe impl<T> Send for ShardLocal<T> {}
// SAFETY: as above: shared references from other threads cannot reach the value.
unsafe impl<T> Sync for ShardLocal<T> {}

impl<T> ShardLocal<T> {
    pub fn new(value: T) -> ShardLocal<T> {
        ShardLocal { owner: thread::current().id(), value: ManuallyDrop::new(value) }
    }

    pub fn get(&self) -> &T {
        assert_eq!(thread::current().id(), self.owner, "a shard's QUIC state used on another thread");
        &self.value
    }

    fn get_mut(&mut self) -> &mut T {
        assert_eq!(thread::current().id(), self.owner, "a shard's QUIC state used on another thread");
        &mut self.value
    }
}

impl<T> Drop for ShardLocal<T> {
    fn drop(&mut self) {
        if thread::current().id() == self.owner {
            // SAFETY: dropped once, here, on the owner's thread.
            unsafe { ManuallyDrop::drop(&mut self.value) }
        }
    }
}

impl<T> fmt::Debug for ShardLocal<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardLocal").field("owner", &self.owner).finish_non_exhaustive()
    }
}

thread_local! {
    static DRIVER_QUEUE: Cell<Option<glommio::TaskQueueHandle>> = const { Cell::new(None) };
}

/// The task queue of this executor's quinn drivers, made on first use: its own queue, so a
/// driver woken by a datagram runs at the next task boundary instead of behind every request
/// task queued before it on the shard's queue. Why it matters: a one-shard QUIC produce here
/// kept the CPUs only 70 % busy, and lifting the client's congestion window and pacing raised
/// it by a third, so acknowledgements held back by the shard's other work slow the client.
/// Measured with this queue: +6 % on one shard, no change beyond the noise on two.
fn driver_queue() -> glommio::TaskQueueHandle {
    DRIVER_QUEUE.with(|queue| {
        queue.get().unwrap_or_else(|| {
            let made = glommio::executor().create_task_queue(
                glommio::Shares::Static(1000),
                glommio::Latency::Matters(Duration::from_micros(100)),
                "quic-drivers",
            );
            queue.set(Some(made));
            made
        })
    })
}

/// quinn's runtime on the current shard's glommio executor.
#[derive(Debug, Default)]
pub struct ShardRuntime;

impl Runtime for ShardRuntime {
    fn new_timer(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(ShardTimer { deadline, sleep: ShardLocal::new(RefCell::new(None)) })
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        match glommio::spawn_local_into(future, driver_queue()) {
            Ok(task) => {
                task.detach();
            }
            Err(error) => panic!("spawning a QUIC driver on its task queue: {error}"),
        }
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(ShardUdpSocket::new(socket)?))
    }
}

type LocalSleep = Pin<Box<dyn Future<Output = ()>>>;
type LocalWait = Pin<Box<dyn Future<Output = io::Result<()>>>>;

fn sleep_until(deadline: Instant) -> LocalSleep {
    Box::pin(glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())))
}

struct ShardTimer {
    deadline: Instant,
    sleep: ShardLocal<RefCell<Option<LocalSleep>>>,
}

impl fmt::Debug for ShardTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardTimer").field("deadline", &self.deadline).finish()
    }
}

impl AsyncTimer for ShardTimer {
    fn reset(mut self: Pin<&mut Self>, deadline: Instant) {
        self.deadline = deadline;
        *self.sleep.get_mut().get_mut() = None;
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        let mut sleep = self.sleep.get().borrow_mut();
        sleep.get_or_insert_with(|| sleep_until(self.deadline)).as_mut().poll(cx)
    }
}

/// One shard's UDP socket: quinn-udp on the nonblocking descriptor, glommio for the waits.
struct ShardUdpSocket {
    io: std::net::UdpSocket,
    state: UdpSocketState,
    waits: ShardLocal<Waits>,
}

struct Waits {
    /// The same socket (a duplicate descriptor) for glommio's `recvmsg(MSG_PEEK)`.
    peeker: Rc<glommio::net::UdpSocket>,
    readable: RefCell<Option<LocalWait>>,
    /// A send found the buffer full: writers wait for the retry timer.
    send_blocked: Cell<bool>,
}

impl fmt::Debug for ShardUdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardUdpSocket").field("local", &self.io.local_addr().ok()).finish()
    }
}

impl ShardUdpSocket {
    fn new(io: std::net::UdpSocket) -> io::Result<ShardUdpSocket> {
        io.set_nonblocking(true)?;
        let state = UdpSocketState::new((&io).into())?;
        // SAFETY: dup returns a new descriptor that the glommio socket then owns.
        let duplicate = unsafe { libc::dup(io.as_raw_fd()) };
        if duplicate < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a valid descriptor of a UDP socket, owned from here on.
        let peeker = Rc::new(unsafe { glommio::net::UdpSocket::from_raw_fd(duplicate) });
        let waits = Waits { peeker, readable: RefCell::new(None), send_blocked: Cell::new(false) };
        Ok(ShardUdpSocket { io, state, waits: ShardLocal::new(waits) })
    }
}

impl AsyncUdpSocket for ShardUdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(ShardPoller { socket: self, retry: ShardLocal::new(RefCell::new(None)) })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let result = self.state.send((&self.io).into(), transmit);
        if matches!(&result, Err(error) if error.kind() == io::ErrorKind::WouldBlock) {
            self.waits.get().send_blocked.set(true);
        }
        result
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let waits = self.waits.get();
        loop {
            match self.state.recv((&self.io).into(), bufs, meta) {
                Ok(count) => return Poll::Ready(Ok(count)),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
            let mut readable = waits.readable.borrow_mut();
            let wait = readable.get_or_insert_with(|| {
                let peeker = waits.peeker.clone();
                Box::pin(async move {
                    let mut byte = [0u8; 1];
                    peeker.peek_from(&mut byte).await.map(|_| ()).map_err(io::Error::from)
                })
            });
            match wait.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(result) => {
                    *readable = None;
                    // A peek that failed (say, an ICMP error queued on the socket) says nothing
                    // about the next datagram: try the read again, which reports it.
                    if let Err(error) = result {
                        tracing::trace!(%error, "QUIC socket wait");
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

struct ShardPoller {
    socket: Arc<ShardUdpSocket>,
    retry: ShardLocal<RefCell<Option<LocalSleep>>>,
}

impl fmt::Debug for ShardPoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardPoller").finish_non_exhaustive()
    }
}

impl UdpPoller for ShardPoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let waits = self.socket.waits.get();
        if !waits.send_blocked.get() {
            return Poll::Ready(Ok(()));
        }
        let mut retry = self.retry.get().borrow_mut();
        let sleep = retry.get_or_insert_with(|| sleep_until(Instant::now() + SEND_RETRY));
        match sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                *retry = None;
                waits.send_blocked.set(false);
                Poll::Ready(Ok(()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::LocalExecutorBuilder;

    #[test]
    fn shard_local_values_refuse_other_threads_and_are_leaked_there() {
        let local = Arc::new(ShardLocal::new(5u32));
        assert_eq!(*local.get(), 5);
        let elsewhere = local.clone();
        let outcome = thread::spawn(move || std::panic::catch_unwind(|| *elsewhere.get())).join().unwrap();
        assert!(outcome.is_err(), "another thread may not read it");
        let dropped = Rc::new(());
        let held = ShardLocal::new(dropped.clone());
        thread::spawn(move || drop(held)).join().unwrap();
        assert_eq!(Rc::strong_count(&dropped), 2, "leaked, never dropped on the wrong thread");
    }

    /// A QUIC connection between two glommio executors, each endpoint on its own shard runtime:
    /// 8 MiB up one stream, its length and CRC back.
    #[test]
    fn a_stream_round_trips_between_endpoints_on_two_shard_runtimes() {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = certified.cert.der().clone();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
        let server_config = quinn::ServerConfig::with_single_cert(vec![cert.clone()], key.into()).unwrap();
        let server_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = server_socket.local_addr().unwrap();
        let limit = Duration::from_secs(60);
        let server = LocalExecutorBuilder::default()
            .spawn(move || async move {
                glommio::timer::timeout(limit, async move {
                    let endpoint = quinn::Endpoint::new(
                        quinn::EndpointConfig::default(),
                        Some(server_config),
                        server_socket,
                        Arc::new(ShardRuntime),
                    )
                    .unwrap();
                    let connection = endpoint.accept().await.expect("an incoming connection").await.unwrap();
                    let (mut send, mut recv) = connection.accept_bi().await.unwrap();
                    let data = recv.read_to_end(64 << 20).await.expect("the whole stream");
                    let mut answer = (data.len() as u64).to_le_bytes().to_vec();
                    answer.extend(crc32c::crc32c(&data).to_le_bytes());
                    send.write_all(&answer).await.unwrap();
                    send.finish().unwrap();
                    connection.closed().await;
                    Ok(data.len())
                })
                .await
            })
            .unwrap();
        let client = LocalExecutorBuilder::default()
            .spawn(move || async move {
                glommio::timer::timeout(limit, async move {
                    let mut roots = rustls::RootCertStore::empty();
                    roots.add(cert).unwrap();
                    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    let mut endpoint = quinn::Endpoint::new(
                        quinn::EndpointConfig::default(),
                        None,
                        socket,
                        Arc::new(ShardRuntime),
                    )
                    .unwrap();
                    endpoint.set_default_client_config(
                        quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap(),
                    );
                    let connection = endpoint.connect(address, "localhost").unwrap().await.unwrap();
                    let (mut send, mut recv) = connection.open_bi().await.unwrap();
                    let payload: Vec<u8> =
                        (0..8u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
                    send.write_all(&payload).await.unwrap();
                    send.finish().unwrap();
                    let answer = recv.read_to_end(64).await.expect("the answer");
                    connection.close(0u32.into(), b"done");
                    endpoint.wait_idle().await;
                    Ok((answer, payload.len(), crc32c::crc32c(&payload)))
                })
                .await
            })
            .unwrap();
        let (answer, sent, crc) = client.join().unwrap().expect("the client finished in time");
        assert_eq!(server.join().unwrap().expect("the server finished in time"), sent);
        assert_eq!(answer.len(), 12);
        assert_eq!(u64::from_le_bytes(answer[..8].try_into().unwrap()), sent as u64);
        assert_eq!(u32::from_le_bytes(answer[8..].try_into().unwrap()), crc, "the bytes arrived intact");
    }
}
