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
//! ([`Ring::give_back`]) once it is done with the bytes in it.
//!
//! Sound by construction: the kernel writes into a block only while it is
//! in the kernel's ring, so nothing reachable from safe code may touch a
//! block the kernel owns, free the blocks while the kernel may write, or
//! hand a block to the kernel twice:
//! - a block the program owns is a [`Block`], a token that only a real
//!   completion creates and only [`Ring::give_back`] consumes (it is
//!   neither `Copy` nor `Clone`, and names its ring); the bytes are reached
//!   through the token;
//! - the ring and its blocks are one value, [`Ring`], whose teardown
//!   cancels every operation and waits for them to stop, unregisters the
//!   blocks, closes the ring, and only then frees the memory; where the
//!   kernel cannot confirm that nothing is in flight, it leaks the blocks
//!   rather than free memory the kernel may still write.

use std::io;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, squeue, types};

/// The bits of user data below the kind: the index.
const INDEX_BITS: u32 = 56;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;

/// An operation's user data: what kind of operation it is (the caller's
/// numbering, below 256) and which connection or listener it is for. The
/// index must fit in [`INDEX_BITS`]; one that does not would name another
/// connection, so it is refused loudly rather than wrapped.
pub fn user_data(kind: u64, index: usize) -> u64 {
    assert!(kind < 1 << (64 - INDEX_BITS), "kind {kind} does not fit");
    assert!(index as u64 <= INDEX_MASK, "index {index} does not fit");
    (kind << INDEX_BITS) | index as u64
}

/// The kind and index that [`user_data`] packed: the same mask both ways.
pub fn split(data: u64) -> (u64, usize) {
    (data >> INDEX_BITS, (data & INDEX_MASK) as usize)
}

/// A completion as the loops keep it.
#[derive(Debug)]
pub struct Completion {
    pub data: u64,
    pub res: i32,
    pub flags: u32,
    /// The block the kernel filled, now the program's: give it back.
    pub block: Option<Block>,
}

/// A block of the buffer ring that the program owns (the kernel filled it
/// and reported it). Move-only: giving it back consumes it.
#[derive(Debug)]
pub struct Block {
    bid: u16,
    ring: u64,
}

/// `io_uring_enter`'s flag to run deferred completion work.
const ENTER_GETEVENTS: u32 = 1;

/// How long a teardown waits for cancelled operations to stop.
const TEARDOWN: Duration = Duration::from_secs(1);

/// An io_uring for one thread, with an optional ring of provided blocks.
pub struct Ring {
    ring: ManuallyDrop<IoUring>,
    bufs: Option<BufRing>,
    id: u64,
}

impl Ring {
    /// A ring of `entries` for one thread (see the module's docs); on
    /// kernels before 6.1, without DEFER_TASKRUN.
    pub fn new(entries: u32) -> io::Result<Ring> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_coop_taskrun().build(entries))?;
        Ok(Ring {
            ring: ManuallyDrop::new(ring),
            bufs: None,
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// A ring with `count` blocks of `block` bytes registered as buffer
    /// group `group`. `count` must be a power of two (at most 32768).
    pub fn with_buffers(entries: u32, count: u16, block: usize, group: u16) -> io::Result<Ring> {
        let mut r = Ring::new(entries)?;
        r.bufs = Some(BufRing::new(&r.ring, count, block, group)?);
        Ok(r)
    }

    /// Queues an operation.
    ///
    /// # Safety
    /// Every buffer `e` points to must stay valid (and, for a send,
    /// unchanged) until the operation's last completion arrives or the
    /// ring is dropped, whichever comes first.
    pub unsafe fn push(&mut self, e: &squeue::Entry) -> Result<(), squeue::PushError> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.ring.submission().push(e) }
    }

    /// Hands the queued operations to the kernel.
    pub fn submit(&mut self) -> io::Result<usize> {
        self.ring.submit()
    }

    pub fn submitter(&self) -> io_uring::Submitter<'_> {
        self.ring.submitter()
    }

    /// Submits what is queued, waits until a completion arrives or `until`,
    /// and moves every completion into `done` (cleared first; moved out
    /// because handling one may submit more).
    ///
    /// With `spin`, it first polls without sleeping for up to that long. A
    /// loop that sleeps after every round pays a wake-up per round, and
    /// with few busy connections rounds are small: the uring model with 10
    /// request/response clients measured 231-269k msg/s sleeping and
    /// 276-286k polling for 20 us first (no change beyond noise at 50 or
    /// 1,000 clients). The caller spins only after a round that had work,
    /// so an idle loop sleeps; at 1,000 requests/s on one connection the
    /// server's CPU went from 0.01 to 0.03 cores.
    pub fn submit_and_wait(
        &mut self,
        until: Instant,
        spin: Duration,
        done: &mut Vec<Completion>,
    ) -> io::Result<()> {
        if !spin.is_zero() {
            let stop = (Instant::now() + spin).min(until);
            loop {
                let queued = self.ring.submission().len() as u32;
                // SAFETY: no extended argument is passed.
                let polled = unsafe {
                    self.ring
                        .submitter()
                        .enter::<libc::sigset_t>(queued, 0, ENTER_GETEVENTS, None)
                };
                if polled.is_err() || !self.ring.completion().is_empty() || Instant::now() >= stop {
                    break;
                }
            }
            if !self.ring.completion().is_empty() {
                self.collect(done);
                return Ok(());
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        let ts = types::Timespec::new()
            .sec(left.as_secs())
            .nsec(left.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            // Timed out, interrupted, or completions to reap first.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        self.collect(done);
        Ok(())
    }

    fn collect(&mut self, done: &mut Vec<Completion>) {
        done.clear();
        let (id, count) = (self.id, self.bufs.as_ref().map_or(0, |b| b.count));
        let mut taken = 0;
        for c in self.ring.completion() {
            let flags = c.flags();
            // Only the kernel sets F_BUFFER, and only for a block it took
            // from our ring: this is the one place a token is made.
            let block = cqueue::buffer_select(flags)
                .filter(|&bid| bid < count)
                .map(|bid| Block { bid, ring: id });
            taken += usize::from(block.is_some());
            done.push(Completion {
                data: c.user_data(),
                res: c.result(),
                flags,
                block,
            });
        }
        if let Some(b) = self.bufs.as_mut() {
            b.free -= taken;
        }
    }

    /// Blocks in the kernel's hands, ready for data.
    pub fn blocks_free(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.free)
    }

    /// Blocks in all.
    pub fn blocks(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.count as usize)
    }

    fn bufs(&self, b: &Block) -> &BufRing {
        assert_eq!(b.ring, self.id, "a block of another ring");
        self.bufs.as_ref().expect("a block without a buffer ring")
    }

    pub fn block_size(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.block)
    }

    /// The first `len` bytes of an owned block.
    pub fn block(&mut self, b: &Block, len: usize) -> &mut [u8] {
        let bufs = self.bufs(b);
        let len = len.min(bufs.block);
        // SAFETY: the token says the program owns this block (the kernel
        // reported it and it was not given back), so the kernel does not
        // write it; the slice covers that block alone, inside the
        // allocation, and `&mut self` keeps any other slice of the ring
        // from living as long as this one.
        unsafe { std::slice::from_raw_parts_mut(bufs.block_ptr(b.bid), len) }
    }

    /// Bytes `from..to` of an owned block (for a send in flight).
    pub fn range(&self, b: &Block, from: usize, to: usize) -> &[u8] {
        let bufs = self.bufs(b);
        let to = to.min(bufs.block);
        let from = from.min(to);
        // SAFETY: as in `block`: an owned block, which the kernel does not
        // write; the slice stays inside it, and `&self` keeps `block`'s
        // `&mut` slices from living at the same time.
        unsafe { std::slice::from_raw_parts(bufs.block_ptr(b.bid).add(from), to - from) }
    }

    /// Returns an owned block to the kernel.
    pub fn give_back(&mut self, b: Block) {
        self.bufs(&b);
        if let Some(bufs) = self.bufs.as_mut() {
            bufs.give_back(b.bid);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Stop everything the kernel may still do for us, and wait for it.
        let stopped = match self.ring.submitter().register_sync_cancel(
            Some(
                types::Timespec::new()
                    .sec(TEARDOWN.as_secs())
                    .nsec(TEARDOWN.subsec_nanos()),
            ),
            types::CancelBuilder::any(),
        ) {
            Ok(()) => true,
            Err(e) => e.raw_os_error() == Some(libc::ENOENT), // nothing in flight
        };
        if let Some(b) = &self.bufs {
            let _ = self.ring.submitter().unregister_buf_ring(b.group);
        }
        // SAFETY: dropped once, here, and never used again.
        unsafe { ManuallyDrop::drop(&mut self.ring) };
        if !stopped && let Some(b) = self.bufs.take() {
            // The kernel did not confirm that it is done: keep the blocks
            // for the process's life rather than free memory it may write.
            tracing::warn!("io_uring teardown: operations may be in flight; keeping their blocks");
            std::mem::forget(b);
        }
    }
}

/// The provided-buffer ring: private, so that only [`Ring`] holds one.
struct BufRing {
    entries: *mut types::BufRingEntry,
    layout: std::alloc::Layout,
    /// The blocks' memory, reached only by raw pointer: never through a
    /// `&`/`&mut` of the whole (which would alias the blocks the kernel
    /// may be writing), only as the slice of one owned block.
    blocks: std::ptr::NonNull<u8>,
    blocks_layout: std::alloc::Layout,
    count: u16,
    block: usize,
    group: u16,
    tail: u16,
    /// Blocks given to the kernel and not yet reported back.
    free: usize,
}

impl BufRing {
    fn new(ring: &IoUring, count: u16, block: usize, group: u16) -> io::Result<Self> {
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
        let blocks_layout = std::alloc::Layout::from_size_align(count as usize * block, 4096)
            .map_err(io::Error::other)?;
        if blocks_layout.size() == 0 {
            // SAFETY: allocated just above with this layout, used by nothing.
            unsafe { std::alloc::dealloc(entries as *mut u8, layout) };
            return Err(io::Error::other("a buffer ring needs blocks of some size"));
        }
        // SAFETY: the layout has a non-zero size (checked above).
        let blocks = unsafe { std::alloc::alloc_zeroed(blocks_layout) };
        let Some(blocks) = std::ptr::NonNull::new(blocks) else {
            // SAFETY: allocated just above with this layout, used by nothing.
            unsafe { std::alloc::dealloc(entries as *mut u8, layout) };
            return Err(io::Error::other("out of memory for the buffer ring"));
        };
        let mut r = BufRing {
            entries,
            layout,
            blocks,
            blocks_layout,
            count,
            block,
            group,
            tail: 0,
            free: 0,
        };
        // SAFETY: `entries` is a page-aligned, zeroed ring of `count`
        // entries; `Ring` keeps it (and the blocks) until the registration
        // is gone (see its Drop). If registering fails, nothing refers to it.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, group, 0)?;
        }
        for bid in 0..count {
            r.give_back(bid);
        }
        Ok(r)
    }

    /// Where block `bid` starts (`bid` < `count`).
    fn block_ptr(&self, bid: u16) -> *mut u8 {
        assert!(bid < self.count, "block {bid} of {}", self.count);
        // SAFETY: bid < count, so the offset stays inside the allocation
        // of count * block bytes.
        unsafe { self.blocks.as_ptr().add(bid as usize * self.block) }
    }

    /// Publishes block `bid` to the kernel (called for each block once at
    /// the start, then only with a consumed [`Block`] token).
    fn give_back(&mut self, bid: u16) {
        debug_assert!(bid < self.count);
        let i = (self.tail & (self.count - 1)) as usize;
        // SAFETY: i < count; the kernel reads entries up to the published
        // tail only, and this one is past it until the store below; the
        // address is inside `blocks`, which outlives the registration.
        unsafe {
            let e = &mut *self.entries.add(i);
            e.set_addr(self.block_ptr(bid) as u64);
            e.set_len(self.block as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
        self.free += 1;
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both allocated in `new` with these layouts; `Ring` drops
        // this only after the registration is gone and nothing is in
        // flight (else it forgets it: see its Drop).
        unsafe {
            std::alloc::dealloc(self.entries as *mut u8, self.layout);
            std::alloc::dealloc(self.blocks.as_ptr(), self.blocks_layout);
        }
    }
}

/// Whether this kernel has io_uring with provided-buffer rings.
pub fn available() -> bool {
    Ring::with_buffers(8, 8, 4096, 0).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is packed is what is unpacked, for every index that fits (it
    /// was packed whole and unpacked with 32 bits: an index of 2^32 came
    /// back as 0, another connection).
    #[test]
    fn user_data_round_trips() {
        for (kind, index) in [(0, 0), (1, 7), (5, 1 << 32), (255, INDEX_MASK as usize)] {
            assert_eq!(split(user_data(kind, index)), (kind, index));
        }
        assert!(std::panic::catch_unwind(|| user_data(1, 1 << 56)).is_err());
        assert!(std::panic::catch_unwind(|| user_data(256, 0)).is_err());
    }
}
