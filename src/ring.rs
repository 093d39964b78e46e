//! What the `uring` server model and the load generator's io_uring engine
//! share: how a ring is set up and waited on, and the provided-buffer ring
//! (Linux 5.19+).
//!
//! One thread submits and reaps each ring, so it is set up with
//! `SINGLE_ISSUER | DEFER_TASKRUN`: the kernel runs completion work only
//! when that thread asks for completions, with no interrupt to deliver it.
//! Measured on the uring model, the same code cost 5.1 us of CPU per
//! message without those flags and 3.5 with them.
//!
//! Instead of giving each pending receive a buffer of its own, the program
//! hands the kernel a ring of equal blocks; a multishot receive takes one
//! when data actually arrives and reports which (`cqueue::buffer_select`).
//! So a connection that waits holds no memory, and one `RecvMulti` serves a
//! connection for its whole life. The program gives a block back
//! ([`BufRing::give_back`]) once it is done with the bytes in it.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, types};

/// A ring of `entries` for one thread (see the module's docs); on kernels
/// before 6.1, without DEFER_TASKRUN.
pub fn new_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        .or_else(|_| IoUring::builder().setup_coop_taskrun().build(entries))
}

/// An operation's user data: what kind of operation it is (the caller's
/// numbering) and which connection or listener it is for.
pub fn user_data(kind: u64, index: usize) -> u64 {
    (kind << 56) | index as u64
}

/// The kind and index that [`user_data`] packed.
pub fn split(data: u64) -> (u64, usize) {
    (data >> 56, (data & 0xFFFF_FFFF) as usize)
}

/// A completion as the loops keep it: user data, result, flags.
pub type Completion = (u64, i32, u32);

/// `io_uring_enter`'s flag to run deferred completion work.
const ENTER_GETEVENTS: u32 = 1;

/// Submits what is queued, waits until a completion arrives or `until`,
/// and copies every completion into `done` (cleared first; copied out
/// because handling one may submit more).
///
/// With `spin`, it first polls without sleeping for up to that long. A
/// loop that sleeps after every round pays a wake-up per round, and with
/// few busy connections rounds are small: the uring model with 10
/// request/response clients measured 231-269k msg/s sleeping and 276-286k
/// polling for 20 us first (no change beyond noise at 50 or 1,000 clients).
/// The caller spins only after a round that had work, so an idle loop
/// sleeps; at 1,000 requests/s on one connection the server's CPU went
/// from 0.01 to 0.03 cores.
pub fn submit_and_wait(
    ring: &mut IoUring,
    until: Instant,
    spin: Duration,
    done: &mut Vec<Completion>,
) -> io::Result<()> {
    if !spin.is_zero() {
        let stop = (Instant::now() + spin).min(until);
        loop {
            let queued = ring.submission().len() as u32;
            // SAFETY: no extended argument is passed.
            let polled = unsafe {
                ring.submitter()
                    .enter::<libc::sigset_t>(queued, 0, ENTER_GETEVENTS, None)
            };
            if polled.is_err() || !ring.completion().is_empty() || Instant::now() >= stop {
                break;
            }
        }
        if !ring.completion().is_empty() {
            collect(ring, done);
            return Ok(());
        }
    }
    let left = until.saturating_duration_since(Instant::now());
    let ts = types::Timespec::new()
        .sec(left.as_secs())
        .nsec(left.subsec_nanos());
    let args = types::SubmitArgs::new().timespec(&ts);
    match ring.submitter().submit_with_args(1, &args) {
        Ok(_) => {}
        // Timed out, interrupted, or completions to reap first.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY)
            ) => {}
        Err(e) => return Err(e),
    }
    collect(ring, done);
    Ok(())
}

fn collect(ring: &mut IoUring, done: &mut Vec<Completion>) {
    done.clear();
    done.extend(
        ring.completion()
            .map(|c| (c.user_data(), c.result(), c.flags())),
    );
}

pub struct BufRing {
    entries: *mut types::BufRingEntry,
    layout: std::alloc::Layout,
    blocks: Vec<u8>,
    count: u16,
    block: usize,
    tail: u16,
}

impl BufRing {
    /// Registers `count` blocks of `block` bytes as buffer group `group`.
    /// `count` must be a power of two (at most 32768).
    ///
    /// The ring must be dropped before the `BufRing` (declare it first in
    /// a struct): the kernel may use the memory while the ring is alive.
    pub fn new(ring: &IoUring, count: u16, block: usize, group: u16) -> io::Result<Self> {
        if !count.is_power_of_two() || count > 1 << 15 {
            return Err(io::Error::other("buffer ring size must be a power of two"));
        }
        let layout = std::alloc::Layout::from_size_align(
            count as usize * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let entries = unsafe { std::alloc::alloc_zeroed(layout) } as *mut types::BufRingEntry;
        if entries.is_null() {
            return Err(io::Error::other("out of memory for the buffer ring"));
        }
        let mut r = BufRing {
            entries,
            layout,
            blocks: vec![0u8; count as usize * block],
            count,
            block,
            tail: 0,
        };
        // SAFETY: `entries` is a page-aligned, zeroed ring of `count`
        // entries that lives as long as the registration (see Drop).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, group, 0)?;
        }
        for bid in 0..count {
            r.give_back(bid);
        }
        Ok(r)
    }

    pub fn block_size(&self) -> usize {
        self.block
    }

    /// Returns block `bid` to the kernel.
    pub fn give_back(&mut self, bid: u16) {
        let i = (self.tail & (self.count - 1)) as usize;
        // SAFETY: i < count; the kernel reads entries up to the published
        // tail only, and this one is past it until the store below.
        unsafe {
            let e = &mut *self.entries.add(i);
            e.set_addr(self.blocks.as_ptr().add(bid as usize * self.block) as u64);
            e.set_len(self.block as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The first `len` bytes of block `bid`.
    pub fn block(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = bid as usize * self.block;
        &mut self.blocks[start..start + len.min(self.block)]
    }

    /// Bytes `from..to` of block `bid`, for a send in flight.
    pub fn range(&self, bid: u16, from: usize, to: usize) -> &[u8] {
        let start = bid as usize * self.block;
        &self.blocks[start + from..start + to]
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the ring that used
        // it is gone (see `new`).
        unsafe { std::alloc::dealloc(self.entries as *mut u8, self.layout) };
    }
}

/// Whether this kernel has io_uring with provided-buffer rings.
pub fn available() -> bool {
    IoUring::new(8).is_ok_and(|r| BufRing::new(&r, 8, 4096, 0).is_ok())
}
