//! Files root writes: the pid file and the Unix socket, in a directory
//! another user can write. That user (nobody, through setpriv) plants
//! links where the server will write; the files they point to must stay
//! untouched, and the modes must not depend on the umask.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn planted_links_are_never_followed_and_modes_ignore_the_umask() {
    require("setpriv", "util-linux");
    if unsafe { libc::geteuid() } != 0 {
        skip("files root writes: not root, so no other user to plant links as");
        return;
    }
    // World-writable but not sticky, so the kernel's own link protection
    // (fs.protected_symlinks) does not apply: the server must not need it.
    let dir = std::env::temp_dir().join(format!("upcase-plant-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let victim = std::env::temp_dir().join(format!("upcase-victim-{}", std::process::id()));
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let pid_file = dir.join("upcase.pid");
    let sock = dir.join("upcase.sock");

    // Another user plants links at the names the old code used (PATH.<pid>.tmp
    // for the next 3,000 pids) and at PATH itself.
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // perl, Debian's essential one: a tool nobody can run from /usr/bin.
    let plant = format!(
        "for my $p ({}..{}) {{ symlink($ARGV[0], \"$ARGV[1].$p.tmp\") or die \"$!\" }} symlink($ARGV[0], $ARGV[1]) or die \"$!\"",
        last + 1,
        last + 3000,
    );
    let planted = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/perl",
            "-e",
            &plant,
        ])
        .arg(&victim)
        .arg(&pid_file)
        .current_dir("/")
        .status()
        .expect("setpriv");
    assert!(planted.success(), "planting as nobody failed");

    // SAFETY: umask(2) in the child between fork and exec.
    let mut cmd = upcase();
    cmd.args(["serve", "tcp://127.0.0.1:0"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--pid-file")
        .arg(&pid_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    /// Killed however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = Killed(cmd.spawn().expect("spawn"));
    let child = &mut guard.0;
    let _err = lines_of(child.stderr.take().unwrap());
    let first = first_line(child);
    assert!(first.starts_with("listening "), "{first}");

    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "the victim was written"
    );
    let vmode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
    assert_eq!(vmode, 0o600, "the victim's mode changed");
    let meta = std::fs::symlink_metadata(&pid_file).unwrap();
    assert!(
        meta.is_file(),
        "the pid file is a regular file, not the planted link"
    );
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o644,
        "pid file mode under umask 000"
    );
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(pid.trim(), child.id().to_string());
    let smeta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(smeta.file_type().is_socket());
    assert_eq!(
        smeta.permissions().mode() & 0o777,
        0o666,
        "socket mode under umask 000"
    );

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_deadline(child, Duration::from_secs(10)).expect("exits");
    assert!(status.success());
    assert!(!pid_file.exists() && !sock.exists(), "files left behind");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&victim);
}
