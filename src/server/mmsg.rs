//! Datagrams in batches: recvmmsg(2) and sendmmsg(2).
//!
//! A UDP server pays two system calls per datagram when it receives and
//! answers them one at a time; with many senders, most of its time goes
//! there. recvmmsg fills up to [`SLOTS`] buffers in one call and sendmmsg
//! sends up to as many replies, each to its own address, in another. Neither
//! the standard library nor socket2 wraps them, and this is the hot path of
//! the UDP service, so they are written here once, behind a safe API: the
//! kernel's headers are rebuilt on the stack for every call from buffers
//! this type owns, so no pointer outlives the call that uses it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Largest UDP payload over IPv4 (65,535 − 8 UDP − 20 IP header bytes).
pub const MAX_DATAGRAM: usize = 65_507;

/// Datagrams per system call.
pub const SLOTS: usize = 16;
/// A slot holds the largest datagram and one byte more, so that a datagram
/// that was cut (which UDP never does to a full-size one) can be told apart.
const SLOT: usize = MAX_DATAGRAM + 1;

/// Where a reply's bytes are: in place in its slot (ASCII keeps the length)
/// or in the slot's own output buffer (UTF-8 may change it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    InPlace(usize),
    Out,
}

/// Buffers for [`SLOTS`] datagrams and their senders' addresses.
pub struct Batch {
    /// `SLOTS * SLOT` bytes, zeroed by the allocator: pages the kernel never
    /// writes (small datagrams use the start of each slot) cost no memory.
    buf: Vec<u8>,
    out: Vec<Vec<u8>>,
    addrs: [libc::sockaddr_storage; SLOTS],
    addr_lens: [libc::socklen_t; SLOTS],
    lens: [usize; SLOTS],
    replies: [Option<Reply>; SLOTS],
    n: usize,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("n", &self.n).finish()
    }
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            buf: vec![0u8; SLOTS * SLOT],
            out: vec![Vec::new(); SLOTS],
            // SAFETY: sockaddr_storage is plain integers; all zeroes is a
            // valid (AF_UNSPEC) value.
            addrs: unsafe { std::mem::zeroed() },
            addr_lens: [0; SLOTS],
            lens: [0; SLOTS],
            replies: [None; SLOTS],
            n: 0,
        }
    }
}

impl Batch {
    /// Receives what is waiting, up to [`SLOTS`] datagrams, without
    /// blocking; returns how many (0 when none were waiting).
    pub fn recv(&mut self, sock: BorrowedFd<'_>) -> io::Result<usize> {
        self.n = 0;
        self.replies = [None; SLOTS];
        let base = self.buf.as_mut_ptr();
        let mut iovs: [libc::iovec; SLOTS] = std::array::from_fn(|i| libc::iovec {
            // SAFETY: i < SLOTS, so the slot lies inside `buf`.
            iov_base: unsafe { base.add(i * SLOT) }.cast(),
            iov_len: SLOT,
        });
        // SAFETY: mmsghdr is plain integers and pointers; zero is valid for
        // every field (null pointers with zero lengths).
        let mut msgs: [libc::mmsghdr; SLOTS] = unsafe { std::mem::zeroed() };
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = (&raw mut self.addrs[i]).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &raw mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every pointer in `msgs` points into `self` or `iovs`, both
        // alive and not otherwise borrowed during the call; the lengths are
        // those of the memory they point to.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                SLOTS as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                _ => Err(e),
            };
        }
        let n = n as usize;
        for (i, m) in msgs.iter().take(n).enumerate() {
            self.lens[i] = (m.msg_len as usize).min(SLOT);
            self.addr_lens[i] = m.msg_hdr.msg_namelen;
        }
        self.n = n;
        Ok(n)
    }

    /// The datagrams received by the last [`Batch::recv`].
    pub fn len(&self) -> usize {
        self.n
    }

    /// Datagram `i`: its bytes, the sender, and the slot's output buffer.
    /// `None` for an address of a family other than IPv4 or IPv6.
    pub fn datagram(&mut self, i: usize) -> Option<(&mut [u8], SocketAddr, &mut Vec<u8>)> {
        if i >= self.n {
            return None;
        }
        let peer = to_socket_addr(&self.addrs[i], self.addr_lens[i])?;
        let data = &mut self.buf[i * SLOT..i * SLOT + self.lens[i]];
        Some((data, peer, &mut self.out[i]))
    }

    /// Records where datagram `i`'s reply is (or `None`: not answered).
    pub fn set_reply(&mut self, i: usize, reply: Option<Reply>) {
        if i < self.n {
            self.replies[i] = reply;
        }
    }

    /// Sends every reply set since the last receive, in as few calls as
    /// the kernel allows; `sent` hears of each (peer, result, length).
    pub fn send(
        &mut self,
        sock: BorrowedFd<'_>,
        mut sent: impl FnMut(SocketAddr, io::Result<usize>, usize),
    ) {
        let base = self.buf.as_mut_ptr();
        let mut order = [0usize; SLOTS];
        let mut count = 0;
        // SAFETY: as in `recv`: zero is valid for every field.
        let mut iovs: [libc::iovec; SLOTS] = unsafe { std::mem::zeroed() };
        for i in 0..self.n {
            let (ptr, len) = match self.replies[i] {
                // SAFETY: i < SLOTS and len <= the received length <= SLOT.
                Some(Reply::InPlace(len)) => (unsafe { base.add(i * SLOT) }, len.min(self.lens[i])),
                Some(Reply::Out) => (self.out[i].as_mut_ptr(), self.out[i].len()),
                None => continue,
            };
            iovs[count] = libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            };
            order[count] = i;
            count += 1;
        }
        // SAFETY: as in `recv`.
        let mut msgs: [libc::mmsghdr; SLOTS] = unsafe { std::mem::zeroed() };
        for k in 0..count {
            let i = order[k];
            msgs[k].msg_hdr.msg_name = (&raw mut self.addrs[i]).cast();
            msgs[k].msg_hdr.msg_namelen = self.addr_lens[i];
            msgs[k].msg_hdr.msg_iov = &raw mut iovs[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
        }
        let mut start = 0;
        while start < count {
            // SAFETY: msgs[start..count] point into `self` and `iovs`, alive
            // and unborrowed for the call, with their true lengths.
            let r = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    msgs[start..].as_mut_ptr(),
                    (count - start) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            let peer = |k: usize| {
                let i = order[k];
                to_socket_addr(&self.addrs[i], self.addr_lens[i])
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first message of the call failed; the rest are tried.
                if let Some(p) = peer(start) {
                    sent(p, Err(e), iovs[start].iov_len);
                }
                start += 1;
                continue;
            }
            let r = r as usize;
            for k in start..start + r {
                if let Some(p) = peer(k) {
                    sent(p, Ok(msgs[k].msg_len as usize), iovs[k].iov_len);
                }
            }
            start += r.max(1);
        }
    }
}

/// The address the kernel wrote, if it is IPv4 or IPv6.
fn to_socket_addr(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    let len = len as usize;
    match ss.ss_family as libc::c_int {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the kernel wrote a sockaddr_in here (family and
            // length say so); sockaddr_storage is larger and as aligned.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    #[test]
    fn a_batch_answers_each_sender_with_its_own_bytes() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let clients: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for (k, c) in clients.iter().enumerate() {
            c.send_to(format!("hello {k}").as_bytes(), to).unwrap();
        }
        let big = vec![b'z'; MAX_DATAGRAM];
        clients[0].send_to(&big, to).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut b = Batch::default();
        assert_eq!(b.recv(server.as_fd()).unwrap(), 4);
        for i in 0..b.len() {
            let (data, _, out) = b.datagram(i).unwrap();
            if i == 1 {
                // Through the output buffer, at another length.
                *out = data.to_ascii_uppercase();
                out.push(b'!');
                b.set_reply(i, Some(Reply::Out));
            } else {
                data.make_ascii_uppercase();
                let n = data.len();
                b.set_reply(i, Some(Reply::InPlace(n)));
            }
        }
        let mut results = Vec::new();
        b.send(server.as_fd(), |p, r, len| {
            results.push((p, r.unwrap(), len))
        });
        assert_eq!(results.len(), 4);
        assert!(results.iter().all(|(_, got, len)| got == len));
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let n = clients[0].recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"HELLO 0");
        let n = clients[1].recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"HELLO 1!");
        let n = clients[2].recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"HELLO 2");
        let n = clients[0].recv(&mut buf).unwrap();
        assert_eq!(n, MAX_DATAGRAM);
        assert!(buf[..n].iter().all(|&c| c == b'Z'));
        assert_eq!(b.recv(server.as_fd()).unwrap(), 0, "nothing left");
    }
}
