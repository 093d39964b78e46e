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
    let own = own_and_reaped(pid)?;
    Some(
        own + children(pid)
            .into_iter()
            .filter_map(cpu_seconds)
            .sum::<f64>(),
    )
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

/// utime + stime + cutime + cstime of one process.
fn own_and_reaped(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ": state is field 0; utime, stime, cutime, cstime
    // are fields 11..=14.
    let ticks: f64 = f
        .get(11..=14)?
        .iter()
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
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
