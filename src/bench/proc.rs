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

/// A process's resident memory with its descendants' (a supervisor's
/// workers, fork's children), in bytes.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let own = own_rss_bytes(pid)?;
    Some(own + children(pid).into_iter().filter_map(rss_bytes).sum::<u64>())
}

fn own_rss_bytes(pid: i32) -> Option<u64> {
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

/// `--pin SERVER_CPUS:CLIENT_CPUS`: the CPUs the server and the load
/// generator may run on, each a list such as `0`, `0,2` or `0-1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub server: Vec<usize>,
    pub client: Vec<usize>,
}

impl std::str::FromStr for Pin {
    type Err = String;

    fn from_str(s: &str) -> Result<Pin, String> {
        let (server, client) = s.split_once(':').ok_or_else(|| {
            format!("'{s}': expected SERVER_CPUS:CLIENT_CPUS, e.g. 0:1 or 0-1:2-3")
        })?;
        Ok(Pin {
            server: cpu_list(server)?,
            client: cpu_list(client)?,
        })
    }
}

/// `0,2-3` as [0, 2, 3].
fn cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("'{s}': a CPU list is numbers and ranges, e.g. 0 or 0,2 or 0-3");
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a > b || b >= libc::CPU_SETSIZE as usize {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    Ok(cpus)
}

/// Restricts every thread of process `pid` (as it is now) to `cpus`.
pub fn pin_pid(pid: i32, cpus: &[usize]) -> std::io::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
            set_affinity(tid, cpus)?;
        }
    }
    Ok(())
}

/// Restricts the calling thread (and the threads and processes it starts
/// afterwards, which inherit it) to `cpus`.
pub fn pin_self(cpus: &[usize]) -> std::io::Result<()> {
    set_affinity(0, cpus)
}

fn set_affinity(tid: libc::pid_t, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it
    // (every cpu was checked against CPU_SETSIZE), and sched_setaffinity
    // reads it for the given size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse() {
        let p: Pin = "0:1".parse().unwrap();
        assert_eq!((p.server, p.client), (vec![0], vec![1]));
        let p: Pin = "0-1:2,4-5".parse().unwrap();
        assert_eq!((p.server, p.client), (vec![0, 1], vec![2, 4, 5]));
        for bad in ["0", "a:1", "1-0:2", "0:", "0:99999"] {
            assert!(bad.parse::<Pin>().is_err(), "{bad}");
        }
    }
}
