//! A shard's budget of memory for request frames: what bounds the memory the broker holds
//! for requests however many clients send at once.
//!
//! Without it, the memory a shard held for requests grew with its connections: each
//! connection reads its next frame (a produce request of up to `request_bytes_max`, 8 MiB by
//! default in the Rust client) while the one before waits for room in the write buffers, and
//! the frame stays alive until its response is ready. 200 producers (400 connections) writing
//! 1000-byte records flat out into 16 partitions drove a broker process to 3.5 GB resident
//! (`/proc/PID/status` VmHWM, tail caches at their 512 MiB bound), against 0.75 GB for one
//! producer. Kafka bounds the same thing with `queued.max.requests`, Redpanda with a
//! per-shard memory semaphore for requests.
//!
//! A frame longer than a connection's read chunk (16 KiB, what every connection may hold
//! anyway) takes its length from this budget before its memory is allocated, and gives it
//! back when its response is ready (a produce's bytes are then in the tail cache, which has
//! a bound of its own, or freed). A connection that has to wait stops reading: its client
//! sees TCP back-pressure, the broker's memory stays put. Small frames (fetches, heartbeats,
//! metadata, small produces) never wait, so consumers are served while producers queue.
//!
//! Waiters are served in arrival order, and a waiter at the head holds back the ones behind
//! it even when they would fit (glommio's `Semaphore` lets a small request pass a large one,
//! which can starve the large one for as long as small ones keep coming). A frame longer than
//! the whole budget takes all of it, once everything before it is given back.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

type WakerSlot = Rc<RefCell<Option<Waker>>>;

/// The budget of one shard (see the module docs).
#[derive(Debug)]
pub struct RequestMemory {
    state: RefCell<State>,
}

#[derive(Debug)]
struct State {
    capacity: usize,
    available: usize,
    /// Acquisitions waiting, oldest first: (ticket, the waker of its latest poll, in a slot
    /// the acquisition shares, so a poll updates it without searching the queue).
    queue: VecDeque<(u64, WakerSlot)>,
    next_ticket: u64,
    /// Acquisitions that had to wait, since start.
    waits: u64,
}

impl State {
    /// Wakes the acquisition at the head of the queue, if any (it takes what it needs on its
    /// next poll, or waits again).
    fn wake_head(&mut self) {
        if let Some((_, slot)) = self.queue.front() {
            if let Some(waker) = slot.borrow_mut().take() {
                waker.wake();
            }
        }
    }
}

impl RequestMemory {
    pub fn new(capacity: usize) -> Rc<RequestMemory> {
        let capacity = capacity.max(1);
        Rc::new(RequestMemory {
            state: RefCell::new(State {
                capacity,
                available: capacity,
                queue: VecDeque::new(),
                next_ticket: 0,
                waits: 0,
            }),
        })
    }

    /// `bytes` of the budget (all of it if `bytes` is more), once every acquisition that came
    /// earlier got its share. Given back when the [`Grant`] is dropped.
    pub fn acquire(self: &Rc<Self>, bytes: usize) -> Acquire {
        let bytes = bytes.min(self.state.borrow().capacity);
        Acquire { memory: self.clone(), bytes, ticket: None, slot: Rc::new(RefCell::new(None)) }
    }

    /// Bytes granted and not yet given back.
    pub fn in_use(&self) -> usize {
        let state = self.state.borrow();
        state.capacity - state.available
    }

    pub fn capacity(&self) -> usize {
        self.state.borrow().capacity
    }

    /// How many acquisitions had to wait, since start.
    pub fn waits(&self) -> u64 {
        self.state.borrow().waits
    }

    /// Acquisitions waiting now.
    pub fn waiting(&self) -> usize {
        self.state.borrow().queue.len()
    }
}

/// A share of the budget, given back on drop.
#[derive(Debug)]
pub struct Grant {
    memory: Rc<RequestMemory>,
    bytes: usize,
}

impl Grant {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        let mut state = self.memory.state.borrow_mut();
        state.available += self.bytes;
        state.wake_head();
    }
}

/// The future of [`RequestMemory::acquire`].
#[derive(Debug)]
pub struct Acquire {
    memory: Rc<RequestMemory>,
    bytes: usize,
    /// Its place in the queue once it had to wait.
    ticket: Option<u64>,
    slot: WakerSlot,
}

impl Future for Acquire {
    type Output = Grant;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Grant> {
        let this = &mut *self;
        let mut state = this.memory.state.borrow_mut();
        let first = match this.ticket {
            None => state.queue.is_empty(),
            Some(ticket) => state.queue.front().is_some_and(|(head, _)| *head == ticket),
        };
        if first && state.available >= this.bytes {
            state.available -= this.bytes;
            if this.ticket.take().is_some() {
                state.queue.pop_front();
                // The next one may fit in what is left.
                state.wake_head();
            }
            drop(state);
            return Poll::Ready(Grant { memory: this.memory.clone(), bytes: this.bytes });
        }
        *this.slot.borrow_mut() = Some(cx.waker().clone());
        if this.ticket.is_none() {
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.waits += 1;
            state.queue.push_back((ticket, this.slot.clone()));
            this.ticket = Some(ticket);
        }
        Poll::Pending
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        // Given up while waiting (the connection ended): leave the queue, and let the next one
        // try if this one was holding it back.
        if let Some(ticket) = self.ticket.take() {
            let mut state = self.memory.state.borrow_mut();
            let was_head = state.queue.front().is_some_and(|(head, _)| *head == ticket);
            state.queue.retain(|(t, _)| *t != ticket);
            if was_head {
                state.wake_head();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::cell::RefCell;

    fn run<F: Future<Output = ()> + 'static>(make: impl FnOnce() -> F + Send + 'static) {
        glommio::LocalExecutorBuilder::default().spawn(make).unwrap().join().unwrap();
    }

    #[test]
    fn grants_up_to_the_capacity_and_gives_back_on_drop() {
        run(|| async {
            let memory = RequestMemory::new(100);
            let a = memory.acquire(60).await;
            assert_eq!(memory.in_use(), 60);
            let b = memory.acquire(40).await;
            assert_eq!(memory.in_use(), 100);
            assert!(memory.acquire(1).now_or_never().is_none(), "nothing is left");
            drop(a);
            assert_eq!(memory.in_use(), 40);
            drop(b);
            assert_eq!(memory.in_use(), 0);
            assert_eq!(memory.waits(), 1);
            assert_eq!(memory.waiting(), 0, "a given-up acquisition leaves the queue");
        });
    }

    #[test]
    fn waiters_are_served_in_order_and_a_large_one_is_not_passed() {
        run(|| async {
            let memory = RequestMemory::new(100);
            let held = memory.acquire(90).await;
            let order = Rc::new(RefCell::new(Vec::new()));
            // A large waiter first, then small ones that would fit in what is left now.
            let mut tasks = Vec::new();
            for (name, bytes) in [("large", 80), ("small-1", 5), ("small-2", 5)] {
                let memory = memory.clone();
                let order = order.clone();
                tasks.push(glommio::spawn_local(async move {
                    let grant = memory.acquire(bytes).await;
                    order.borrow_mut().push(name);
                    glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
                    drop(grant);
                }));
                glommio::yield_if_needed().await;
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert!(
                order.borrow().is_empty(),
                "the small ones wait behind the large one: {:?}",
                order.borrow()
            );
            assert_eq!(memory.waiting(), 3);
            drop(held);
            for task in tasks {
                task.await;
            }
            assert_eq!(*order.borrow(), ["large", "small-1", "small-2"]);
            assert_eq!(memory.in_use(), 0);
        });
    }

    #[test]
    fn more_than_the_capacity_takes_all_of_it() {
        run(|| async {
            let memory = RequestMemory::new(100);
            let small = memory.acquire(10).await;
            let mut huge = Box::pin(memory.acquire(1 << 30));
            assert!((&mut huge).now_or_never().is_none(), "it waits for everything to be given back");
            drop(small);
            let grant = huge.await;
            assert_eq!(grant.bytes(), 100);
            assert_eq!(memory.in_use(), 100);
        });
    }

    #[test]
    fn a_waiter_given_up_at_the_head_lets_the_next_one_through() {
        run(|| async {
            let memory = RequestMemory::new(100);
            let held = memory.acquire(50).await;
            let mut large = Box::pin(memory.acquire(100));
            assert!((&mut large).now_or_never().is_none());
            let small = {
                let memory = memory.clone();
                glommio::spawn_local(async move { memory.acquire(30).await.bytes() })
            };
            glommio::timer::sleep(std::time::Duration::from_millis(2)).await;
            assert_eq!(memory.waiting(), 2, "the small one waits behind the large one");
            drop(large);
            assert_eq!(small.await, 30, "the small one goes once the large one left the queue");
            assert_eq!(memory.waiting(), 0);
            drop(held);
            assert_eq!(memory.in_use(), 0);
        });
    }
}
