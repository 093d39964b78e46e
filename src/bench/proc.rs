//! CPU and memory of this process and of the server, from getrusage(2) and
//! /proc (Linux).

/// This process's CPU time so far (user + system), in seconds.
pub fn self_cpu() -> f64 {
    // SAFETY: getrusage writes one rusage struct through a valid pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// A process's CPU time in seconds, with all its threads and descendants:
/// the reaped ones (counted by the kernel in the parent) and the live ones
/// (the fork model's children still serving), as netperf's -c counts.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    usage(pid).map(|u| u.user + u.sys)
}

/// The live children of `pid`, from each thread's `children` file.
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// A process's resident memory, in bytes.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// What a process tree has used so far: CPU split into user and system
/// time, and context switches (what netperf -c and neper's rusage report).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub user: f64,
    pub sys: f64,
    pub ctx_switches: u64,
}

impl std::ops::Sub for Usage {
    type Output = Usage;
    fn sub(self, o: Usage) -> Usage {
        Usage {
            user: self.user - o.user,
            sys: self.sys - o.sys,
            ctx_switches: self.ctx_switches.saturating_sub(o.ctx_switches),
        }
    }
}

/// `pid`'s usage with all its threads and its descendants, live or reaped
/// (reaped ones count CPU only: the kernel keeps no switches of theirs that
/// another process can read).
pub fn usage(pid: i32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime, stime, cutime, cstime are fields 11..=14 after "pid (comm) ".
    let mut u = Usage {
        user: (f.get(11)? + f.get(13)?) / hz,
        sys: (f.get(12)? + f.get(14)?) / hz,
        ctx_switches: thread_switches(pid),
    };
    for child in children(pid) {
        if let Some(c) = usage(child) {
            u.user += c.user;
            u.sys += c.sys;
            u.ctx_switches += c.ctx_switches;
        }
    }
    Some(u)
}

/// Voluntary and involuntary switches of every live thread of `pid`.
fn thread_switches(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}
